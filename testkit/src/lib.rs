//! The test code that recording-canary's test and benchmark targets share, in one crate instead of
//! files compiled into several of them:
//!
//! * [`support`]: the harness every end-to-end test uses (a fresh namespace, its own controller
//!   process, kubectl and kube-rs helpers, deadline-bound waits), in `tests/e2e/` and
//!   `tests/restart.rs`;
//! * [`mbb`]: the make-before-break watcher that runs beside every one of those tests;
//! * [`proxy`]: the fault-injecting TCP proxy between a controller and the apiserver
//!   (`tests/e2e/netfaults.rs`);
//! * [`fleet`]: the fleet driver, shared by `tests/fleet_budget.rs` and `benches/fleet.rs`.
//!
//! It is a dev-dependency of the controller, never a dependency: nothing here is compiled into
//! `recording-canary`. It asserts by panicking, as a test does.

pub mod fleet;
pub mod mbb;
pub mod proxy;
pub mod support;

use std::path::{Path, PathBuf};

/// The controller's binary target, as its Cargo.toml names it.
const BIN: &str = "recording-canary";

/// The controller binary under test: the one cargo built for the test or benchmark running now.
///
/// `env!("CARGO_BIN_EXE_recording-canary")` exists only when the controller package's own tests
/// and benches are compiled, not this crate. But cargo builds the package's binaries before it
/// runs any of its tests or benches, and sets the same `CARGO_BIN_EXE_<name>` in their
/// environment too (cargo 1.95 does): read first, so these tests run exactly the binary that
/// `env!` would name, whatever the target or build directory. A test binary started by hand (or
/// by an older cargo) finds the binary where cargo puts it beside the test's own, as assert_cmd's
/// `cargo_bin` does: `target/<profile>/deps/<test>-<hash>` runs `target/<profile>/recording-canary`.
pub fn controller_bin() -> PathBuf {
    let bin = std::env::var_os(format!("CARGO_BIN_EXE_{BIN}"))
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(beside_the_test)
        .unwrap_or_else(|| panic!("cannot tell where cargo put the {BIN} binary"));
    assert!(
        bin.is_file(),
        "{} is not the {BIN} binary: run the tests with `cargo test` (or `cargo bench`) from the \
         repository, which builds it first",
        bin.display()
    );
    bin
}

/// `target/<profile>/recording-canary` for a test binary `target/<profile>/deps/<test>-<hash>`.
fn beside_the_test() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent()?;
    if dir.ends_with("deps") {
        dir = dir.parent()?;
    }
    Some(dir.join(format!("{BIN}{}", std::env::consts::EXE_SUFFIX)))
}

/// The repository: the workspace root, the parent of this crate.
pub(crate) fn repo_dir() -> PathBuf {
    let testkit = Path::new(env!("CARGO_MANIFEST_DIR"));
    testkit.parent().unwrap_or(testkit).to_path_buf()
}

/// `target/`, derived from the controller binary's path (so that CARGO_TARGET_DIR is honoured):
/// the e2e tests' and the fleet's logs go under it.
pub(crate) fn target_dir() -> PathBuf {
    controller_bin()
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| repo_dir().join("target"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_is_the_workspace_root() {
        assert!(repo_dir().join("Cargo.toml").is_file());
        assert!(repo_dir().join("testkit").is_dir());
    }
}
