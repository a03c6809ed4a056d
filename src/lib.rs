//! tollgate — a TLS interception proxy whose CA and server private keys live in an HSM
//! reached through PKCS#11.
//!
//! ```text
//! main → cli → { app, manage, logs, config }
//! app → { proxy, manage, hsm, pki, vault, state, logs, telemetry, config }
//! manage → { hsm, pki, vault, proxy::{bypass, respond}, state, logs, telemetry, config }
//! proxy → { policy, icap, pki, hsm::WaitLimit, net, keys, body, telemetry, config }
//! icap → { body, config }
//! pki → { hsm, vault, keys, state, telemetry }       policy → { config, net, keys, telemetry }
//! hsm → { vault, keys, telemetry, config }            vault → { config, state, keys, hex }
//! telemetry → logs                                  logs → config
//! leaves: config, state, keys, net, hex, body             (no cycle: ../shared/tools/import-cycles.py)
//! ```
//!
//! A connection: listener (explicit CONNECT | sni | transparent | inbound) →
//! `proxy::tls::read_client_hello` → `policy` (tunnel or intercept) → upstream TLS
//! (`net` dials: cached resolution, Happy Eyeballs, deny list; certificate validated, verdict) →
//! `pki::cache` (mint on a miss: fresh software leaf key, CA signature on an HSM worker) →
//! client TLS → `proxy::http` relay. Whatever tollgate answers itself (a refusal page, a TLS
//! alert, an API error) comes from `proxy::respond`. Every command of the CLI and every
//! route of the management API is one `manage` operation.

#![forbid(unsafe_code)]

pub mod app;
pub mod body;
pub mod busy_poll;
pub mod cli;
pub mod config;
pub mod hex;
pub mod hsm;
pub mod icap;
pub mod keys;
pub mod logs;
pub mod manage;
pub mod net;
pub mod pki;
pub mod policy;
pub mod proxy;
pub mod state;
pub mod telemetry;
pub mod vault;
