//! `oci-image`: builds the controller's container image without a container runtime.
//!
//! ```text
//! cargo run --bin oci-image -- [--out DIR] [--binary PATH] [--no-build]
//! ```
//!
//! It builds `recording-canary` statically (glibc, `+crt-static`; there is no musl target on the
//! build machines), checks that the result is a static x86-64 ELF, and writes an OCI image layout
//! (`oci-layout`, `index.json`, `blobs/sha256/…`) holding one gzip layer with exactly one file,
//! `/recording-canary`, run as the non-root user 65532:65532. The same binary and the same
//! `SOURCE_DATE_EPOCH` give a byte-identical layout: the tar and gzip headers carry no time but
//! that one, and every JSON document is written from fixed input.
//!
//! Push the layout with skopeo, crane or oras (it prints the commands); see docs/install.md, "The image".

use std::error::Error;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use flate2::{Compression, GzBuilder};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

/// The file in the image, at its root, and its entrypoint.
const BIN_NAME: &str = "recording-canary";
/// The chart's default `image.repository` (charts/recording-canary/values.yaml; tests/image.rs
/// checks that they agree).
const IMAGE_REPOSITORY: &str = "ghcr.io/recording-canary/recording-canary";
const SOURCE_URL: &str = "https://github.com/recording-canary/recording-canary";
/// The crate version, which is the chart's `appVersion` (tests/image.rs checks it): the tag.
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The user the chart runs the controller as (`runAsNonRoot`); no passwd file is needed for a
/// numeric user.
const USER: &str = "65532:65532";
/// The only platform built: the config says linux/amd64, so the ELF must be x86-64.
const RUST_TARGET: &str = "x86_64-unknown-linux-gnu";
const EM_X86_64: u16 = 62;

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("oci-image: error: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: cargo run --bin oci-image -- [--out DIR] [--binary PATH] [--no-build]

  --out DIR      where to write the OCI image layout (default: <cargo target dir>/oci/recording-canary,
                 that is target/oci/recording-canary); an earlier layout there is replaced
  --binary PATH  package this file instead of building (it must be a static x86-64 ELF)
  --no-build     do not run cargo; package <cargo target dir>/x86_64-unknown-linux-gnu/release/recording-canary
                 from an earlier run

Env: SOURCE_DATE_EPOCH (seconds) sets the file's mtime and the image's `created` (default: 0, 1970-01-01).";

#[derive(Debug, Default)]
struct Args {
    out: Option<PathBuf>,
    binary: Option<PathBuf>,
    no_build: bool,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Args>> {
    let mut parsed = Args::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<PathBuf> {
            match inline.clone().or_else(|| args.next()) {
                Some(v) if !v.is_empty() => Ok(PathBuf::from(v)),
                _ => Err(format!("{name} needs a value\n\n{USAGE}").into()),
            }
        };
        match flag.as_str() {
            "--out" => parsed.out = Some(value("--out")?),
            "--binary" => parsed.binary = Some(value("--binary")?),
            "--no-build" if inline.is_none() => parsed.no_build = true,
            "-h" | "--help" => return Ok(None),
            _ => return Err(format!("unknown argument {arg:?}\n\n{USAGE}").into()),
        }
    }
    Ok(Some(parsed))
}

fn say(msg: impl std::fmt::Display) {
    eprintln!("oci-image: {msg}");
}

fn run() -> Result<()> {
    let Some(args) = parse_args(std::env::args().skip(1))? else {
        println!("{USAGE}");
        return Ok(());
    };
    let epoch = source_date_epoch()?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The target dir is needed for the default --out and the built binary; --binary with --out
    // needs no cargo at all.
    let target_dir = if args.binary.is_some() && args.out.is_some() {
        None
    } else {
        Some(cargo_target_dir(repo)?)
    };
    let target_dir = || target_dir.as_deref().ok_or("no cargo target dir");
    let out = match &args.out {
        Some(out) => out.clone(),
        None => target_dir()?.join("oci").join(BIN_NAME),
    };

    let binary = match &args.binary {
        Some(b) => b.clone(),
        None if args.no_build => static_binary_path(target_dir()?),
        None => build_static(repo, target_dir()?)?,
    };
    let contents = fs::read(&binary).map_err(|e| {
        let hint = if args.no_build && args.binary.is_none() {
            " (--no-build packages an earlier static build: run without it once)"
        } else {
            ""
        };
        format!("cannot read the binary {}: {e}{hint}", binary.display())
    })?;
    check_static_x86_64(&contents).map_err(|e| {
        format!(
            "refusing to package {}: {e}; build it with: {}",
            binary.display(),
            BUILD_COMMAND_HINT
        )
    })?;
    say(format_args!(
        "{}: a static x86-64 ELF (no PT_INTERP), {} bytes",
        binary.display(),
        contents.len()
    ));

    let t = Instant::now();
    let layout = build_layout(&contents, epoch)?;
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

const BUILD_COMMAND_HINT: &str = "cargo run --bin oci-image (without --binary/--no-build)";

fn source_date_epoch() -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Err(std::env::VarError::NotPresent) => Ok(0),
        Err(e) => Err(format!("SOURCE_DATE_EPOCH: {e}").into()),
        Ok(s) if s.trim().is_empty() => Ok(0),
        Ok(s) => s.trim().parse::<u64>().map_err(|e| {
            format!("SOURCE_DATE_EPOCH={s:?} is not a number of seconds since 1970: {e}").into()
        }),
    }
}

