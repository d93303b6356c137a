//! The process around the controller: the Kubernetes client (counting its requests) and what its
//! error answers mean ([`api_errors`]), Prometheus
//! [`metrics`] and the [`admin`] server, leader election ([`lease`]) and the split of canaries
//! between processes ([`shard`]), the check of the chart's stable-label [`admission`] policy, and
//! giving freed heap pages back to the system ([`memory`]).
//!
//! Layer: talks to the API server; imports [`crate::api`] only. The controller and `main` wire it.

pub mod admin;
pub mod admission;
pub mod api_errors;
pub mod client;
pub mod lease;
pub mod memory;
pub mod metrics;
pub mod shard;
