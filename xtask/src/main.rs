//! `cargo xtask`: this repository's developer commands (the alias is in .cargo/config.toml).
//!
//! ```text
//! cargo xtask image [--out DIR] [--binary PATH] [--no-build] [--target-dir DIR]
//! cargo xtask crd
//! cargo xtask test
//! cargo xtask e2e [--kubeconfig PATH] [--threads N] [TEST ARGS]...
//! cargo xtask bench NAME
//! ```
//!
//! A crate of its own, so that nothing these commands use (gzip, tar, ELF and OCI types) is
//! compiled into the controller, and `cargo build` of the controller does not build them.

mod cargo;
mod dev;
mod image;

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

/// The developer commands of recording-canary.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Builds the container image, an OCI image layout, without a container runtime
    ///
    /// A static build of `recording-canary`, alone in one layer, run as 65532:65532; the same
    /// binary gives the same bytes. See docs/install.md, "The image".
    Image(image::Args),
    /// Prints the CustomResourceDefinition YAML (`recording-canary crd`)
    ///
    /// crds/ holds its output; tests/crd_drift.rs checks that they agree.
    Crd,
    /// Runs every test: `bash tests/run.sh`
    ///
    /// Formatting, lints, unit tests, the image, then the integration and end-to-end tests on
    /// local control planes it builds, starts and stops (RC_KUBECONFIG: on that cluster instead).
    /// Its environment variables are listed at the top of tests/run.sh.
    Test,
    /// Runs end-to-end tests against a running cluster:
    /// `cargo test --features failpoints --test e2e -- [TEST ARGS]`
    ///
    /// For example `cargo xtask e2e flows::canary_at_10 --test-threads=1`. kubectl and helm are
    /// taken from PATH (or RC_KUBECTL, RC_HELM); docs/development.md shows the exports.
    E2e(dev::E2eArgs),
    /// Runs one benchmark: `cargo bench --bench NAME`
    ///
    /// docs/performance.md has their figures and what each needs.
    Bench(dev::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Image(args) => image::run(&args),
        Task::Crd => cargo::run_controller(&repo(), &["crd"]),
        Task::Test => dev::test(&repo()),
        Task::E2e(args) => dev::e2e(&repo(), &args),
        Task::Bench(args) => dev::bench(&repo(), &args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The repository: the workspace root, the parent of this crate. Its path goes into the static
/// build's `--remap-path-prefix`, so it must be the plain path rustc sees (no `..`).
fn repo() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_repository_is_the_workspace_root() {
        assert!(repo().join("Cargo.toml").is_file());
        assert!(repo().join("xtask").is_dir());
    }
}
