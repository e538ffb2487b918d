//! The lb agent: sources → registry → desired L4 state → BPF maps, with an admin API.
//!
//! Data flow, one folder per step: [`sources`] (lb.toml's validated file, the file watch, the API
//! store, Redis, etcd) feed the [`registry`]; [`control`] (with its health checks) merges them into the
//! desired backends of each VIP and hands them to [`l4`], which plans the map writes (ids, Maglev
//! tables) as a value and carries them out through its dataplane — the only code touching maps
//! and attachments. [`api`] reads and changes it at runtime; [`observe`] (metrics and the access
//! log) watches both tiers; [`agent`] wires everything for `lb run`.
//!
//! No `unsafe` here but in `l4::dataplane`, the module that owns the maps' file descriptors.
#![deny(unsafe_code)]
pub mod agent;
pub mod api;
pub mod bgp;
pub mod cli;
pub mod clock;
pub mod control;
pub mod fuzz;
pub mod l4;
pub mod model;
pub mod observe;
pub mod proxy;
pub mod registry;
pub mod sources;
pub mod tls_files;
