//! The first bytes of every client connection: tollgate reads the ClientHello (through rustls'
//! Acceptor) before deciding anything. Any input must end in a ClientHello or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    runtime.block_on(async {
        let (mut client, mut server) = tokio::io::duplex(128 * 1024);
        client.write_all(data).await.unwrap();
        drop(client);
        if let Ok((_, info, seen)) = tollgate::proxy::tls::read_client_hello(&mut server, std::time::Duration::from_secs(10)).await {
            assert!(seen.len() <= data.len());
            if let Some(sni) = info.sni {
                assert_eq!(sni, sni.to_ascii_lowercase());
            }
        }
    });
});
