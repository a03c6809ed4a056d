//! Load generator for the bench harness, for what h2load cannot do: a full TLS handshake per
//! request (h2load resumes sessions), a distinct SNI per connection (cache-miss mints), many
//! idle h2 connections (memory per connection), and a raw single-thread PKCS#11 sign loop on
//! the same token (the reference for the mint rate). Prints one JSON object.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// One full TLS handshake (no resumption) and one HTTP/1.1 request per connection.
    Newconn {
        #[command(flatten)]
        target: TargetArgs,
        /// SNI pattern with `{}` replaced by a counter (distinct names: cache-miss mints).
        #[arg(long)]
        sni_pattern: Option<String>,
        #[arg(short, long, default_value_t = 50)]
        concurrency: usize,
        #[arg(short, long, default_value_t = 10)]
        duration_secs: u64,
        /// Stop after this many requests (bounded load).
        #[arg(long, default_value_t = 1_000_000)]
        max_requests: u64,
        /// Resume TLS sessions (abbreviated handshakes) instead of a full handshake each time.
        #[arg(long)]
        resume: bool,
        /// Client threads, each with its own runtime and a share of the connections. A full
        /// handshake costs the client about as much as the server: one client thread saturates
        /// a core before a fast server does, and the row would measure the client.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Opens N h2 connections, one request each, holds them until stdin closes.
    Idle {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(short, default_value_t = 500)]
        n: usize,
    },
    /// In-process mint rate: fresh leaf key + certificate + CA signature on the token, N at a
    /// time, each handed off the runtime as tollgate does on a cache miss (what a cache miss
    /// costs tollgate, without the handshakes around it).
    MintRate {
        /// A tollgate config whose state holds a forward-trust CA on the HSM.
        #[arg(long)]
        config: PathBuf,
        /// Mints in flight at once.
        #[arg(long, default_value_t = 2)]
        concurrent: usize,
        #[arg(short, long, default_value_t = 5)]
        duration_secs: u64,
    },
    /// Raw C_Sign loop (CKM_ECDSA over a SHA-256 digest) on a token key: one session per thread
    /// in one process (default one thread).
    Sign {
        #[arg(long)]
        module: PathBuf,
        #[arg(long)]
        token: String,
        #[arg(long)]
        pin_file: PathBuf,
        #[arg(long)]
        label: String,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(short, long, default_value_t = 5)]
        duration_secs: u64,
    },
}

#[derive(clap::Args, Clone)]
struct TargetArgs {
    /// Where to connect.
    #[arg(long)]
    addr: SocketAddr,
    /// Host name (SNI and Host header).
    #[arg(long, default_value = "localhost")]
    host: String,
    #[arg(long, default_value = "/1k")]
    path: String,
    /// PEM bundle the client trusts (verification stays on; see `CachingVerifier`).
    #[arg(long)]
    ca: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    let report = match cli.mode {
        Mode::Newconn { target, sni_pattern, concurrency, duration_secs, max_requests, resume, threads } => {
            let load = Newconn {
                connector: tokio_rustls::TlsConnector::from(client_config(&target.ca, &[b"http/1.1"])),
                target,
                sni_pattern,
                deadline: Instant::now() + Duration::from_secs(duration_secs),
                max_requests,
                resume,
                counter: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            };
            newconn(Arc::new(load), concurrency, threads)
        }
        Mode::Idle { target, n } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(idle(target, n)),
        Mode::MintRate { config, concurrent, duration_secs } => {
            mint_rate(&config, concurrent, Duration::from_secs(duration_secs))
        }
        Mode::Sign { module, token, pin_file, label, threads, duration_secs } => {
            sign(module, &token, pin_file, &label, threads, Duration::from_secs(duration_secs))
        }
    };
    println!("{report}");
}

/// A client trusting `ca`, without resumption: loops that resume give themselves a session
/// store of their own (see `connection_loop`).
fn client_config(ca: &PathBuf, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA bundle") {
        roots.add(cert.expect("CA certificate")).expect("CA certificate");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .expect("verifier");
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CachingVerifier { webpki, verified: Default::default() }))
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Verifies as a browser does: the chain and the name once per distinct (chain, name), with the
/// verdict cached (Chromium's `CachingCertVerifier`, Firefox's verification cache), and the
/// handshake signature — the HSM's, on tollgate's inbound listener — on every connection. A
/// load generator that re-verified the same chain on every handshake would spend an ECDSA
/// verification per request that real clients do not, on the cores the proxy under test shares.
#[derive(Debug)]
struct CachingVerifier {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    verified: parking_lot::Mutex<std::collections::HashSet<(Vec<u8>, String)>>,
}

