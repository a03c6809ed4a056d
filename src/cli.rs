//! The command line: parses arguments, calls one operation, renders its result as a table or
//! as JSON (`--json`). Exit codes: 0 ok, 1 runtime failure, 64 usage or configuration error.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::keys::KeyAlgorithm;
use crate::manage;
use crate::pki::{CaRole, KeyLocation};

/// Exit code for usage and configuration errors (sysexits EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

/// tollgate: TLS interception proxy with its CA and server keys on an HSM (PKCS#11).
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Validate the configuration and exit.
        #[arg(long)]
        check: bool,
    },
    /// HSM servers.
    Hsm {
        #[command(subcommand)]
        command: HsmCommand,
    },
    /// Certificates and CA keys.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// The master key that encrypts stored secrets.
    MasterKey {
        #[command(subcommand)]
        command: MasterKeyCommand,
    },
    /// Hosts excluded from decryption because their clients pin certificates (the running
    /// service's learned bypass).
    Bypass {
        #[command(subcommand)]
        command: BypassCommand,
    },
    /// The management API's bearer token, stored sealed under the master key.
    ApiToken {
        #[command(subcommand)]
        command: ApiTokenCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ApiTokenCommand {
    /// Store the token read from stdin (one line, at least 16 printable characters). The
    /// CLI's own requests use it; a running service picks it up on SIGHUP. `[management]
    /// token_file`, when configured, takes precedence.
    Set {
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
enum MasterKeyCommand {
    /// Whether it is HSM-encrypted, its wrapping key generation, expiry, and whether it opens.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
    },
    /// Set a new master key: generated, or 64 hex digits read from stdin with --stdin.
    Set {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        stdin: bool,
        #[arg(long)]
        json: bool,
    },
    /// Encrypt the master key with an AES wrapping key on the HSM.
    EncryptWithHsm {
        #[command(flatten)]
        config: ConfigArg,
        /// Days the master key is valid (1–730).
        #[arg(long)]
        lifetime: u32,
        /// Days before expiry to start warning (1–365, less than the lifetime).
        #[arg(long)]
        reminder: u32,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum BypassCommand {
    /// Show the excluded hosts: host, reason, since, expires.
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
    },
    /// Remove one host (--host) or every entry.
    Clear {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        host: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum HsmCommand {
    /// Initialise a software token (SoftHSM) for a configured server: SO PIN from a file, user
    /// PIN from the server's pin_file/pin_env. Hardware HSMs are initialised with vendor tools.
    InitToken {
        #[command(flatten)]
        config: ConfigArg,
        /// The `[[hsm.server]]` name.
        #[arg(long)]
        server: String,
        /// File holding the administrator password (SO PIN).
        #[arg(long)]
        so_pin_file: PathBuf,
    },
    /// Check the administrator password (SO PIN) of a server authenticates.
    Setup {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        server: String,
        /// File holding the SO PIN.
        #[arg(long, conflicts_with = "so_pin_env", required_unless_present = "so_pin_env")]
        so_pin_file: Option<PathBuf>,
        /// Environment variable holding the SO PIN.
        #[arg(long)]
        so_pin_env: Option<String>,
    },
    /// Check a server's partition password (user PIN) and store it sealed for the service
    /// (unless the server has pin_file/pin_env). Read from a file, a variable or stdin — never
    /// from the command line.
    Login {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        server: String,
        #[arg(long, conflicts_with = "pin_env")]
        pin_file: Option<PathBuf>,
        #[arg(long)]
        pin_env: Option<String>,
    },
    /// Library, token, mechanisms, sessions and key inventory of every server (never key
    /// material).
    Info {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
    },
    /// A new wrapping key generation on the HSM; the master key re-encrypted under it (old
    /// generations are kept).
    RotateWrappingKey {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
    },
    /// Write a support file (tar.gz): versions, redacted configuration, HSM status and info,
    /// certificates, master key status and the service's recent log lines. Never a secret.
    SupportBundle {
        #[command(flatten)]
        config: ConfigArg,
        /// Where to write it (0600).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Remove every [[hsm.server]] from the configuration and every stored partition password —
    /// nothing else: certificates, the master key and the keys on the HSM stay, and adding the
    /// servers back (add-server, login) restores everything.
    Reset {
        #[command(flatten)]
        config: ConfigArg,
        /// Confirm.
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
    /// Add an [[hsm.server]] to the configuration file (checked: the result must load).
    AddServer {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        name: String,
        /// The PKCS#11 library.
        #[arg(long, value_name = "PATH")]
        module: PathBuf,
        /// Token (partition) label.
        #[arg(long)]
        token: String,
        #[arg(long, conflicts_with = "pin_env")]
        pin_file: Option<PathBuf>,
        #[arg(long)]
        pin_env: Option<String>,
        /// Informational network address of the HSM.
        #[arg(long)]
        address: Option<String>,
    },
    /// Connect to every HSM server and show its state.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Generate a CA key pair on the HSM and its self-signed certificate.
    GenerateCa {
        #[command(flatten)]
        config: ConfigArg,
        /// Name in the certificate store (also the key label on the token).
        #[arg(long)]
        name: String,
        /// Generate the key on the HSM (the only location supported for CAs).
        #[arg(long, required = true)]
        on_hsm: bool,
        /// Make it the forward-trust CA.
        #[arg(long, conflicts_with = "forward_untrust", required_unless_present = "forward_untrust")]
        forward_trust: bool,
        /// Make it the forward-untrust CA.
        #[arg(long)]
        forward_untrust: bool,
        /// Key algorithm: ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072.
        #[arg(long, default_value = "ecdsa-p256")]
        algorithm: KeyAlgorithm,
        /// Also write the certificate as PEM here.
        #[arg(long)]
        out_cert: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Import a certificate whose private key is on the HSM (every member) or in a file (then
    /// stored sealed under the master key).
    Import {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        name: String,
        /// PEM file: the certificate, then its chain.
        #[arg(long)]
        cert: PathBuf,
        /// The private key, PEM or DER (PKCS#8, SEC1 or PKCS#1): kept in software, sealed
        /// under the master key.
        #[arg(long, value_name = "FILE", conflicts_with = "key_on_hsm", required_unless_present = "key_on_hsm")]
        key: Option<PathBuf>,
        /// The private key is on the HSM: found by the certificate's public key, or --key-id.
        #[arg(long)]
        key_on_hsm: bool,
        /// CKA_ID of the private key, hex.
        #[arg(long, requires = "key_on_hsm")]
        key_id: Option<String>,
        #[arg(long)]
        forward_trust: bool,
        #[arg(long, conflicts_with = "forward_trust")]
        forward_untrust: bool,
        /// Host names served with it on inbound listeners, comma-separated.
        #[arg(long, value_delimiter = ',')]
        inbound: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// List certificates with their key status.
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
    },
    /// Remove a certificate from the store (its key stays on the HSM). A running service
    /// picks the change up on SIGHUP.
    Delete {
        #[command(flatten)]
        config: ConfigArg,
        /// The certificate's name.
        name: String,
    },
    /// Write a certificate as PEM.
    Export {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
struct ConfigArg {
    /// The configuration file.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    harden_process();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    match cli.command {
        Command::Run { config, check } => run(&config.config, check),
        Command::Hsm { command } => hsm(command),
        Command::Cert { command } => cert(command),
        Command::Bypass { command } => bypass(command),
        Command::MasterKey { command } => master_key(command),
        Command::ApiToken { command: ApiTokenCommand::Set { config } } => api_token_set(&config.config),
    }
}

/// Keeps the secrets this process holds (PINs, the master key, software keys) out of core
/// dumps, and away from debuggers and /proc readers running as the same user.
fn harden_process() {
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
    let _ = nix::sys::prctl::set_dumpable(false);
}

fn api_token_set(config: &std::path::Path) -> i32 {
    crate::telemetry::init(false);
    let config = match load(config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let mut line = zeroize::Zeroizing::new(String::new());
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("error: reading the token from stdin: {e}");
        return EXIT_USAGE;
    }
    let token = secrecy::SecretString::from(line.trim_end_matches(['\r', '\n']).to_string());
    match manage::set_api_token(&config, &token) {
        Ok(()) => {
            println!("API token stored sealed under the master key (a running service picks it up on SIGHUP)");
            0
        }
        Err(manage::ManageError::Usage(e)) => {
            eprintln!("error: {e}");
            EXIT_USAGE
        }
        Err(e) => fail(e),
    }
}

fn master_key(command: MasterKeyCommand) -> i32 {
    crate::telemetry::init(false);
    let (config, json, result) = match command {
        MasterKeyCommand::Status { config, json } => (config, json, None),
        MasterKeyCommand::Set { config, stdin, json } => (config, json, Some((stdin, None))),
        MasterKeyCommand::EncryptWithHsm { config, lifetime, reminder, json } => {
            (config, json, Some((false, Some((lifetime, reminder)))))
        }
    };
    let config = match load(&config.config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let outcome = match result {
        None => manage::master_key::status(&config),
        Some((_, Some((lifetime, reminder)))) => manage::master_key::encrypt_with_hsm(&config, lifetime, reminder),
        Some((stdin, None)) => {
            let key = if stdin {
                match read_master_key() {
                    Ok(key) => Some(key),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return EXIT_USAGE;
                    }
                }
            } else {
                None
            };
            manage::master_key::set(&config, key)
        }
    };
    report_master_key(outcome, json)
}

fn report_master_key(outcome: Result<crate::vault::master::MasterKeyStatus, manage::ManageError>, json: bool) -> i32 {
    match outcome {
        Ok(status) if json => {
            print_json(&status);
            i32::from(status.configured && !status.opens)
        }
        Ok(status) => {
            println!(
                "master key: {}; HSM-encrypted: {}; wrapping key generation: {}; expires: {}{}",
                if status.configured { if status.opens { "opens" } else { "does NOT open" } } else { "not set" },
                status.hsm_encrypted,
                status.wrapping_key_generation,
                status.expires_at.as_deref().unwrap_or("never"),
                if status.expired {
                    " — EXPIRED"
                } else if status.reminder {
                    " — inside the reminder window"
                } else {
                    ""
                }
            );
            if let Some(e) = &status.error {
                println!("error: {e}");
            }
            i32::from(status.configured && !status.opens)
        }
        Err(manage::ManageError::Usage(e)) => {
            eprintln!("error: {e}");
            EXIT_USAGE
        }
        Err(e) => fail(e),
    }
}

/// 64 hex digits from stdin.
fn read_master_key() -> Result<zeroize::Zeroizing<[u8; 32]>, String> {
    let mut line = zeroize::Zeroizing::new(String::new());
    std::io::stdin().read_line(&mut line).map_err(|e| format!("reading stdin: {e}"))?;
    let bytes = zeroize::Zeroizing::new(parse_hex(line.trim())?);
    let key: [u8; 32] =
        bytes.as_slice().try_into().map_err(|_| "the master key must be 64 hex digits (32 bytes)".to_string())?;
    Ok(zeroize::Zeroizing::new(key))
}

fn bypass(command: BypassCommand) -> i32 {
    let (config, method, path, json) = match command {
        BypassCommand::List { config, json } => (config, "GET", "/api/v1/bypass".to_string(), json),
        BypassCommand::Clear { config, host } => {
            let path = match host {
                Some(host) => format!("/api/v1/bypass?host={}", host.to_ascii_lowercase()),
                None => "/api/v1/bypass".to_string(),
            };
            (config, "DELETE", path, true)
        }
    };
    let config = match load(&config.config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match manage::api_request(&config, method, &path) {
        Ok((200, body)) if json => {
            print!("{body}");
            0
        }
        Ok((200, body)) => {
            let entries: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
            println!("{:<40} {:<30} {:<22} EXPIRES", "HOST", "REASON", "SINCE");
            for e in entries {
                println!(
                    "{:<40} {:<30} {:<22} {}",
                    e["host"].as_str().unwrap_or(""),
                    e["reason"].as_str().unwrap_or(""),
                    e["since"].as_str().unwrap_or(""),
                    e["expires"].as_str().unwrap_or("")
                );
            }
            0
        }
        Ok((status, body)) => fail(format!("management API answered {status}: {}", body.trim())),
        Err(e) => fail(e),
    }
}

fn load(path: &Path) -> Result<Config, i32> {
    Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        EXIT_USAGE
    })
}

fn run(path: &Path, check: bool) -> i32 {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if check {
        return match crate::app::check(&config) {
            Ok(()) => {
                println!("config {} is valid", path.display());
                0
            }
            Err(e) => {
                eprintln!("error: {e}");
                EXIT_USAGE
            }
        };
    }
    crate::telemetry::init(true);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(crate::app::run(config)) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "tollgate stopped");
            eprintln!("error: {e}");
            if e.is_usage() { EXIT_USAGE } else { 1 }
        }
    }
}

fn hsm(command: HsmCommand) -> i32 {
    crate::telemetry::init(false);
    match command {
        HsmCommand::InitToken { config, server, so_pin_file } => {
            let config = match load(&config.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let Some(server_config) = config.hsm.servers.iter().find(|s| s.name == server) else {
                eprintln!("error: no [[hsm.server]] named {server:?} in {}", config.path.display());
                return EXIT_USAGE;
            };
            match crate::hsm::init_token(server_config, &crate::config::SecretSource::File(so_pin_file)) {
                Ok(()) => {
                    println!("initialised token {:?} for hsm server {server}", server_config.token);
                    0
                }
                Err(e) => fail(e),
            }
        }
        HsmCommand::Setup { config, server, so_pin_file, so_pin_env } => {
            let config = match load(&config.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let source = match (so_pin_file, so_pin_env) {
                (Some(file), _) => crate::config::SecretSource::File(file),
                (None, Some(var)) => crate::config::SecretSource::Env(var),
                (None, None) => unreachable!("clap requires one"),
            };
            match manage::hsm_setup(&config, &server, &source) {
                Ok(()) => {
                    println!("hsm server {server}: administrator password authenticated");
                    0
                }
                Err(e) => fail(e),
            }
        }
        HsmCommand::Login { config, server, pin_file, pin_env } => {
            let config = match load(&config.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let pin = match read_pin(pin_file, pin_env) {
                Ok(pin) => pin,
                Err(e) => {
                    eprintln!("error: {e}");
                    return EXIT_USAGE;
                }
            };
            match manage::hsm_login(&config, &server, &pin) {
                Ok(manage::LoginOutcome::Stored(path)) => {
                    println!("hsm server {server}: logged in; partition password sealed in {}", path.display());
                    0
                }
                Ok(manage::LoginOutcome::Configured(source)) => {
                    println!(
                        "hsm server {server}: logged in; the service reads its password from {source}, nothing stored"
                    );
                    0
                }
                Err(e) => fail(e),
            }
        }
        HsmCommand::Info { config, json } => {
            let config = match load(&config.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let info = manage::hsm_info(&config);
            if json {
                print_json(&info);
            } else {
                for s in &info.servers {
                    println!("== {} ({}) — {}", s.status.name, s.status.token, s.status.state);
                    if let Some(l) = &s.library {
                        println!(
                            "   library: {} {} (PKCS#11 {})",
                            l.manufacturer, l.library_version, l.cryptoki_version
                        );
                    }
                    if let Some(t) = &s.token {
                        println!(
                            "   token:   {} {} serial {} firmware {} sessions {:?}/{}",
                            t.manufacturer, t.model, t.serial, t.firmware_version, t.sessions, t.max_sessions
                        );
                    }
                    println!("   mechanisms: {}", s.mechanisms.len());
                    for k in &s.keys {
                        println!(
                            "   key {:<28} {:<7} {:<4} id {} sensitive {:?} extractable {:?}",
                            k.label, k.class, k.key_type, k.id, k.sensitive, k.extractable
                        );
                    }
                    if let Some(e) = &s.error {
                        println!("   error: {e}");
                    }
                }
                println!("HA: {}", if info.ha.enabled { "enabled" } else { "disabled" });
            }
            i32::from(info.servers.iter().any(|s| !s.status.up))
        }
        HsmCommand::RotateWrappingKey { config, json } => {
            let config = match load(&config.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            report_master_key(manage::master_key::rotate_wrapping_key(&config), json)
        }
        HsmCommand::Reset { config, yes, json } => {
            if !yes {
                eprintln!(
                    "error: hsm reset removes every [[hsm.server]] from {} and the stored partition passwords; \
                     pass --yes to do it",
                    config.config.display()
                );
                return EXIT_USAGE;
            }
            let config = match load(&config.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            match manage::servers::reset(&config) {
                Ok(report) if json => {
                    print_json(&report);
                    0
                }
                Ok(report) => {
                    println!(
                        "removed HSM servers [{}] and {} stored partition password(s); add them back with \
                         `tollgate hsm add-server` (and `tollgate hsm login`)",
                        report.servers.join(", "),
                        report.sealed_pins.len()
                    );
                    0
                }
                Err(e) => fail(e),
            }
        }
        HsmCommand::AddServer { config, name, module, token, pin_file, pin_env, address } => {
            let config = match load(&config.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let server = manage::servers::NewServer {
                name: &name,
                module: &module,
                token: &token,
                pin_file: pin_file.as_deref(),
                pin_env: pin_env.as_deref(),
                address: address.as_deref(),
            };
            match manage::servers::add_server(&config, &server) {
                Ok(()) => {
                    println!("added [[hsm.server]] {name:?} to {}", config.path.display());
                    0
                }
                Err(e @ manage::ManageError::Usage(_)) => {
                    eprintln!("error: {e}");
                    EXIT_USAGE
                }
                Err(e) => fail(e),
            }
        }
        HsmCommand::SupportBundle { config, out } => {
            let config = match load(&config.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            match manage::support_bundle(&config, &out) {
                Ok(how) => {
                    println!("wrote {} ({how})", out.display());
                    0
                }
                Err(e) => fail(e),
            }
        }
        HsmCommand::Status { config, json } => {
            let config = match load(&config.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let status = manage::hsm_status(&config);
            if json {
                print_json(&status);
            } else {
                if status.servers.is_empty() {
                    println!("\u{1F534} no HSM server is configured (tollgate hsm add-server)");
                }
                println!("{:<12} {:<20} {:<18} {:<4} STATE", "SERVER", "TOKEN", "SERIAL", "UP");
                for s in &status.servers {
                    let light = if s.up { "\u{1F7E2}" } else { "\u{1F534}" };
                    println!(
                        "{:<12} {:<20} {:<18} {:<4} {light} {}",
                        s.name,
                        s.token,
                        s.serial.as_deref().unwrap_or("-"),
                        s.up,
                        s.state
                    );
                }
                println!("HA: {}", if status.ha.enabled { "enabled" } else { "disabled (one server)" });
            }
            i32::from(status.servers.is_empty() || status.servers.iter().any(|s| !s.up))
        }
    }
}

fn cert(command: CertCommand) -> i32 {
    crate::telemetry::init(false);
    match command {
        CertCommand::GenerateCa {
            config,
            name,
            on_hsm: _,
            forward_trust,
            forward_untrust: _,
            algorithm,
            out_cert,
            json,
        } => {
            let config = match load(&config.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let role = if forward_trust { CaRole::ForwardTrust } else { CaRole::ForwardUntrust };
            match manage::generate_ca(&config, &name, algorithm, role, out_cert.as_deref()) {
                Ok(entry) => {
                    if json {
                        print_json(&serde_json::json!({"name": entry.name, "algorithm": entry.algorithm,
                            "forward_trust": entry.forward_trust, "forward_untrust": entry.forward_untrust, "key": "hsm"}));
                    } else {
                        println!(
                            "generated {} CA {} ({}) with its key on the HSM",
                            role_name(role),
                            entry.name,
                            entry.algorithm
                        );
                    }
                    0
                }
                Err(e) => fail(e),
            }
        }
        CertCommand::Import {
            config,
            name,
            cert,
            key,
            key_on_hsm: _,
            key_id,
            forward_trust,
            forward_untrust,
            inbound,
            json,
        } => {
            let config = match load(&config.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let id = match key_id.as_deref().map(parse_hex).transpose() {
                Ok(id) => id,
                Err(e) => {
                    eprintln!("error: --key-id: {e}");
                    return EXIT_USAGE;
                }
            };
            let roles = crate::pki::Roles { forward_trust, forward_untrust, inbound };
            let imported = match &key {
                Some(key) => manage::import_software(&config, &name, &cert, key, &roles),
                None => manage::import_on_hsm(&config, &name, &cert, id.as_deref(), &roles),
            };
            match imported {
                Ok(entry) => {
                    let (key, label) = match &entry.key {
                        KeyLocation::Hsm { label } => ("hsm", Some(label.as_str())),
                        KeyLocation::Software { .. } => ("software", None),
                    };
                    if json {
                        print_json(
                            &serde_json::json!({"name": entry.name, "key": key, "label": label, "algorithm": entry.algorithm}),
                        );
                    } else if let Some(label) = label {
                        println!("imported {} ({}), key found on the HSM as {label:?}", entry.name, entry.algorithm);
                    } else {
                        println!("imported {} ({}), key sealed under the master key", entry.name, entry.algorithm);
                    }
                    0
                }
                Err(e) => fail(e),
            }
        }
        CertCommand::List { config, json } => {
            let config = match load(&config.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            match manage::cert_list(&config) {
                Ok(rows) if json => {
                    print_json(&rows);
                    0
                }
                Ok(rows) => {
                    println!("{:<24} {:<8} {:<6} {:<8} SUBJECT", "NAME", "KEY", "TRUST", "UNTRUST");
                    for r in rows {
                        let icon = if r.key == "error" { "\u{26A0}" } else { "\u{1F512}" };
                        println!(
                            "{:<24} {icon} {:<6} {:<6} {:<8} {}{}",
                            r.name,
                            r.key,
                            r.forward_trust,
                            r.forward_untrust,
                            r.subject,
                            r.reason.map(|e| format!(" ({e})")).unwrap_or_default()
                        );
                    }
                    0
                }
                Err(e) => fail(e),
            }
        }
        CertCommand::Delete { config, name } => {
            let config = match load(&config.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            match manage::delete_cert(&config, &name) {
                Ok(entry) => {
                    println!("deleted certificate {} (its key stays on the HSM)", entry.name);
                    0
                }
                Err(e) => fail(e),
            }
        }
        CertCommand::Export { config, name, out } => {
            let config = match load(&config.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            match manage::export_cert(&config, &name, &out) {
                Ok(()) => 0,
                Err(e) => fail(e),
            }
        }
    }
}

/// A PIN from a file, a variable, or the first line of stdin.
fn read_pin(file: Option<PathBuf>, var: Option<String>) -> Result<secrecy::SecretString, String> {
    let source = match (file, var) {
        (Some(file), _) => crate::config::SecretSource::File(file),
        (None, Some(var)) => crate::config::SecretSource::Env(var),
        (None, None) => {
            let mut line = zeroize::Zeroizing::new(String::new());
            std::io::stdin().read_line(&mut line).map_err(|e| format!("reading the PIN from stdin: {e}"))?;
            let pin = line.trim_end_matches(['\r', '\n']);
            if pin.is_empty() {
                return Err("no PIN on stdin (or use --pin-file / --pin-env)".into());
            }
            return Ok(secrecy::SecretString::from(pin.to_string()));
        }
    };
    crate::vault::load(&source, "partition password").map_err(|e| e.to_string())
}

/// Hex to bytes. Errors never repeat the input: it may be a master key.
fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim_start_matches("0x");
    if text.is_empty() {
        return Err("expected hex digits, got none".into());
    }
    crate::hex::decode(text)
}

fn role_name(role: CaRole) -> &'static str {
    match role {
        CaRole::ForwardTrust => "forward-trust",
        CaRole::ForwardUntrust => "forward-untrust",
    }
}

fn fail(e: impl std::fmt::Display) -> i32 {
    eprintln!("error: {e}");
    1
}

fn print_json<T: serde::Serialize>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).expect("report types serialise"));
}
