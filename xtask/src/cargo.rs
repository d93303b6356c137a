//! Running cargo from inside `cargo xtask`: the nested command's environment, the target
//! directory, and the controller binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::Result;

/// The cargo that runs us (`cargo run` sets CARGO), or the one on PATH.
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

/// A cargo command for the workspace at `repo`, without the variables that cargo sets for the
/// programs it runs. Under `cargo xtask` (a `cargo run`) this process has CARGO_MANIFEST_DIR,
/// CARGO_PKG_* and the like; some build scripts track them (ring's does CARGO_MANIFEST_DIR), so
/// passing them on would make a nested build and the same command typed in a shell invalidate
/// each other's cache (11 minutes for the static build).
pub fn command(repo: &Path) -> Command {
    program(repo, &cargo())
}

/// [`command`] for another program that runs cargo in turn (`bash tests/run.sh`).
pub fn program(repo: &Path, program: &str) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(set_by_cargo_for_its_programs) {
            cmd.env_remove(&key);
        }
    }
    cmd.current_dir(repo);
    cmd
}

/// The variables cargo sets for the crates it builds and the programs it runs
/// (doc.rust-lang.org/cargo/reference/environment-variables.html), as opposed to the ones that
/// configure cargo (CARGO_HOME, CARGO_TARGET_DIR, CARGO_BUILD_*, …).
fn set_by_cargo_for_its_programs(key: &str) -> bool {
    const PREFIXES: [&str; 3] = ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_EXE_"];
    const NAMES: [&str; 7] = [
        "CARGO",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    NAMES.contains(&key) || PREFIXES.iter().any(|p| key.starts_with(p))
}

/// `cargo metadata`'s target directory (honours CARGO_TARGET_DIR and .cargo/config.toml).
pub fn target_dir(repo: &Path) -> Result<PathBuf> {
    let output = command(repo)
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .arg("--manifest-path")
        .arg(repo.join("Cargo.toml"))
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo ({}): {e}", cargo()))?;
    if !output.status.success() {
        return Err(format!("cargo metadata failed ({})", output.status).into());
    }
    let meta: Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("cargo metadata printed no JSON: {e}"))?;
    match meta["target_directory"].as_str() {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => Err("cargo metadata has no target_directory".into()),
    }
}

/// Runs the controller binary (a dev build) with `args`, its output going to ours.
pub fn run_controller(repo: &Path, args: &[&str]) -> Result<()> {
    let status = command(repo)
        .args(["run", "--quiet", "--package", "recording-canary"])
        .args(["--bin", "recording-canary", "--"])
        .args(args)
        .status()
        .map_err(|e| format!("cannot run cargo ({}): {e}", cargo()))?;
    if !status.success() {
        return Err(format!("recording-canary {} failed ({status})", args.join(" ")).into());
    }
    Ok(())
}

/// The `executable` of the last `compiler-artifact` message for the binary `name` in cargo's
/// `--message-format=json` output.
pub fn executable_from_messages(messages: &str, name: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nested_cargo_drops_what_cargo_sets_for_its_programs_only() {
        for set in [
            "CARGO",
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_VERSION",
            "CARGO_BIN_EXE_x",
            "OUT_DIR",
        ] {
            assert!(set_by_cargo_for_its_programs(set), "{set}");
        }
        for config in [
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_JOBS",
            "PATH",
            "HOME",
        ] {
            assert!(!set_by_cargo_for_its_programs(config), "{config}");
        }
    }

    #[test]
    fn the_cargo_message_for_our_binary_gives_its_path() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"serde"},"executable":null}
{"reason":"compiler-artifact","target":{"name":"recording-canary","kind":["bin"]},"executable":"/t/x86_64-unknown-linux-gnu/release/recording-canary"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executable_from_messages(messages, "recording-canary"),
            Some(PathBuf::from(
                "/t/x86_64-unknown-linux-gnu/release/recording-canary"
            ))
        );
        assert_eq!(executable_from_messages(messages, "other"), None);
        assert_eq!(
            executable_from_messages("not json", "recording-canary"),
            None
        );
    }
}