impl CachingVerifier {
    /// Distinct chains kept; the new-host mint workload sees a new leaf per connection.
    const CAPACITY: usize = 4096;
}

impl rustls::client::danger::ServerCertVerifier for CachingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let mut chain = end_entity.to_vec();
        intermediates.iter().for_each(|c| chain.extend_from_slice(c));
        let key = (chain, server_name.to_str().into_owned());
        if self.verified.lock().contains(&key) {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        let verdict = self.webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        let mut verified = self.verified.lock();
        if verified.len() >= Self::CAPACITY {
            verified.clear();
        }
        verified.insert(key);
        Ok(verdict)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

async fn one_request(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> Result<bool, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let mut tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut response = Vec::with_capacity(2048);
    let _ = tls.read_to_end(&mut response).await;
    if response.starts_with(b"HTTP/1.1 200") {
        Ok(resumed)
    } else {
        Err(String::from_utf8_lossy(&response[..response.len().min(80)]).into())
    }
}

/// What every client thread of the new-connection workload shares.
struct Newconn {
    connector: tokio_rustls::TlsConnector,
    target: TargetArgs,
    sni_pattern: Option<String>,
    deadline: Instant,
    max_requests: u64,
    resume: bool,
    counter: Arc<std::sync::atomic::AtomicU64>,
}

/// Per-connection-loop results: latencies (ms), resumed handshakes, errors, the first error.
type Outcome = (Vec<f64>, u64, u64, Option<String>);

fn newconn(load: Arc<Newconn>, concurrency: usize, threads: usize) -> serde_json::Value {
    let started = Instant::now();
    let threads = threads.clamp(1, concurrency.max(1));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            // Connections split as evenly as the numbers allow.
            let share = concurrency / threads + usize::from(t < concurrency % threads);
            let load = load.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                runtime.block_on(async move {
                    let loops: Vec<_> = (0..share).map(|_| tokio::spawn(connection_loop(load.clone()))).collect();
                    let mut outcomes = Vec::new();
                    for l in loops {
                        outcomes.push(l.await.expect("connection loop"));
                    }
                    outcomes
                })
            })
        })
        .collect();
    let (mut latencies, mut resumed, mut errors, mut first_error) = (Vec::new(), 0, 0, None);
    for (l, r, e, f) in workers.into_iter().flat_map(|w| w.join().expect("client thread")) {
        latencies.extend(l);
        resumed += r;
        errors += e;
        first_error = first_error.or(f);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let pct =
        |p: f64| latencies.get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1))).copied();
    serde_json::json!({
        "requests": latencies.len(), "resumed": resumed, "errors": errors, "first_error": first_error, "seconds": elapsed,
        "rps": latencies.len() as f64 / elapsed, "p50_ms": pct(0.50), "p99_ms": pct(0.99), "client_threads": threads,
    })
}

