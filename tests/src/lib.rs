//! End-to-end test support: namespaces, the lab topology, backend servers and clients, and the
//! daemons (Redis, etcd) tests start. Used by
//! the tests in `tests/` and by the demo (`cargo xtask demo`).
pub mod daemons;
pub mod fleet;
pub mod lab;
pub mod netns;
pub mod server;