// --- the static build ---------------------------------------------------------------------------

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

/// `cargo metadata`'s target directory (honours CARGO_TARGET_DIR and .cargo/config).
fn cargo_target_dir(repo: &Path) -> Result<PathBuf> {
    let output = Command::new(cargo())
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--manifest-path",
        ])
        .arg(repo.join("Cargo.toml"))
        .current_dir(repo)
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
         RUSTFLAGS=\"{}\" cargo build --release --locked --target {RUST_TARGET} --bin {BIN_NAME}",
        flags.join(" ")
    ));
    let t = Instant::now();
    // --target keeps these flags off build scripts and proc-macros; CARGO_ENCODED_RUSTFLAGS
    // (separated by 0x1f) keeps paths with spaces intact and wins over RUSTFLAGS and
    // build.rustflags.
    let mut cmd = Command::new(cargo());
    // Under `cargo run` or `cargo test` this process has the variables cargo sets for the
    // programs it runs (CARGO_MANIFEST_DIR, CARGO_PKG_*, …). Some build scripts track them
    // (ring's does CARGO_MANIFEST_DIR), so passing them on would make this build and the same
    // command typed in a shell invalidate each other's cache (11 min here). Drop them.
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(set_by_cargo_for_its_programs) {
            cmd.env_remove(&key);
        }
    }
    let mut child = cmd
        .args(["build", "--release", "--locked", "--target", RUST_TARGET])
        .args([
            "--bin",
            BIN_NAME,
            "--message-format=json-render-diagnostics",
        ])
        .arg("--manifest-path")
        .arg(repo.join("Cargo.toml"))
        .current_dir(repo)
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run cargo ({}): {e}", cargo()))?;
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
    let binary = executable_from_messages(&messages).ok_or_else(|| {
        format!("cargo built no executable named {BIN_NAME} (no compiler-artifact message)")
    })?;
    say(format_args!(
        "built {} in {:.0}s",
        binary.display(),
        t.elapsed().as_secs_f64()
    ));
    Ok(binary)
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

/// The `executable` of the `compiler-artifact` message for our binary.
fn executable_from_messages(messages: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == BIN_NAME)
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .next_back()
}

// --- ELF: static or not -------------------------------------------------------------------------

const PT_INTERP: u32 = 3;

#[derive(Debug, PartialEq)]
struct ElfInfo {
    machine: u16,
    /// The PT_INTERP segment's contents: the dynamic loader of a dynamically linked executable.
    interpreter: Option<String>,
}

