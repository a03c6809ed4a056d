//! The command line: parses arguments, loads the configuration once, calls one `manage`
//! operation (or runs the service) and renders its typed result as text or JSON (`--json`)
//! through one renderer. Exit codes: 0 ok, 1 runtime failure (or a report that found something
//! wrong), 64 usage or configuration error.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::manage::report::Report;
use crate::manage::{self, Context, ManageError, SecretInput};

/// Exit code for usage and configuration errors (sysexits EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

/// tollgate: TLS interception proxy with its CA and server keys on an HSM (PKCS#11).
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about)]
pub struct Cli {
    /// The configuration file.
    #[arg(long, short = 'c', value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
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
    Set,
}

#[derive(Debug, Subcommand)]
enum MasterKeyCommand {
    /// Whether it is HSM-encrypted, its wrapping key generation, expiry, and whether it opens.
    Status,
    /// Set a new master key: generated, or 64 hex digits read from stdin with --stdin.
    Set {
        #[arg(long)]
        stdin: bool,
    },
    /// Encrypt the master key with an AES wrapping key on the HSM.
    EncryptWithHsm {
        /// Days the master key is valid (1–730).
        #[arg(long)]
        lifetime: u32,
        /// Days before expiry to start warning (1–365, less than the lifetime).
        #[arg(long)]
        reminder: u32,
    },
}

