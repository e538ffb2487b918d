//! The lb agent: sources → registry → desired L4 state → BPF maps, with an admin API.
//!
//! Data flow, one module per step: [`config`] (validated file) and [`providers`] (file watch, API
//! store, …) feed the [`registry`]; [`health`] checks backends; [`control`] merges them into the
//! desired backends of each VIP and hands them to [`l4`], which plans the map writes (ids, Maglev
//! tables) as a value and carries them out through its dataplane — the only code touching maps
//! and attachments. [`api`] reads and changes it at runtime; [`metrics`] and [`access_log`]
//! observe both tiers; [`agent`] wires everything for `lb run`.
//!
//! No `unsafe` here but in `l4::dataplane`, the module that owns the maps' file descriptors.
#![deny(unsafe_code)]
pub mod access_log;
pub mod agent;
pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod health;
pub mod l4;
pub mod metrics;
pub mod model;
pub mod providers;
pub mod proxy;
pub mod registry;
pub mod tls_files;
