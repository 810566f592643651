#![no_main]
// The body lives in the library so tests/fuzz_regressions.rs replays crashes through it.
libfuzzer_sys::fuzz_target!(|data: &[u8]| sheafdb::fuzzing::http_auth(data));
