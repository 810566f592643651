#![no_main]
// The body lives in the library so tests/fuzz_regressions.rs replays crashes through it.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // A message may carry a change forged with a right checksum (see forged_changes).
    sheafdb::fuzzing::let_caught_automerge_panics_pass();
    sheafdb::fuzzing::sync_message(data)
});
