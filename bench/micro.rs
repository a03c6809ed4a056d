//! Criterion micro-benchmarks: mint on a cache miss (leaf key + certificate + CA signature, with
//! the CA key on SoftHSM2 and, for comparison, in software), a leaf-cache hit, ClientHello
//! handling, and HSM signatures per mechanism next to a plain single-thread cryptoki loop on the
//! same token. The HSM groups need a token set up by `bench/run`, which passes its config in
//! TOLLGATE_BENCH_CONFIG (and SOFTHSM2_CONF); without it they are left out, said on stderr.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use rustls::SignatureScheme;
use tollgate::keys::rcgen::RcgenKey;
use tollgate::keys::software::SoftwareKey;
use tollgate::keys::{KeyAlgorithm, PrivateKey};
use tollgate::pki::cache::{LeafCache, LeafKey};
use tollgate::pki::mint::Ca;

fn upstream_leaf() -> Vec<u8> {
    let mut params = rcgen::CertificateParams::new(vec!["origin.test".into(), "www.origin.test".into()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "origin.test");
    let key = rcgen::KeyPair::generate().unwrap();
    params.self_signed(&key).unwrap().der().to_vec()
}

fn software_ca() -> Ca {
    let key = Arc::new(SoftwareKey::generate(KeyAlgorithm::EcdsaP256).unwrap());
    let signer = RcgenKey::new(key.clone()).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, "bench CA");
    let cert = params.self_signed(&signer).unwrap();
    Ca::new("bench", cert.der().clone(), tollgate::pki::KeyHandle::Software(key)).unwrap()
}

/// The HSM-backed pieces, when bench/run set up a token.
struct HsmBench {
    hsm: Arc<tollgate::hsm::Hsm>,
    ca: Arc<Ca>,
    module: PathBuf,
    token: String,
    pin: secrecy::SecretString,
}

fn hsm_bench() -> Option<HsmBench> {
    let Ok(path) = std::env::var("TOLLGATE_BENCH_CONFIG") else {
        eprintln!("micro: TOLLGATE_BENCH_CONFIG not set (run bench/run): HSM benchmarks left out");
        return None;
    };
    let config = tollgate::config::Config::load(path.as_ref()).expect("bench config");
    let hsm = Arc::new(tollgate::hsm::Hsm::open(&config.hsm));
    hsm.require_up().expect("HSM");
    let state = tollgate::state::StateDir::open(&config.state_dir).unwrap();
    let store = tollgate::pki::CertStore::load(&state).unwrap();
    let keys = tollgate::pki::Keyring::new(&state, Some(&hsm));
    let ca = Arc::new(store.ca(tollgate::pki::CaRole::ForwardTrust, &keys).unwrap().expect("forward-trust CA"));
    let server = &config.hsm.servers[0];
    let pin = tollgate::vault::load(&server.pin(), "bench").expect("pin");
    Some(HsmBench { hsm, ca, module: server.module.clone(), token: server.token.clone(), pin })
}

fn mint(c: &mut Criterion) {
    let up = upstream_leaf();
    let soft = software_ca();
    let mut group = c.benchmark_group("mint");
    group.bench_function("cache_miss_software_ca", |b| b.iter(|| black_box(soft.mint("origin.test", &up).unwrap())));
    if let Some(h) = hsm_bench() {
        group.bench_function("cache_miss_hsm_ca", |b| b.iter(|| black_box(h.ca.mint("origin.test", &up).unwrap())));
        // As the proxy mints: handed to an HSM worker and awaited.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        group.bench_function("cache_miss_hsm_ca_handed_over", |b| {
            b.iter(|| black_box(runtime.block_on(h.ca.mint_off_runtime("origin.test", &up)).unwrap()))
        });
        group.finish();
        sign(c, &h);
    } else {
        group.finish();
    }
}

fn sign(c: &mut Criterion, h: &HsmBench) {
    let mut group = c.benchmark_group("hsm_sign");
    let message = [7u8; 256];
    let schemes = [
        ("bench-trust", SignatureScheme::ECDSA_NISTP256_SHA256, "ecdsa-p256"),
        ("bench-untrust", SignatureScheme::RSA_PKCS1_SHA256, "rsa-2048-pkcs1"),
        ("bench-untrust", SignatureScheme::RSA_PSS_SHA256, "rsa-2048-pss"),
    ];
    for (label, scheme, name) in schemes {
        let key = h.hsm.key(label).unwrap();
        group.bench_function(format!("tollgate_{name}"), |b| b.iter(|| black_box(key.sign(scheme, &message).unwrap())));
    }
    // The same token through a plain cryptoki loop: the floor tollgate's path is compared to.
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    let pkcs11 = Pkcs11::new(&h.module).unwrap();
    let _ = pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = pkcs11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).is_ok_and(|i| i.label().trim_end() == h.token))
        .unwrap();
    let session = pkcs11.open_ro_session(slot).unwrap();
    let _ = session.login(cryptoki::session::UserType::User, Some(&h.pin));
    let find = |label: &str| {
        session
            .find_objects(&[
                cryptoki::object::Attribute::Class(cryptoki::object::ObjectClass::PRIVATE_KEY),
                cryptoki::object::Attribute::Label(label.as_bytes().to_vec()),
            ])
            .unwrap()[0]
    };
    let (ec, rsa) = (find("bench-trust"), find("bench-untrust"));
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &message);
    use cryptoki::mechanism::Mechanism;
    group.bench_function("raw_cryptoki_ecdsa-p256", |b| {
        b.iter(|| black_box(session.sign(&Mechanism::Ecdsa, ec, digest.as_ref()).unwrap()))
    });
    group.bench_function("raw_cryptoki_rsa-2048-pkcs1", |b| {
        b.iter(|| black_box(session.sign(&Mechanism::Sha256RsaPkcs, rsa, &message).unwrap()))
    });
    let pss = || {
        Mechanism::Sha256RsaPkcsPss(cryptoki::mechanism::rsa::PkcsPssParams {
            hash_alg: cryptoki::mechanism::MechanismType::SHA256,
            mgf: cryptoki::mechanism::rsa::PkcsMgfType::MGF1_SHA256,
            s_len: 32u64.into(),
        })
    };
    group.bench_function("raw_cryptoki_rsa-2048-pss", |b| {
        b.iter(|| black_box(session.sign(&pss(), rsa, &message).unwrap()))
    });
    group.finish();
}

