//! State files a crash, a full disk or an attacker with write access could leave behind: the
//! certificate inventory, the master key file and sealed secrets must parse or be refused.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tollgate::pki::CertStore::parse(data);
    if let Ok(file) = serde_json::from_slice::<tollgate::vault::master::MasterKeyFile>(data) {
        for (name, sealed) in &file.secrets {
            assert!(tollgate::vault::master::open_secret(&[7; 32], name, sealed).is_err());
        }
    }
    let key = tollgate::vault::SealingKey::from_bytes(zeroize::Zeroizing::new([7; 32]));
    assert!(key.open("fuzz", data).is_none(), "a forged blob must never open");
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tollgate::hex::decode(text);
    }
});