/// Reads the header and program headers of a 64-bit little-endian ELF file.
fn parse_elf(bytes: &[u8]) -> Result<ElfInfo, String> {
    if bytes.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file".into());
    }
    if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let u16_at = |off: usize| -> Result<u16, String> {
        bytes
            .get(off..off + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| "truncated ELF file".to_string())
    };
    let u32_at = |off: usize| -> Result<u32, String> {
        bytes
            .get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| "truncated ELF file".to_string())
    };
    let u64_at = |off: usize| -> Result<usize, String> {
        let b = bytes
            .get(off..off + 8)
            .ok_or_else(|| "truncated ELF file".to_string())?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        usize::try_from(u64::from_le_bytes(a)).map_err(|_| "ELF offset too large".to_string())
    };
    let machine = u16_at(18)?;
    let phoff = u64_at(32)?;
    let phentsize = usize::from(u16_at(54)?);
    let phnum = usize::from(u16_at(56)?);
    if phnum > 0 && phentsize < 56 {
        return Err(format!("ELF program header entries of {phentsize} bytes"));
    }
    let mut interpreter = None;
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i * phentsize)
            .ok_or("ELF program header offset overflows")?;
        if u32_at(ph)? == PT_INTERP {
            let (off, size) = (u64_at(ph + 8)?, u64_at(ph + 32)?);
            let raw = off
                .checked_add(size)
                .and_then(|end| bytes.get(off..end))
                .ok_or("PT_INTERP points outside the file")?;
            let name = raw.split(|&b| b == 0).next().unwrap_or_default();
            interpreter = Some(String::from_utf8_lossy(name).into_owned());
        }
    }
    Ok(ElfInfo {
        machine,
        interpreter,
    })
}

fn check_static_x86_64(bytes: &[u8]) -> Result<(), String> {
    let elf = parse_elf(bytes)?;
    if elf.machine != EM_X86_64 {
        return Err(format!(
            "ELF machine {} is not x86-64 ({EM_X86_64}), the image's platform is linux/amd64",
            elf.machine
        ));
    }
    match elf.interpreter {
        Some(interp) => Err(format!(
            "it is dynamically linked (PT_INTERP {interp}) and the image holds no libraries"
        )),
        None => Ok(()),
    }
}

// --- tar (ustar), gzip --------------------------------------------------------------------------

const BLOCK: usize = 512;

/// Writes `field` as zero-padded octal digits followed by a NUL, filling `dst`.
fn put_octal(dst: &mut [u8], value: u64) -> Result<(), String> {
    let digits = dst.len() - 1;
    let s = format!("{value:0digits$o}");
    if s.len() > digits {
        return Err(format!(
            "{value} does not fit in a {digits}-digit tar field"
        ));
    }
    dst[..digits].copy_from_slice(s.as_bytes());
    dst[digits] = 0;
    Ok(())
}

/// A POSIX ustar header for a regular file owned by 0:0.
fn ustar_header(name: &str, mode: u32, size: u64, mtime: u64) -> Result<[u8; BLOCK], String> {
    let mut h = [0u8; BLOCK];
    if name.is_empty() || name.len() > 100 || !name.is_ascii() {
        return Err(format!("tar entry name {name:?} is not 1–100 ASCII bytes"));
    }
    h[..name.len()].copy_from_slice(name.as_bytes());
    put_octal(&mut h[100..108], u64::from(mode))?;
    put_octal(&mut h[108..116], 0)?; // uid
    put_octal(&mut h[116..124], 0)?; // gid
    put_octal(&mut h[124..136], size)?;
    put_octal(&mut h[136..148], mtime)?;
    h[156] = b'0'; // a regular file
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    put_octal(&mut h[329..337], 0)?; // devmajor
    put_octal(&mut h[337..345], 0)?; // devminor
    // The checksum: the sum of the header's bytes with the checksum field as eight spaces,
    // written as six octal digits, a NUL and a space.
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put_octal(&mut h[148..155], u64::from(sum))?;
    h[155] = b' ';
    Ok(h)
}

/// A tar archive of regular files (name, mode, contents), in the given order, ending with the
/// two zero blocks.
fn tar(entries: &[(&str, u32, &[u8])], mtime: u64) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for (name, mode, contents) in entries {
        out.extend_from_slice(&ustar_header(name, *mode, contents.len() as u64, mtime)?);
        out.extend_from_slice(contents);
        out.resize(out.len().next_multiple_of(BLOCK), 0);
    }
    out.resize(out.len() + 2 * BLOCK, 0);
    Ok(out)
}

