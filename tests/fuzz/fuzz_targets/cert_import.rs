//! `tollgate cert import`: private keys (PEM or DER, PKCS#8, SEC1, PKCS#1) and certificate
//! chains (PEM, each X.509-parsed) from operator-supplied files.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = tollgate::manage::parse_private_key(data) {
        let _ = tollgate::keys::software::SoftwareKey::from_der(&key);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tollgate::pki::parse_chain("fuzz", text);
    }
});
