//! `cargo xtask image`: builds the controller's container image without a container runtime.
//!
//! It builds `recording-canary` statically (glibc, `+crt-static`; there is no musl target on the
//! build machines), checks that the result is a static x86-64 ELF, and writes an OCI image layout
//! (`oci-layout`, `index.json`, `blobs/sha256/…`) holding one gzip layer with exactly one file,
//! `/recording-canary`, run as the non-root user 65532:65532. The same binary and the same
//! `SOURCE_DATE_EPOCH` give a byte-identical layout ([`layout`]).
//!
//! Push the layout with skopeo, crane or oras (it prints the commands); see docs/install.md,
//! "The image".

mod layout;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader};

use crate::{Result, cargo};
use layout::Layout;

/// The file in the image, at its root, and its entrypoint; also the package and binary built.
const BIN_NAME: &str = "recording-canary";
/// The chart's default `image.repository` (charts/recording-canary/values.yaml; tests/image.rs
/// checks that they agree).
const IMAGE_REPOSITORY: &str = "ghcr.io/recording-canary/recording-canary";
/// The workspace's version, the controller's (Cargo.toml `[workspace.package]`), which is the
/// chart's `appVersion` (tests/image.rs checks it): the tag.
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The only platform built: the config says linux/amd64, so the ELF must be x86-64.
const RUST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// `cargo xtask image`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the OCI image layout; an earlier layout there is replaced
    /// [default: <cargo target dir>/oci/recording-canary]
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Package this file instead of building (it must be a static x86-64 ELF)
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// Do not run cargo; package <target dir>/x86_64-unknown-linux-gnu/release/recording-canary
    /// from an earlier run
    #[arg(long, conflicts_with = "binary")]
    no_build: bool,
    /// The static build's target directory [default: cargo's, CARGO_TARGET_DIR or target/]
    #[arg(long, value_name = "DIR")]
    target_dir: Option<PathBuf>,
    /// The file's mtime and the image's `created`, in seconds since 1970; empty is 0
    /// (reproducible-builds.org/specs/source-date-epoch)
    #[arg(
        long,
        env = "SOURCE_DATE_EPOCH",
        value_name = "SECONDS",
        default_value = "0",
        value_parser = parse_epoch
    )]
    source_date_epoch: u64,
}

/// Seconds since 1970, as SOURCE_DATE_EPOCH gives them; an empty (or blank) value is 0.
fn parse_epoch(s: &str) -> Result<u64, String> {
    match s.trim() {
        "" => Ok(0),
        s => s
            .parse()
            .map_err(|e| format!("{s:?} is not a number of seconds since 1970: {e}")),
    }
}

fn say(msg: impl std::fmt::Display) {
    eprintln!("xtask image: {msg}");
}