/// gzip with a fixed header: no file name, mtime 0, OS "unknown".
fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut enc = GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), Compression::best());
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

// --- the OCI layout -----------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

/// 1970-01-01T00:00:00Z and later, in RFC 3339 (UTC).
fn rfc3339(epoch: u64) -> String {
    let (days, secs) = (epoch / 86_400, epoch % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn descriptor(media_type: &str, blob: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": sha256_digest(blob), "size": blob.len()})
}

fn to_json(v: &Value) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(v)?)
}

/// An image layout in memory: its files, by path relative to the layout's root.
struct Layout {
    files: Vec<(String, Vec<u8>)>,
    manifest_digest: String,
    layer_size: usize,
    tar_size: usize,
}

fn build_layout(binary: &[u8], epoch: u64) -> Result<Layout> {
    let tar = tar(&[(BIN_NAME, 0o755, binary)], epoch)?;
    let layer = gzip(&tar)?;
    let created = rfc3339(epoch);
    let config = to_json(&json!({
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": USER,
            "ExposedPorts": {"9090/tcp": {}},
            "Entrypoint": [format!("/{BIN_NAME}")],
            "Cmd": ["run"],
            "Labels": {
                "org.opencontainers.image.title": BIN_NAME,
                "org.opencontainers.image.version": VERSION,
                "org.opencontainers.image.source": SOURCE_URL,
                "org.opencontainers.image.licenses": "Apache-2.0",
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(&tar)]},
        "history": [{"created": created, "created_by": "src/bin/oci-image.rs: /recording-canary"}],
    }))?;
    let manifest = to_json(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": descriptor(MEDIA_CONFIG, &config),
        "layers": [descriptor(MEDIA_LAYER, &layer)],
    }))?;
    let mut manifest_desc = descriptor(MEDIA_MANIFEST, &manifest);
    manifest_desc["platform"] = json!({"architecture": "amd64", "os": "linux"});
    manifest_desc["annotations"] = json!({
        "io.containerd.image.name": format!("{IMAGE_REPOSITORY}:{VERSION}"),
        "org.opencontainers.image.ref.name": VERSION,
    });
    let index = to_json(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [manifest_desc],
    }))?;
    let blob = |b: &[u8]| format!("blobs/sha256/{}", hex(&Sha256::digest(b)));
    Ok(Layout {
        manifest_digest: sha256_digest(&manifest),
        layer_size: layer.len(),
        tar_size: tar.len(),
        files: vec![
            (
                "oci-layout".into(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            ("index.json".into(), index),
            (blob(&manifest), manifest),
            (blob(&config), config),
            (blob(&layer), layer),
        ],
    })
}

impl Layout {
    /// Writes the layout into a fresh directory next to `out`, then puts it in place of `out`
    /// (replacing an earlier layout there; anything else there is refused).
    fn write_to(&self, out: &Path) -> Result<()> {
        if out.exists() {
            let is_layout = out.join("oci-layout").is_file();
            let is_empty_dir = fs::read_dir(out).is_ok_and(|mut d| d.next().is_none());
            if !is_layout && !is_empty_dir {
                return Err(format!(
                    "{} exists and is not an OCI image layout; refusing to replace it",
                    out.display()
                )
                .into());
            }
        }
        let name = out
            .file_name()
            .ok_or_else(|| format!("--out {} has no final component", out.display()))?;
        let parent = out.parent().unwrap_or(Path::new("."));
        let mut partial = name.to_os_string();
        partial.push(".partial");
        let partial = parent.join(partial);
        if partial.exists() {
            fs::remove_dir_all(&partial)?;
        }
        for (path, bytes) in &self.files {
            let path = partial.join(path);
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
            fs::write(&path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        if out.exists() {
            fs::remove_dir_all(out)
                .map_err(|e| format!("cannot remove the old layout {}: {e}", out.display()))?;
        }
        fs::rename(&partial, out).map_err(|e| {
            format!(
                "cannot move {} to {}: {e}",
                partial.display(),
                out.display()
            )
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal 64-bit little-endian x86-64 ELF: the header and `phdrs` program headers of the
    /// given types; a PT_INTERP points at `interp` after them.
    fn synthetic_elf(phdrs: &[u32], interp: &str) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // 64-bit
        b[5] = 1; // little-endian
        b[6] = 1;
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
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
        let dynamic = synthetic_elf(&[6, PT_INTERP, 1], "/lib64/ld-linux-x86-64.so.2");
        assert_eq!(
            parse_elf(&dynamic),
            Ok(ElfInfo {
                machine: EM_X86_64,
                interpreter: Some("/lib64/ld-linux-x86-64.so.2".into())
            })
        );
        let err = check_static_x86_64(&dynamic).unwrap_err();
        assert!(err.contains("dynamically linked"), "{err}");

        let fully_static = synthetic_elf(&[1, 1, 2], "");
        assert_eq!(parse_elf(&fully_static).unwrap().interpreter, None);
        assert_eq!(check_static_x86_64(&fully_static), Ok(()));
    }

    #[test]
    fn not_elf_truncated_or_another_machine_is_refused() {
        assert!(
            parse_elf(b"#!/bin/sh\n")
                .unwrap_err()
                .contains("not an ELF")
        );
        let elf = synthetic_elf(&[PT_INTERP], "/lib/ld.so");
        assert!(parse_elf(&elf[..70]).unwrap_err().contains("truncated"));
        let mut arm = synthetic_elf(&[1], "");
        arm[18..20].copy_from_slice(&183u16.to_le_bytes()); // aarch64
        assert!(
            check_static_x86_64(&arm)
                .unwrap_err()
                .contains("not x86-64")
        );
        let mut bad_interp = synthetic_elf(&[PT_INTERP], "/lib/ld.so");
        bad_interp[64 + 8..64 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse_elf(&bad_interp).is_err());
    }

    #[test]
    fn bin_sh_is_dynamically_linked() {
        let sh = fs::read("/bin/sh").expect("/bin/sh exists on the test machine");
        let elf = parse_elf(&sh).expect("/bin/sh is a 64-bit ELF");
        let interp = elf.interpreter.expect("/bin/sh has a PT_INTERP");
        assert!(interp.contains("ld"), "{interp}");
        assert!(check_static_x86_64(&sh).is_err());
    }

    #[test]
    fn the_ustar_header_has_the_standard_fields_and_checksum() {
        let h = ustar_header("recording-canary", 0o755, 1234, 1_700_000_000).unwrap();
        assert_eq!(&h[..17], b"recording-canary\0");
        assert_eq!(&h[100..108], b"0000755\0");
        assert_eq!(&h[108..116], b"0000000\0");
        assert_eq!(&h[116..124], b"0000000\0");
        assert_eq!(&h[124..136], b"00000002322\0"); // 1234
        assert_eq!(&h[136..148], b"14524770400\0"); // 1700000000
        assert_eq!(h[156], b'0');
        assert_eq!(&h[257..265], b"ustar\x0000");
        // The checksum: the unsigned sum of all bytes with the field itself counted as spaces.
        let mut spaced = h;
        spaced[148..156].copy_from_slice(b"        ");
        let sum: u32 = spaced.iter().map(|&b| u32::from(b)).sum();
        assert_eq!(&h[148..156], format!("{sum:06o}\0 ").as_bytes());
        assert!(ustar_header(&"x".repeat(101), 0o644, 0, 0).is_err());
        assert!(ustar_header("f", 0o644, 1 << 33, 0).is_err()); // 8 GiB needs 12 digits
    }

    #[test]
    fn the_tar_is_padded_to_blocks_and_lists_with_system_tar() {
        let data = b"#!fake binary\n";
        let archive = tar(&[("recording-canary", 0o755, data)], 0).unwrap();
        assert_eq!(archive.len(), 4 * BLOCK); // header, one data block, two zero blocks
        assert_eq!(&archive[BLOCK..BLOCK + data.len()], data);
        assert!(archive[BLOCK + data.len()..].iter().all(|&b| b == 0));

        let dir = std::env::temp_dir().join(format!("oci-image-tar-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("layer.tar");
        fs::write(&path, &archive).unwrap();
        let out = Command::new("tar")
            .env("TZ", "UTC")
            .arg("-tvf")
            .arg(&path)
            .output()
            .expect("system tar (apt-get install tar)");
        fs::remove_dir_all(&dir).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 1, "{listing}");
        assert!(lines[0].starts_with("-rwxr-xr-x 0/0"), "{listing}");
        assert!(
            lines[0].contains(" 14 1970-01-01 00:00 recording-canary"),
            "{listing}"
        );
    }

    #[test]
    fn the_same_binary_gives_a_byte_identical_layout() {
        let fake = synthetic_elf(&[1], "");
        let a = build_layout(&fake, 0).unwrap();
        let b = build_layout(&fake, 0).unwrap();
        assert_eq!(a.files, b.files);
        assert_eq!(a.manifest_digest, b.manifest_digest);
        // The gzip header: no name (FLG 0), mtime 0, OS unknown.
        let layer = &a.files[4].1;
        assert_eq!(&layer[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 255]);
        // Another time or another binary gives another image.
        assert_ne!(
            build_layout(&fake, 1).unwrap().manifest_digest,
            a.manifest_digest
        );
        let other = synthetic_elf(&[1, 1], "");
        assert_ne!(
            build_layout(&other, 0).unwrap().manifest_digest,
            a.manifest_digest
        );
    }

    #[test]
    fn the_layout_links_index_manifest_config_and_layer_by_digest() {
        let fake = synthetic_elf(&[1], "");
        let layout = build_layout(&fake, 0).unwrap();
        let file = |p: &str| &layout.files.iter().find(|(n, _)| n == p).unwrap().1;
        let blob = |d: &Value| -> Vec<u8> {
            let digest = d["digest"].as_str().unwrap();
            let bytes = file(&format!("blobs/sha256/{}", &digest[7..])).clone();
            assert_eq!(sha256_digest(&bytes), digest);
            assert_eq!(d["size"], bytes.len());
            bytes
        };
        let index: Value = serde_json::from_slice(file("index.json")).unwrap();
        let desc = &index["manifests"][0];
        assert_eq!(
            desc["annotations"]["org.opencontainers.image.ref.name"],
            VERSION
        );
        let manifest: Value = serde_json::from_slice(&blob(desc)).unwrap();
        assert_eq!(layout.manifest_digest, desc["digest"]);
        let config: Value = serde_json::from_slice(&blob(&manifest["config"])).unwrap();
        let layer = blob(&manifest["layers"][0]);
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&layer[..])
            .read_to_end(&mut tar)
            .unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][0], sha256_digest(&tar));
        assert_eq!(config["created"], "1970-01-01T00:00:00Z");
        assert_eq!(config["config"]["User"], USER);
        assert_eq!(&tar[BLOCK..BLOCK + fake.len()], &fake[..]);
    }

    #[test]
    fn created_is_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
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

    #[test]
    fn the_nested_build_drops_what_cargo_sets_for_its_programs_only() {
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
    fn arguments() {
        let args = |a: &[&str]| parse_args(a.iter().map(|s| s.to_string()));
        let a = args(&["--out", "o", "--binary=b", "--no-build"])
            .unwrap()
            .unwrap();
        assert_eq!(a.out, Some(PathBuf::from("o")));
        assert_eq!(a.binary, Some(PathBuf::from("b")));
        assert!(a.no_build);
        assert!(args(&["--help"]).unwrap().is_none());
        assert!(args(&["--out"]).is_err());
        assert!(args(&["--frobnicate"]).is_err());
    }

    #[test]
    fn the_cargo_message_for_our_binary_gives_its_path() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"serde"},"executable":null}
{"reason":"compiler-artifact","target":{"name":"recording-canary","kind":["bin"]},"executable":"/t/x86_64-unknown-linux-gnu/release/recording-canary"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executable_from_messages(messages),
            Some(PathBuf::from(
                "/t/x86_64-unknown-linux-gnu/release/recording-canary"
            ))
        );
        assert_eq!(executable_from_messages("not json"), None);
    }
}
