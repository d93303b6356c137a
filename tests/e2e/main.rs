//! End-to-end tests of `recording-canary` against a real Kubernetes control plane.
//!
//! Each test gets its own namespace and starts its own controller process (the binary built by
//! cargo) watching only that namespace, drives the user's flow with kubectl, and reads the
//! resulting state with kube-rs. Beside every test, a watcher records every revision of the
//! namespace's VirtualServices and DestinationRules and checks make-before-break at the end.
//!
//! Needs RC_E2E_KUBECONFIG (and optionally RC_KUBECTL); `bash tests/run.sh` sets both.

mod adopt;
mod chart;
mod fault_matrix;
mod faults;
mod flows;
mod ha;
mod mbb;
mod modes;
mod propagation;
mod stable_labels;
mod support;
mod validation;

// Network faults between one controller and the apiserver, through a fault-injecting proxy.
mod netfaults;
mod proxy;
