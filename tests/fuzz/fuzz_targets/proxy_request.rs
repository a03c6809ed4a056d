//! The destination of a proxy request: a CONNECT authority or an absolute-form URI, parsed by
//! `http` and then by tollgate's `Target::parse`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for default_port in [80, 443] {
        if let Some(target) = tollgate::proxy::Target::parse(text, default_port) {
            assert!(!target.host.is_empty());
            assert!(!target.host.contains(['[', ']', '/', ' ']), "{target:?}");
            assert_eq!(target.host, target.host.to_ascii_lowercase());
        }
    }
    if let Ok(uri) = text.parse::<http::Uri>()
        && let Some(authority) = uri.authority()
    {
        let _ = tollgate::proxy::Target::parse(authority.as_str(), 80);
    }
});
