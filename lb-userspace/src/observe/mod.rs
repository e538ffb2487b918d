//! Observability that is not a tier's own: [`metrics`] renders every tier's snapshot in the
//! Prometheus text format, [`access_log`] writes the proxy's requests. Each tier keeps its own
//! instruments (`proxy::obs`, `control::ControlObs`, the dataplane's per-CPU counters).

pub mod access_log;
pub mod metrics;
