//! The request-trace parser of `gpuscale-operator plan` on arbitrary text: it parses
//! or names the line that does not, never panics, and a parsed trace is in time order.
#![no_main]
use gpuscale_operator::replay::Trace;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = Trace::parse_csv(text) {
        let d = t.duration();
        assert!(d.is_finite() && d >= 0.0, "{d}");
    }
});
