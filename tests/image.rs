//! The container image: the OCI image layout that `cargo xtask image` writes.
//!
//! With `RC_OCI_LAYOUT=DIR` the tests inspect that layout (tests/run.sh builds it first);
//! otherwise they run `cargo xtask image`, which builds the static binary (about 15 min cold on
//! 2 cores; `RC_STATIC_TARGET_DIR` picks its target dir, as in tests/run.sh) and writes a layout
//! under the cargo target dir's tmp/.
//!
//! The readers here are not the writer's: the `tar` crate's archive reader (it checks each
//! header's checksum; xtask writes with its `Header` and sets the checksum field itself),
//! flate2's decoder, `object`'s generic reader (format, architecture, `.interp`) beside the ELF
//! program headers, and plain `serde_json` values where xtask writes `oci-spec` types. So they
//! check its output rather than share its assumptions.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use object::read::elf::{ElfFile64, ProgramHeader};
use object::{Architecture, BinaryFormat, Object};
use serde_json::Value;
use sha2::{Digest, Sha256};

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The compressed layer must stay below this. Measured: 6.6 MB (0.1.0: a stripped release build
/// with thin LTO, 16.9 MB uncompressed); about 3× that leaves room to grow and still catches a
/// debug build or a layer that carries more than the binary.
const MAX_LAYER_BYTES: usize = 20_000_000;

/// The layout under test: `RC_OCI_LAYOUT`, or one built once for all tests of this file.
fn layout() -> &'static Path {
    static LAYOUT: OnceLock<PathBuf> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        if let Some(dir) = std::env::var_os("RC_OCI_LAYOUT") {
            let dir = PathBuf::from(dir);
            assert!(
                dir.join("oci-layout").is_file(),
                "RC_OCI_LAYOUT={} is not an OCI image layout (no oci-layout file); write one with\n  \
                 cargo xtask image --out {0}\nor unset RC_OCI_LAYOUT to have this test build it",
                dir.display()
            );
            return dir;
        }
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("oci-image-test");
        eprintln!(
            "RC_OCI_LAYOUT is not set: running cargo xtask image --out {} (the static build takes about 15 min cold)",
            out.display()
        );
        let mut xtask = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        xtask
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["run", "--quiet", "--package", "xtask", "--", "image", "--out"])
            .arg(&out);
        if let Some(dir) = std::env::var_os("RC_STATIC_TARGET_DIR") {
            xtask.arg("--target-dir").arg(dir);
        }
        let run = xtask
            .stderr(Stdio::inherit())
            .output()
            .expect("run cargo xtask image");
        assert!(
            run.status.success(),
            "cargo xtask image failed ({}); its messages are above. By hand: cargo xtask image --out {}",
            run.status,
            out.display()
        );
        eprintln!("{}", String::from_utf8_lossy(&run.stdout));
        out
    })
}

fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The blob a descriptor points at, after checking its digest and size.
fn blob(layout: &Path, descriptor: &Value) -> Vec<u8> {
    let digest = descriptor["digest"].as_str().expect("descriptor digest");
    let hash = digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("digest {digest} is not sha256"));
    let path = layout.join("blobs/sha256").join(hash);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(
        format!("{:x}", Sha256::digest(&bytes)),
        hash,
        "{} does not hash to its name",
        path.display()
    );
    assert_eq!(descriptor["size"], bytes.len(), "size of {digest}");
    bytes
}

struct TarEntry {
    name: String,
    mode: u32,
    uid: u64,
    gid: u64,
    entry_type: tar::EntryType,
    contents: Vec<u8>,
}

/// Every header of a tar archive, as the `tar` crate reads it (it checks each header's checksum),
/// extension headers (PAX, GNU long names) included as entries of their own type.
fn tar_entries(archive: &[u8]) -> Vec<TarEntry> {
    let mut archive = tar::Archive::new(archive);
    let entries = archive.entries().expect("tar entries").raw(true);
    entries
        .map(|entry| {
            let mut entry = entry.expect("a tar entry (valid header and checksum)");
            let header = entry.header();
            assert!(header.as_ustar().is_some(), "a POSIX ustar header");
            let mut e = TarEntry {
                name: String::from_utf8_lossy(&entry.path_bytes()).into_owned(),
                mode: header.mode().expect("mode"),
                uid: header.uid().expect("uid"),
                gid: header.gid().expect("gid"),
                entry_type: header.entry_type(),
                contents: Vec::new(),
            };
            entry.read_to_end(&mut e.contents).expect("entry data");
            e
        })
        .collect()
}