fn cache(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let soft = Arc::new(software_ca());
    let up = upstream_leaf();
    let cache = LeafCache::new(10_000);
    let key = LeafKey { host: Some("origin.test".into()), upstream: [1; 32], trusted: true };
    let minted = Arc::new(soft.mint("origin.test", &up).unwrap());
    runtime.block_on(cache.get_or_mint(key.clone(), async { Ok(minted) })).unwrap();
    c.bench_function("cache/hit", |b| {
        b.iter(|| runtime.block_on(cache.get_or_mint(key.clone(), async { unreachable!("cached") })).unwrap())
    });
}

fn client_hello(c: &mut Criterion) {
    // A real ClientHello from a rustls client, replayed into the reader.
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let mut conn = rustls::ClientConnection::new(Arc::new(config), "origin.test".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    c.bench_function("client_hello/read_and_parse", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let (mut client, mut server) = tokio::io::duplex(8192);
                tokio::io::AsyncWriteExt::write_all(&mut client, &hello).await.unwrap();
                black_box(
                    tollgate::proxy::tls::read_client_hello(&mut server, std::time::Duration::from_secs(10))
                        .await
                        .unwrap()
                        .1,
                )
            })
        })
    });
}

/// A 100,000-entry host list (as blocklists come: most entries exact names, a third whole
/// domains `*.example`, a few globs): how long it takes to load, and what a lookup costs for a
/// hit, a hit under a domain entry and a miss. Then a whole TLS decision with three rules, the
/// list on the last, against a configuration with no rules at all.
fn host_lists(c: &mut Criterion) {
    use tollgate::policy::lists::HostSet;
    let mut text = String::from("# 100k entries\n");
    for i in 0..100_000 {
        match i % 3 {
            0 => text.push_str(&format!("*.domain{i}.example\n")),
            _ if i % 1000 == 1 => text.push_str(&format!("web?{i}.glob.example\n")),
            _ => text.push_str(&format!("host{i}.exact.example\n")),
        }
    }
    let mut group = c.benchmark_group("host_list");
    group.sample_size(10);
    group.bench_function("load_100k", |b| b.iter(|| black_box(HostSet::parse(&text, "bench").unwrap())));
    group.finish();
    let set = HostSet::parse(&text, "bench").unwrap();
    assert_eq!(set.len(), 100_000);
    let hosts = [
        ("hit_exact", "host50000.exact.example"),
        ("hit_under_domain", "a.b.c.www.domain99999.example"),
        ("miss", "www.not-on-the-list.example.org"),
    ];
    for (name, host) in hosts {
        assert_eq!(set.contains(host), name != "miss", "{host}");
        c.bench_function(&format!("host_list/lookup_{name}"), |b| b.iter(|| black_box(set.contains(black_box(host)))));
    }

    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("list.txt");
    std::fs::write(&list, &text).unwrap();
    let config = |rules: &str| {
        let text = format!("state_dir = \"s\"\n{rules}");
        tollgate::config::Config::from_toml(&text, &dir.path().join("t.toml")).unwrap()
    };
    let three = format!(
        "[[decryption.rule]]\nname = \"lab\"\nsources = [\"10.9.0.0/16\"]\naction = \"no-decrypt\"\n\
         [[decryption.rule]]\nname = \"banks\"\nhosts = [\"*.bank.example\", \"*.broker.example\"]\naction = \"no-decrypt\"\n\
         [[decryption.rule]]\nname = \"list\"\nhost_lists = [\"{}\"]\naction = \"block\"\n",
        list.display()
    );
    let who = tollgate::policy::Who { client: "192.0.2.7".parse().unwrap(), user: None, listener: "sni" };
    for (name, config) in [("no_rules", config("")), ("three_rules_100k_list", config(&three))] {
        let policy = tollgate::policy::Sources::new().policy(&config).unwrap();
        c.bench_function(&format!("decision/{name}"), |b| {
            b.iter(|| black_box(policy.decide_tls(&who, black_box("www.origin.example"))))
        });
    }
}

criterion_group!(benches, mint, cache, client_hello, host_lists);
criterion_main!(benches);
