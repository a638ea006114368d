//! libFuzzer entry point of `checks/admin_command.rs`, where the target is described. `cargo test`
//! replays the committed seeds through the same checks (`proxy/tests/fuzz_seeds.rs`).

#![no_main]

#[path = "../checks/admin_command.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
