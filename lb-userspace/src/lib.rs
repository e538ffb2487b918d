//! The lb agent: configuration → desired L4 state → BPF maps, with an admin API.
//!
//! Data flow, one module per step: [`config`] (validated file) → [`balancer`] (VIPs, backends,
//! Maglev tables via [`maglev`]) → [`dataplane`] (the only code touching maps and attachments);
//! [`api`] changes the balancer at runtime; [`agent`] wires them together for `lb run`.
pub mod agent;
pub mod api;
pub mod balancer;
pub mod config;
pub mod dataplane;
pub mod maglev;
pub mod neighbor;
