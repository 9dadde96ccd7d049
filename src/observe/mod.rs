//! What an operator sees of a running server: Prometheus metrics ([`metrics`], served by
//! [`http`] on `metrics.listen`) and the delivery log ([`log`]: one line per recipient and
//! attempt in Postfix's shape).

pub mod http;
pub mod log;
pub mod metrics;