#[derive(Debug, Subcommand)]
enum BypassCommand {
    /// Show the excluded hosts: host, reason, since, expires.
    List,
    /// Remove one host (--host) or every entry.
    Clear {
        #[arg(long)]
        host: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum HsmCommand {
    /// Initialise a software token (SoftHSM) for a configured server: SO PIN from a file, user
    /// PIN from the server's pin_file/pin_env. Hardware HSMs are initialised with vendor tools.
    InitToken {
        /// The `[[hsm.server]]` name.
        #[arg(long)]
        server: String,
        /// File holding the administrator password (SO PIN).
        #[arg(long)]
        so_pin_file: PathBuf,
    },
    /// Check the administrator password (SO PIN) of a server authenticates.
    Setup {
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
        #[arg(long)]
        server: String,
        #[arg(long, conflicts_with = "pin_env")]
        pin_file: Option<PathBuf>,
        #[arg(long)]
        pin_env: Option<String>,
    },
    /// Library, token, mechanisms, sessions and key inventory of every server (never key
    /// material).
    Info,
    /// A new wrapping key generation on the HSM; the master key re-encrypted under it (old
    /// generations are kept).
    RotateWrappingKey,
    /// Write a support file (tar.gz): versions, redacted configuration, HSM status and info,
    /// certificates, master key status and the service's recent log lines. Never a secret.
    SupportBundle {
        /// Where to write it (0600).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Remove every [[hsm.server]] from the configuration and every stored partition password —
    /// nothing else: certificates, the master key and the keys on the HSM stay, and adding the
    /// servers back (add-server, login) restores everything.
    Reset {
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
    /// Add an [[hsm.server]] to the configuration file (checked: the result must load).
    AddServer {
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
    Status,
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Generate a CA key pair on the HSM and its self-signed certificate.
    GenerateCa {
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
        algorithm: String,
        /// Also write the certificate as PEM here.
        #[arg(long)]
        out_cert: Option<PathBuf>,
    },
    /// Import a certificate whose private key is on the HSM (every member) or in a file (then
    /// stored sealed under the master key).
    Import {
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
    },
    /// List certificates with their key status.
    List,
    /// Remove a certificate from the store (its key stays on the HSM). A running service
    /// picks the change up on SIGHUP.
    Delete {
        /// The certificate's name.
        name: String,
    },
    /// Write a certificate as PEM.
    Export {
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs the command line; returns the process exit code. The HSM libraries are closed in order
/// before it returns.
pub fn main() -> i32 {
    let code = command();
    manage::close_hsm();
    crate::logs::flush();
    code
}

fn command() -> i32 {
    harden_process();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let Some(path) = &cli.config else {
        eprintln!("error: --config FILE is required");
        return EXIT_USAGE;
    };
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => return failure(&e, true),
    };
    match cli.command {
        Command::Run { check: false } => run(config),
        Command::Run { check: true } => {
            let checked =
                crate::app::check(&config).map(|()| manage::Done::new(format!("config {} is valid", path.display())));
            render(checked.map_err(ManageError::from), cli.json)
        }
        command => {
            crate::logs::init_stderr();
            dispatch(&Context::new(config), command, cli.json)
        }
    }
}

/// Calls the command's operation and renders its result.
fn dispatch(ctx: &Context, command: Command, json: bool) -> i32 {
    match command {
        Command::Run { .. } => unreachable!("run is not a management operation"),
        Command::Hsm { command } => hsm(ctx, command, json),
        Command::Cert { command } => cert(ctx, command, json),
        Command::MasterKey { command: MasterKeyCommand::Status } => render(manage::master_key::status(ctx), json),
        Command::MasterKey { command: MasterKeyCommand::Set { stdin } } => {
            render(manage::master_key::set(ctx, stdin.then_some(&SecretInput::Stdin)), json)
        }
        Command::MasterKey { command: MasterKeyCommand::EncryptWithHsm { lifetime, reminder } } => {
            render(manage::master_key::encrypt_with_hsm(ctx, lifetime, reminder), json)
        }
        Command::Bypass { command: BypassCommand::List } => render(manage::bypass_list(ctx), json),
        Command::Bypass { command: BypassCommand::Clear { host } } => {
            render(manage::bypass_clear(ctx, host.as_deref()), json)
        }
        Command::ApiToken { command: ApiTokenCommand::Set } => {
            render(manage::set_api_token(ctx, &SecretInput::Stdin), json)
        }
    }
}

fn hsm(ctx: &Context, command: HsmCommand, json: bool) -> i32 {
    match command {
        HsmCommand::InitToken { server, so_pin_file } => {
            render(manage::init_token(ctx, &server, &SecretInput::File(so_pin_file)), json)
        }
        HsmCommand::Setup { server, so_pin_file, so_pin_env } => {
            render(manage::hsm_setup(ctx, &server, &SecretInput::from_options(so_pin_file, so_pin_env)), json)
        }
        HsmCommand::Login { server, pin_file, pin_env } => {
            render(manage::hsm_login(ctx, &server, &SecretInput::from_options(pin_file, pin_env)), json)
        }
        HsmCommand::Info => render(Ok(manage::hsm_info(ctx)), json),
        HsmCommand::Status => render(Ok(manage::hsm_status(ctx)), json),
        HsmCommand::RotateWrappingKey => render(manage::master_key::rotate_wrapping_key(ctx), json),
        HsmCommand::SupportBundle { out } => render(manage::support_bundle(ctx, &out), json),
        HsmCommand::Reset { yes } => render(manage::servers::reset(ctx, yes), json),
        HsmCommand::AddServer { name, module, token, pin_file, pin_env, address } => {
            let server = manage::servers::NewServer {
                name: &name,
                module: &module,
                token: &token,
                pin_file: pin_file.as_deref(),
                pin_env: pin_env.as_deref(),
                address: address.as_deref(),
            };
            render(manage::servers::add_server(ctx, &server), json)
        }
    }
}

fn cert(ctx: &Context, command: CertCommand, json: bool) -> i32 {
    match command {
        CertCommand::GenerateCa { name, on_hsm: _, forward_trust, forward_untrust: _, algorithm, out_cert } => {
            let ca = manage::NewCa { name: &name, algorithm: &algorithm, forward_trust, out_cert: out_cert.as_deref() };
            render(manage::generate_ca(ctx, &ca), json)
        }
        CertCommand::Import { name, cert, key, key_on_hsm: _, key_id, forward_trust, forward_untrust, inbound } => {
            let key = match &key {
                Some(file) => manage::ImportKey::File(file),
                None => manage::ImportKey::Hsm { id: key_id.as_deref() },
            };
            let import = manage::Import { name: &name, cert: &cert, key, forward_trust, forward_untrust, inbound };
            render(manage::import_cert(ctx, import), json)
        }
        CertCommand::List => render(manage::cert_list(ctx), json),
        CertCommand::Delete { name } => render(manage::delete_cert(ctx, &name), json),
        CertCommand::Export { name, out } => render(manage::export_cert(ctx, &name, &out), json),
    }
}

/// The one renderer: a result as text or JSON on stdout, or its error on stderr; the exit code.
fn render<R: Report>(result: Result<R, ManageError>, json: bool) -> i32 {
    let report = match result {
        Ok(report) => report,
        Err(e) => return failure(&e, e.is_usage()),
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => return failure(&e, false),
        }
    } else {
        print!("{}", report.human());
    }
    i32::from(report.failed())
}

/// Reports a failure on stderr: exit code 64 when the operator's input was at fault, else 1.
fn failure(error: &dyn std::fmt::Display, usage: bool) -> i32 {
    eprintln!("error: {error}");
    if usage { EXIT_USAGE } else { 1 }
}

/// `tollgate run`: the service, until SIGTERM.
fn run(config: Config) -> i32 {
    if let Err(e) = crate::logs::init(&config.log) {
        return failure(&e, true);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return failure(&format!("starting the runtime: {e}"), false),
    };
    let result = runtime.block_on(crate::app::run(config));
    crate::app::stop_runtime(runtime);
    if let Err(e) = &result {
        tracing::error!(error = %e, "tollgate stopped");
    }
    match result {
        Ok(()) => 0,
        Err(e) => failure(&e, e.is_usage()),
    }
}

/// Keeps the secrets this process holds (PINs, the master key, software keys) out of core
/// dumps, and away from debuggers and /proc readers running as the same user.
fn harden_process() {
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
    let _ = nix::sys::prctl::set_dumpable(false);
}
