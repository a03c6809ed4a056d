//! Configuration files: any text loads or is refused with an error naming the file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = std::path::Path::new("/etc/tollgate/fuzz.toml");
    if let Err(e) = tollgate::config::Config::from_toml(text, path) {
        assert!(e.to_string().contains("fuzz.toml"), "{e}");
    }
});
