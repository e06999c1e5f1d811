//! The GGUF reader on arbitrary bytes: a header parses or is an error, never a panic,
//! and a parsed one summarizes or errs (the operator's range reads and probe pods read
//! files from anywhere).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match gguf::Gguf::parse(data) {
        Ok(g) => {
            let _ = g.summary();
            let _ = g.weight_bytes();
        }
        // A truncation names a longer prefix than it had.
        Err(e) => {
            if let Some(need) = e.prefix_needed() {
                assert!(need > data.len() as u64, "{e}");
            }
        }
    }
});
