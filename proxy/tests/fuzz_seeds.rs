//! Replays the fuzz targets' committed seeds (`fuzz/seeds/<target>/`) through the targets' own
//! checks (`fuzz/checks/`), so that in every `cargo test` the checks build against the current
//! code and hold for the seeds. The fuzzing itself runs with `cargo fuzz` (README, "Fuzzing").

#[path = "../../fuzz/checks/admin_command.rs"]
mod admin_command;
#[path = "../../fuzz/checks/frame_split.rs"]
mod frame_split;
#[path = "../../fuzz/checks/startup_packet.rs"]
mod startup_packet;

use std::path::Path;

/// Runs `check` over every seed of `target`; a failing check panics naming the seed.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("seed directory entry").path())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    for seed in &seeds {
        let data = std::fs::read(seed).unwrap_or_else(|e| panic!("{}: {e}", seed.display()));
        let checked = std::panic::catch_unwind(|| check(&data));
        assert!(checked.is_ok(), "seed {} fails its checks", seed.display());
    }
}

#[test]
fn admin_command_seeds_pass_their_checks() {
    replay("admin_command", admin_command::check);
}

#[test]
fn frame_split_seeds_pass_their_checks() {
    replay("frame_split", frame_split::check);
}

#[test]
fn startup_packet_seeds_pass_their_checks() {
    replay("startup_packet", startup_packet::check);
}