/// The PT_INTERP segment of a 64-bit little-endian x86-64 ELF file, if it has one.
fn elf_interpreter(bytes: &[u8]) -> Option<String> {
    let file = object::File::parse(bytes).expect("an object file");
    assert_eq!(file.format(), BinaryFormat::Elf, "an ELF file");
    assert!(
        file.is_64() && file.is_little_endian(),
        "64-bit little-endian"
    );
    assert_eq!(
        file.architecture(),
        Architecture::X86_64,
        "e_machine x86-64"
    );
    let interp_section = file.section_by_name(".interp").is_some();
    let elf = ElfFile64::<object::Endianness>::parse(bytes).expect("a 64-bit ELF file");
    let interp = elf.elf_program_headers().iter().find_map(|segment| {
        segment
            .interpreter(elf.endian(), bytes)
            .expect("a readable PT_INTERP segment")
            .map(|i| String::from_utf8_lossy(i).into_owned())
    });
    assert_eq!(
        interp_section,
        interp.is_some(),
        "an .interp section goes with a PT_INTERP segment"
    );
    interp
}

#[test]
fn the_image_layout_runs_the_static_binary_as_a_non_root_user_and_holds_nothing_else() {
    let layout = layout();
    assert_eq!(
        read_json(&layout.join("oci-layout")),
        serde_json::json!({"imageLayoutVersion": "1.0.0"})
    );
    let index = read_json(&layout.join("index.json"));
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let manifests = index["manifests"].as_array().expect("index.manifests");
    assert_eq!(manifests.len(), 1, "one image in the layout: {index}");
    let desc = &manifests[0];
    assert_eq!(
        desc["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        desc["platform"],
        serde_json::json!({"architecture": "amd64", "os": "linux"})
    );

    let manifest: Value = serde_json::from_slice(&blob(layout, desc)).expect("manifest JSON");
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let config: Value =
        serde_json::from_slice(&blob(layout, &manifest["config"])).expect("config JSON");
    let layers = manifest["layers"].as_array().expect("manifest.layers");
    assert_eq!(layers.len(), 1, "one layer: {manifest}");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let layer = blob(layout, &layers[0]);

    // The layout holds these three blobs and nothing else.
    let blobs: BTreeSet<String> = std::fs::read_dir(layout.join("blobs/sha256"))
        .expect("blobs/sha256")
        .map(|e| {
            format!(
                "sha256:{}",
                e.expect("dir entry").file_name().to_string_lossy()
            )
        })
        .collect();
    let referenced: BTreeSet<String> = [desc, &manifest["config"], &layers[0]]
        .iter()
        .map(|d| d["digest"].as_str().expect("digest").to_string())
        .collect();
    assert_eq!(
        blobs, referenced,
        "blobs/sha256 holds exactly the image's blobs"
    );

    // The config: linux/amd64, a non-root user, the controller as entrypoint.
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    let c = &config["config"];
    let user = c["User"].as_str().expect("config.User is set");
    assert_eq!(user, "65532:65532", "the chart's runAsNonRoot user");
    let (uid, gid) = user.split_once(':').expect("uid:gid");
    assert_ne!(uid.parse::<u32>().expect("numeric uid"), 0, "not root");
    assert_ne!(
        gid.parse::<u32>().expect("numeric gid"),
        0,
        "not root's group"
    );
    assert_eq!(c["Entrypoint"], serde_json::json!(["/recording-canary"]));
    assert_eq!(c["Cmd"], serde_json::json!(["run"]));
    assert_eq!(c["ExposedPorts"], serde_json::json!({"9090/tcp": {}}));
    assert_eq!(c["Labels"]["org.opencontainers.image.version"], VERSION);
    assert_eq!(
        c["Labels"]["org.opencontainers.image.licenses"],
        "Apache-2.0"
    );

    // The layer: exactly one file, /recording-canary (no shell, no libraries, no directories).
    eprintln!(
        "compressed layer: {} bytes (bound {MAX_LAYER_BYTES})",
        layer.len()
    );
    assert!(
        layer.len() < MAX_LAYER_BYTES,
        "the compressed layer is {} bytes, over {MAX_LAYER_BYTES}",
        layer.len()
    );
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&layer[..])
        .read_to_end(&mut tar)
        .expect("the layer is gzip");
    let diff_id = format!("sha256:{:x}", Sha256::digest(&tar));
    assert_eq!(config["rootfs"]["type"], "layers");
    assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!([diff_id]));
    let entries = tar_entries(&tar);
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        ["recording-canary"],
        "the layer holds the binary and nothing else"
    );
    let bin = &entries[0];
    assert_eq!(bin.entry_type, tar::EntryType::Regular, "a regular file");
    // Its header, its data to a whole block, and the end: two zero blocks, nothing after.
    let end = 512 + bin.contents.len().next_multiple_of(512);
    assert_eq!(tar.len(), end + 1024, "the tar ends with two zero blocks");
    assert!(
        tar[end..].iter().all(|&b| b == 0),
        "the end-of-archive blocks are zero"
    );
    assert_eq!(
        (bin.mode, bin.uid, bin.gid),
        (0o755, 0, 0),
        "mode 0755, owned by 0:0"
    );
    // And the system's tar sees the same.
    let tar_path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("oci-image-layer.tar.gz");
    std::fs::write(&tar_path, &layer).expect("write the layer");
    let listing = Command::new("tar")
        .arg("-tzf")
        .arg(&tar_path)
        .output()
        .expect("system tar is needed to list the layer (apt-get install tar gzip)");
    assert!(
        listing.status.success(),
        "tar -tzf: {}",
        String::from_utf8_lossy(&listing.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&listing.stdout),
        "recording-canary\n"
    );

    // The binary: static (there is nothing in the image to load a dynamic one), and it runs.
    assert_eq!(
        elf_interpreter(&bin.contents),
        None,
        "the binary is dynamically linked; the image has no loader or libraries"
    );
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("oci-image-extracted");
    std::fs::create_dir_all(&dir).expect("create the extraction dir");
    let exe = dir.join("recording-canary");
    let _ = std::fs::remove_file(&exe);
    std::fs::write(&exe, &bin.contents).expect("extract the binary");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = Command::new(&exe)
        .arg("--version")
        .env_clear()
        .output()
        .expect("run the extracted recording-canary --version");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "--version failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), format!("recording-canary {VERSION}"));
}

#[test]
fn the_image_is_tagged_as_the_charts_default_image_at_its_app_version() {
    let chart_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/recording-canary");
    let yaml = |name: &str| -> serde_yaml_ng::Value {
        let text = std::fs::read_to_string(chart_dir.join(name)).expect("read the chart");
        serde_yaml_ng::from_str(&text).expect("chart YAML")
    };
    let app_version = yaml("Chart.yaml")["appVersion"]
        .as_str()
        .expect("Chart.yaml appVersion")
        .to_string();
    let values = yaml("values.yaml");
    let repository = values["image"]["repository"]
        .as_str()
        .expect("values.yaml image.repository");
    assert_eq!(
        values["image"]["tag"].as_str(),
        Some(""),
        "the chart's default tag is its appVersion"
    );
    assert_eq!(
        app_version, VERSION,
        "Chart.yaml appVersion is the crate version"
    );

    let index = read_json(&layout().join("index.json"));
    let annotations = &index["manifests"][0]["annotations"];
    assert_eq!(
        annotations["org.opencontainers.image.ref.name"],
        app_version.as_str()
    );
    assert_eq!(
        annotations["io.containerd.image.name"],
        format!("{repository}:{app_version}").as_str(),
        "the layout is tagged as the chart's default image"
    );
}
