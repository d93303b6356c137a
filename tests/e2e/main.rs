//! End-to-end tests of `recording-canary` against a real Kubernetes control plane.
//!
//! Each test gets its own namespace and starts its own controller process (the binary built by
//! cargo) watching only that namespace, drives the user's flow with kubectl, and reads the
//! resulting state with kube-rs. Beside every test, a watcher records every revision of the
//! namespace's VirtualServices, DestinationRules, EndpointSlices, pods and RecordingCanaries and
//! checks at the end, in etcd order: make before break, waits as long as each canary asks, and
//! weight only on subsets with a Ready endpoint (testkit/src/mbb.rs).
//!
//! Needs RC_E2E_KUBECONFIG (and optionally RC_KUBECTL); `bash tests/run.sh` sets both.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod adopt;
mod chart;
mod endpoints;
mod failpoints;
mod fault_matrix;
mod faults;
mod fences;
mod flows;
mod gateway;
mod ha;
mod modes;
mod propagation;
mod replicas;
mod stable_labels;
mod timebox;
mod validation;

// Network faults between one controller and the apiserver, through a fault-injecting proxy.
mod netfaults;

// The harness, the make-before-break watcher and the fault proxy (testkit/, shared with
// tests/restart.rs), under the names the tests use: `crate::support`, `crate::mbb`, `crate::proxy`.
use testkit::{mbb, proxy, support};
