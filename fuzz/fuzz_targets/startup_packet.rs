//! libFuzzer entry point of `checks/startup_packet.rs`, where the target is described. `cargo test`
//! replays the committed seeds through the same checks (`proxy/tests/fuzz_seeds.rs`).

#![no_main]

#[path = "../checks/startup_packet.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
