//! `cargo xtask test`, `cargo xtask e2e`, `cargo xtask bench`: the whole test suite, the
//! end-to-end tests against a running cluster, one benchmark. Each runs one command, printed
//! first, from the repository root; docs/development.md tells what each needs.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Result, cargo};

/// The benchmarks, `benches/<name>.rs` (`[[bench]]` in Cargo.toml; a unit test checks the list).
pub const BENCHES: [&str; 4] = [
    "fleet",
    "memory_per_canary",
    "patch_to_weights",
    "side_by_side",
];

/// `cargo xtask e2e`.
#[derive(Debug, clap::Args)]
pub struct E2eArgs {
    /// The cluster's kubeconfig; also KUBECONFIG for kubectl, helm and the controllers the tests
    /// start (`bash tests/cluster/up.sh NAME` prints it)
    #[arg(long, env = "RC_E2E_KUBECONFIG", value_name = "PATH")]
    kubeconfig: PathBuf,
    /// Test threads, unless the arguments give `--test-threads`
    #[arg(long, env = "RC_TEST_THREADS", default_value_t = 2, value_name = "N")]
    threads: usize,
    /// Test name filters and test-harness options, passed on (`flows::`, `--exact`,
    /// `--test-threads=1`, `--nocapture`, …)
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "TEST ARGS"
    )]
    args: Vec<String>,
}

/// `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The benchmark, `benches/<NAME>.rs`; the cluster ones read RC_E2E_KUBECONFIG and their
    /// settings from the environment (see each file's first lines)
    #[arg(value_name = "NAME", value_parser = BENCHES)]
    name: String,
}

/// `bash tests/run.sh`: formatting, lints, unit tests, the image, and the integration and e2e
/// tests on local control planes it starts and stops (or on RC_KUBECONFIG's cluster).
pub fn test(repo: &Path) -> Result<()> {
    let mut cmd = cargo::program(repo, "bash");
    cmd.arg("tests/run.sh");
    run("test", cmd)
}

/// `cargo test --features failpoints --test e2e -- ARGS --test-threads=N` with RC_E2E_KUBECONFIG
/// and KUBECONFIG set to the cluster's kubeconfig.
pub fn e2e(repo: &Path, args: &E2eArgs) -> Result<()> {
    if !args.kubeconfig.is_file() {
        return Err(format!(
            "{} is not a readable kubeconfig (start a cluster with `bash tests/cluster/up.sh NAME`)",
            args.kubeconfig.display()
        )
        .into());
    }
    let mut cmd = cargo::command(repo);
    cmd.args([
        "test",
        "--package",
        "recording-canary",
        "--features",
        "failpoints",
    ])
    .args(["--test", "e2e", "--"])
    .args(test_harness_args(&args.args, args.threads))
    .env("RC_E2E_KUBECONFIG", &args.kubeconfig)
    .env("KUBECONFIG", &args.kubeconfig);
    run("e2e", cmd)
}

/// `cargo bench --bench NAME`.
pub fn bench(repo: &Path, args: &BenchArgs) -> Result<()> {
    let mut cmd = cargo::command(repo);
    cmd.args([
        "bench",
        "--package",
        "recording-canary",
        "--bench",
        &args.name,
    ]);
    run("bench", cmd)
}

/// The test harness's arguments: the caller's, and `--test-threads=N` unless they give it (the
/// harness refuses it twice).
fn test_harness_args(args: &[String], threads: usize) -> Vec<String> {
    let mut out = args.to_vec();
    if !args.iter().any(|a| a.starts_with("--test-threads")) {
        out.push(format!("--test-threads={threads}"));
    }
    out
}

/// Runs `cmd`, saying which command first; fails if it does.
fn run(task: &str, mut cmd: Command) -> Result<()> {
    let shown = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("xtask {task}: {shown}");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if !status.success() {
        return Err(format!("{shown} failed ({status})").into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_benchmarks_are_the_files_in_benches() {
        let mut found: Vec<String> = std::fs::read_dir(crate::repo().join("benches"))
            .expect("benches/")
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".rs").map(str::to_string)
            })
            .collect();
        found.sort();
        assert_eq!(found, BENCHES);
    }

    #[test]
    fn the_test_threads_are_added_unless_given() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            test_harness_args(&args(&["flows::"]), 2),
            args(&["flows::", "--test-threads=2"])
        );
        assert_eq!(
            test_harness_args(&args(&["flows::", "--test-threads=1"]), 2),
            args(&["flows::", "--test-threads=1"])
        );
        assert_eq!(
            test_harness_args(&args(&["--test-threads", "1"]), 2),
            args(&["--test-threads", "1"])
        );
    }
}