pub fn run(args: &Args) -> Result<()> {
    let repo = crate::repo();
    // Cargo's target dir is needed for the default --out and the static build's default; with
    // --out and --binary (or --target-dir) cargo is not run at all.
    let cargo_dir = if args.out.is_none() || (args.binary.is_none() && args.target_dir.is_none()) {
        Some(cargo::target_dir(&repo)?)
    } else {
        None
    };
    let cargo_dir = || cargo_dir.clone().ok_or("no cargo target dir");
    let out = match &args.out {
        Some(out) => out.clone(),
        None => cargo_dir()?.join("oci").join(BIN_NAME),
    };
    let static_dir = || -> Result<PathBuf> {
        match &args.target_dir {
            // Absolute: the build runs in the repository, and the path is remapped.
            Some(dir) => Ok(std::path::absolute(dir)?),
            None => Ok(cargo_dir()?),
        }
    };

    let binary = match &args.binary {
        Some(b) => b.clone(),
        None if args.no_build => static_binary_path(&static_dir()?),
        None => build_static(&repo, &static_dir()?)?,
    };
    let contents = fs::read(&binary).map_err(|e| {
        let hint = if args.no_build {
            " (--no-build packages an earlier static build: run without it once)"
        } else {
            ""
        };
        format!("cannot read the binary {}: {e}{hint}", binary.display())
    })?;
    check_static_x86_64(&contents).map_err(|e| {
        format!(
            "refusing to package {}: {e}; build it with: cargo xtask image (without --binary/--no-build)",
            binary.display(),
        )
    })?;
    say(format_args!(
        "{}: a static x86-64 ELF (no PT_INTERP), {} bytes",
        binary.display(),
        contents.len()
    ));

    let t = Instant::now();
    let layout = Layout::build(&contents, args.source_date_epoch)?;
    layout.write_to(&out)?;
    say(format_args!(
        "wrote the OCI image layout {} in {:.1}s (tar {} bytes, gzip layer {} bytes)",
        out.display(),
        t.elapsed().as_secs_f64(),
        layout.tar_size,
        layout.layer_size
    ));

    let out_s = out.display();
    println!(
        "image:    {IMAGE_REPOSITORY}:{VERSION}\n\
         layout:   {out_s} (tag {VERSION})\n\
         manifest: {manifest}\n\
         layer:    {layer_size} bytes compressed, {tar_size} bytes uncompressed\n\
         \n\
         Push it to your registry (any one of these; REGISTRY is e.g. registry.example.com/team):\n  \
         skopeo copy oci:{out_s}:{VERSION} docker://REGISTRY/{BIN_NAME}:{VERSION}\n  \
         crane push {out_s} REGISTRY/{BIN_NAME}:{VERSION}\n  \
         oras cp --from-oci-layout {out_s}:{VERSION} REGISTRY/{BIN_NAME}:{VERSION}\n\
         then install the chart with: --set image.repository=REGISTRY/{BIN_NAME}",
        manifest = layout.manifest_digest,
        layer_size = layout.layer_size,
        tar_size = layout.tar_size,
    );
    Ok(())
}

// --- the static build ---------------------------------------------------------------------------

fn static_binary_path(target_dir: &Path) -> PathBuf {
    target_dir.join(RUST_TARGET).join("release").join(BIN_NAME)
}

fn cargo_home() -> Option<PathBuf> {
    match std::env::var_os("CARGO_HOME") {
        Some(h) if !h.is_empty() => Some(PathBuf::from(h)),
        _ => std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".cargo")),
    }
}

/// The rustc flags of the static build: glibc's static C runtime, and local paths (the
/// repository, the target dir, the cargo home with the registry sources) mapped to fixed ones,
/// so that panic messages and debug info do not carry this machine's paths. With several
/// matches, rustc applies the last one given, so the target dir (which may be inside the
/// repository) comes after the repository.
fn static_rustflags(repo: &Path, target_dir: &Path, cargo_home: Option<&Path>) -> Vec<String> {
    let mut flags = vec!["-Ctarget-feature=+crt-static".to_string()];
    let mut remap = |from: &Path, to: &str| {
        flags.push(format!("--remap-path-prefix={}={to}", from.display()));
    };
    remap(repo, "/build/recording-canary");
    remap(target_dir, "/build/target");
    if let Some(home) = cargo_home {
        remap(home, "/cargo");
    }
    flags
}