/// One connection at a time, back to back, until the deadline or the request budget.
async fn connection_loop(load: Arc<Newconn>) -> Outcome {
    // Resuming loops are separate clients, each with its own session store, as real clients
    // are: one store shared by all loops holds 8 tickets per server, and bursts of new
    // connections would empty it.
    let connector = match load.resume {
        true => {
            let mut config = rustls::ClientConfig::clone(load.connector.config());
            config.resumption = rustls::client::Resumption::in_memory_sessions(8);
            tokio_rustls::TlsConnector::from(Arc::new(config))
        }
        false => load.connector.clone(),
    };
    let (mut latencies, mut resumed, mut errors, mut first_error) = (Vec::new(), 0u64, 0u64, None);
    while Instant::now() < load.deadline {
        let i = load.counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if i >= load.max_requests {
            break;
        }
        let host = load.sni_pattern.as_ref().map(|p| p.replace("{}", &i.to_string()));
        let host = host.as_deref().unwrap_or(&load.target.host);
        let t = Instant::now();
        match one_request(&connector, load.target.addr, host, &load.target.path).await {
            Ok(was_resumed) => {
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                resumed += u64::from(was_resumed);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    (latencies, resumed, errors, first_error)
}

async fn idle(target: TargetArgs, n: usize) -> serde_json::Value {
    let connector = tokio_rustls::TlsConnector::from(client_config(&target.ca, &[b"h2"]));
    let mut held = Vec::with_capacity(n);
    let mut errors = 0;
    for _ in 0..n {
        let attempt = async {
            let tcp = TcpStream::connect(target.addr).await.map_err(|e| e.to_string())?;
            let name = ServerName::try_from(target.host.clone()).map_err(|e| e.to_string())?;
            let tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
            let (mut sender, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tls),
            )
            .await
            .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let req = hyper::Request::builder()
                .uri(format!("https://{}{}", target.host, target.path))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .map_err(|e| e.to_string())?;
            let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let _ = http_body_util::BodyExt::collect(response.into_body()).await;
            Ok::<_, String>(sender)
        };
        match attempt.await {
            Ok(sender) => held.push(sender),
            Err(_) => errors += 1,
        }
    }
    println!("{}", serde_json::json!({"open": held.len(), "errors": errors}));
    // Hold until the harness closes stdin.
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 16];
    while let Ok(n) = stdin.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
    serde_json::json!({"closed": held.len()})
}

fn mint_rate(config: &std::path::Path, concurrent: usize, duration: Duration) -> serde_json::Value {
    let config = tollgate::config::Config::load(config).expect("config");
    let hsm = Arc::new(tollgate::hsm::Hsm::open(&config.hsm));
    hsm.require_up().expect("HSM");
    let state = tollgate::state::StateDir::open(&config.state_dir).expect("state");
    let store = tollgate::pki::CertStore::load(&state).expect("store");
    let keys = tollgate::pki::Keyring::new(&state, Some(&hsm));
    let ca = Arc::new(store.ca(tollgate::pki::CaRole::ForwardTrust, &keys).expect("CA").expect("forward-trust CA"));
    let mut params = rcgen::CertificateParams::new(vec!["origin.test".into()]).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, "origin.test");
    let up = params.self_signed(&rcgen::KeyPair::generate().expect("key")).expect("cert").der().to_vec();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let started = Instant::now();
    let mints: u64 = runtime.block_on(async {
        let loops: Vec<_> = (0..concurrent.max(1))
            .map(|_| {
                let (ca, up) = (ca.clone(), up.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while started.elapsed() < duration {
                        ca.mint_off_runtime("origin.test", &up).await.expect("mint");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let mut total = 0;
        for l in loops {
            total += l.await.expect("mint loop");
        }
        total
    });
    let seconds = started.elapsed().as_secs_f64();
    serde_json::json!({"mints": mints, "concurrent": concurrent, "seconds": seconds, "rate": mints as f64 / seconds})
}

fn sign(
    module: PathBuf,
    token: &str,
    pin_file: PathBuf,
    label: &str,
    threads: usize,
    duration: Duration,
) -> serde_json::Value {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, ObjectClass};
    use cryptoki::session::UserType;
    let pkcs11 = Pkcs11::new(module).expect("load module");
    pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).expect("initialize");
    let slot = pkcs11
        .get_slots_with_token()
        .expect("slots")
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).is_ok_and(|i| i.label().trim_end() == token))
        .expect("token");
    let pin = tollgate::vault::load(&tollgate::config::SecretSource::File(pin_file), "bench token PIN").expect("PIN");
    let login = pkcs11.open_rw_session(slot).expect("session");
    login.login(UserType::User, Some(&pin)).expect("login");
    let key = login
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY), Attribute::Label(label.as_bytes().to_vec())])
        .expect("find")[0];
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b"tollgate bench");
    let started = Instant::now();
    let signs: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                let session = pkcs11.open_rw_session(slot).expect("session");
                scope.spawn(move || {
                    let mut signs = 0u64;
                    while started.elapsed() < duration {
                        session.sign(&Mechanism::Ecdsa, key, digest.as_ref()).expect("sign");
                        signs += 1;
                    }
                    signs
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("signer")).sum()
    });
    let seconds = started.elapsed().as_secs_f64();
    serde_json::json!({"signs": signs, "seconds": seconds, "rate": signs as f64 / seconds})
}
