//! tollgate — a TLS interception proxy whose CA and server private keys live in an HSM
//! reached through PKCS#11.
//!
//! ```text
//! main → cli → app → { proxy, manage }
//! proxy → { policy, pki, telemetry }        manage → { hsm, pki, state }
//! pki → keys                                hsm → keys
//! config, state, telemetry are leaves
//! ```
//!
//! A connection: listener (explicit CONNECT | sni) → `proxy::tls::read_client_hello` →
//! `policy` (tunnel or intercept) → upstream TLS (validated; verdict) → `pki::cache` (mint on a
//! miss: fresh software leaf key, CA signature on the HSM) → client TLS → `proxy::http` relay.

#![forbid(unsafe_code)]

pub mod app;
pub mod cli;
pub mod config;
pub mod hex;
pub mod hsm;
pub mod keys;
pub mod manage;
pub mod net;
pub mod pki;
pub mod policy;
pub mod proxy;
pub mod state;
pub mod telemetry;
pub mod vault;