/// Runs the static release build and returns the path of the binary it produced.
fn build_static(repo: &Path, target_dir: &Path) -> Result<PathBuf> {
    let flags = static_rustflags(repo, target_dir, cargo_home().as_deref());
    say(format_args!(
        "building the static binary (cold: about 15 min on 2 cores; warm: seconds)…\n    \
         RUSTFLAGS=\"{}\" cargo build --release --locked --target {RUST_TARGET} \
         --package {BIN_NAME} --bin {BIN_NAME} --target-dir {}",
        flags.join(" "),
        target_dir.display()
    ));
    let t = Instant::now();
    // --target keeps these flags off build scripts and proc-macros; CARGO_ENCODED_RUSTFLAGS
    // (separated by 0x1f) keeps paths with spaces intact and wins over RUSTFLAGS and
    // build.rustflags.
    let mut child = cargo::command(repo)
        .args(["build", "--release", "--locked", "--target", RUST_TARGET])
        .args(["--package", BIN_NAME, "--bin", BIN_NAME])
        .arg("--message-format=json-render-diagnostics")
        .arg("--manifest-path")
        .arg(repo.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run cargo ({}): {e}", cargo::cargo()))?;
    let mut messages = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        stdout.read_to_string(&mut messages)?;
    }
    let status = child.wait()?;
    if !status.success() {
        return Err(
            format!("the static build failed ({status}); see cargo's messages above").into(),
        );
    }
    let binary = cargo::executable_from_messages(&messages, BIN_NAME).ok_or_else(|| {
        format!("cargo built no executable named {BIN_NAME} (no compiler-artifact message)")
    })?;
    say(format_args!(
        "built {} in {:.0}s",
        binary.display(),
        t.elapsed().as_secs_f64()
    ));
    Ok(binary)
}

// --- ELF: static or not -------------------------------------------------------------------------

/// Refuses anything but a 64-bit x86-64 ELF without a PT_INTERP segment: the image holds no
/// dynamic loader and no libraries, and its platform is linux/amd64.
fn check_static_x86_64(bytes: &[u8]) -> Result<(), String> {
    if !bytes.starts_with(&elf::ELFMAG) {
        return Err("not an ELF file".into());
    }
    let header = elf::FileHeader64::<object::Endianness>::parse(bytes)
        .map_err(|e| format!("not a 64-bit ELF file we can read ({e})"))?;
    let endian = header
        .endian()
        .map_err(|e| format!("an ELF file of unknown byte order ({e})"))?;
    let machine = header.e_machine(endian);
    if machine != elf::EM_X86_64 {
        return Err(format!(
            "ELF machine {machine} is not x86-64 ({}), the image's platform is linux/amd64",
            elf::EM_X86_64
        ));
    }
    let segments = header
        .program_headers(endian, bytes)
        .map_err(|e| format!("its ELF program headers are unreadable ({e})"))?;
    for segment in segments {
        let interp = segment
            .interpreter(endian, bytes)
            .map_err(|e| format!("its PT_INTERP segment is unreadable ({e})"))?;
        if let Some(interp) = interp {
            return Err(format!(
                "it is dynamically linked (PT_INTERP {}) and the image holds no libraries",
                String::from_utf8_lossy(interp)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A minimal 64-bit little-endian x86-64 ELF: the header and `phdrs` program headers of the
    /// given types; a PT_INTERP points at `interp` after them.
    pub(super) fn synthetic_elf(phdrs: &[u32], interp: &str) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(&elf::ELFMAG);
        b[4] = elf::ELFCLASS64;
        b[5] = elf::ELFDATA2LSB;
        b[6] = elf::EV_CURRENT;
        b[18..20].copy_from_slice(&elf::EM_X86_64.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        b[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        b[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        let interp_off = 64 + 56 * phdrs.len() as u64;
        for &p_type in phdrs {
            let mut ph = [0u8; 56];
            ph[..4].copy_from_slice(&p_type.to_le_bytes());
            ph[8..16].copy_from_slice(&interp_off.to_le_bytes());
            ph[32..40].copy_from_slice(&(interp.len() as u64 + 1).to_le_bytes());
            b.extend_from_slice(&ph);
        }
        b.extend_from_slice(interp.as_bytes());
        b.push(0);
        b
    }

    #[test]
    fn an_elf_with_pt_interp_is_dynamic_and_one_without_is_static() {
        let dynamic = synthetic_elf(
            &[elf::PT_PHDR, elf::PT_INTERP, elf::PT_LOAD],
            "/lib64/ld-linux-x86-64.so.2",
        );
        let err = check_static_x86_64(&dynamic).unwrap_err();
        assert!(
            err.contains("dynamically linked (PT_INTERP /lib64/ld-linux-x86-64.so.2)"),
            "{err}"
        );

        let fully_static = synthetic_elf(&[elf::PT_LOAD, elf::PT_LOAD, elf::PT_DYNAMIC], "");
        assert_eq!(check_static_x86_64(&fully_static), Ok(()));
    }

    #[test]
    fn not_elf_truncated_or_another_machine_is_refused() {
        let err = check_static_x86_64(b"#!/bin/sh\n").unwrap_err();
        assert!(err.contains("not an ELF"), "{err}");
        let elf = synthetic_elf(&[elf::PT_INTERP], "/lib/ld.so");
        let err = check_static_x86_64(&elf[..70]).unwrap_err();
        assert!(err.contains("program headers"), "{err}");
        let mut arm = synthetic_elf(&[elf::PT_LOAD], "");
        arm[18..20].copy_from_slice(&elf::EM_AARCH64.to_le_bytes());
        let err = check_static_x86_64(&arm).unwrap_err();
        assert!(err.contains("not x86-64"), "{err}");
        let mut elf32 = synthetic_elf(&[elf::PT_LOAD], "");
        elf32[4] = elf::ELFCLASS32;
        assert!(check_static_x86_64(&elf32).is_err());
        let mut bad_interp = synthetic_elf(&[elf::PT_INTERP], "/lib/ld.so");
        bad_interp[64 + 8..64 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = check_static_x86_64(&bad_interp).unwrap_err();
        assert!(err.contains("PT_INTERP segment is unreadable"), "{err}");
    }

    #[test]
    fn bin_sh_is_dynamically_linked() {
        let sh = fs::read("/bin/sh").expect("/bin/sh exists on the test machine");
        let err = check_static_x86_64(&sh).expect_err("/bin/sh is dynamically linked");
        assert!(err.contains("PT_INTERP") && err.contains("ld"), "{err}");
    }

    #[test]
    fn the_static_build_remaps_local_paths_after_the_repository() {
        let flags = static_rustflags(
            Path::new("/w/repo"),
            Path::new("/w/repo/target"),
            Some(Path::new("/h/.cargo")),
        );
        assert_eq!(
            flags,
            [
                "-Ctarget-feature=+crt-static",
                "--remap-path-prefix=/w/repo=/build/recording-canary",
                "--remap-path-prefix=/w/repo/target=/build/target",
                "--remap-path-prefix=/h/.cargo=/cargo",
            ]
        );
    }

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        image: Args,
    }

    #[test]
    fn arguments() {
        let args = |a: &[&str]| Cli::try_parse_from([&["image"], a].concat()).map(|c| c.image);
        let a = args(&["--out", "o", "--binary=b", "--source-date-epoch", "7"]).unwrap();
        assert_eq!(a.out, Some(PathBuf::from("o")));
        assert_eq!(a.binary, Some(PathBuf::from("b")));
        assert_eq!(a.source_date_epoch, 7);
        assert!(!a.no_build);
        assert!(args(&["--no-build"]).unwrap().no_build);
        assert!(args(&["--out"]).is_err());
        assert!(args(&["--frobnicate"]).is_err());
        assert!(args(&["--binary", "b", "--no-build"]).is_err());
        assert!(args(&["--source-date-epoch", "yesterday"]).is_err());
    }

    #[test]
    fn source_date_epoch_is_seconds_and_empty_is_zero() {
        assert_eq!(parse_epoch("1700000000"), Ok(1_700_000_000));
        assert_eq!(parse_epoch(" 42\n"), Ok(42));
        assert_eq!(parse_epoch(""), Ok(0));
        assert!(parse_epoch("-1").is_err());
        assert!(parse_epoch("2023-11-14").is_err());
    }
}
