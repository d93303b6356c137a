//! The OCI image layout: one tar+gzip layer holding the binary, its config, manifest and index.
//!
//! The same binary and the same epoch give the same bytes, which are also the bytes this tool
//! wrote before it moved to these crates (when it was `src/bin/oci-image.rs`, with its own tar
//! writer; `the_layout_is_byte_identical_to_the_one_before_the_move` pins them):
//! - the tar entry's only time is the epoch, its owner 0:0, and its checksum field is written
//!   as GNU tar writes it (below);
//! - the gzip header has no name, mtime 0 and OS "unknown", at flate2's best compression;
//! - every JSON document is written with its object keys sorted (oci-spec keeps labels and
//!   annotations in HashMaps, whose order changes from run to run).

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use flate2::{Compression, GzBuilder};
use oci_spec::image::{
    ANNOTATION_LICENSES, ANNOTATION_REF_NAME, ANNOTATION_SOURCE, ANNOTATION_TITLE,
    ANNOTATION_VERSION, Arch, ConfigBuilder, Descriptor, HistoryBuilder, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, OciLayoutBuilder, Os, PlatformBuilder,
    RootFsBuilder, SCHEMA_VERSION, Sha256Digest,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{BIN_NAME, IMAGE_REPOSITORY, VERSION};
use crate::Result;

const SOURCE_URL: &str = "https://github.com/recording-canary/recording-canary";
/// The user the chart runs the controller as (`runAsNonRoot`); no passwd file is needed for a
/// numeric user.
const USER: &str = "65532:65532";
/// The controller's metrics and health port (the chart's `containerPort`).
const PORT: &str = "9090/tcp";
/// The layer's `history` entry. It names the file this tool was before it became `cargo xtask
/// image`: the config, and so the image digest, of a given binary stays what it was.
const HISTORY_CREATED_BY: &str = "src/bin/oci-image.rs: /recording-canary";
/// containerd's (and nerdctl's) annotation for the full image name in a layout's index.
const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// An image layout in memory: its files, by path relative to the layout's root.
pub struct Layout {
    pub files: Vec<(String, Vec<u8>)>,
    pub manifest_digest: String,
    pub layer_size: usize,
    pub tar_size: usize,
}

impl Layout {
    /// The layout of an image of `binary`, with `epoch` (seconds since 1970) as its time.
    pub fn build(binary: &[u8], epoch: u64) -> Result<Layout> {
        let tar = tar(binary, epoch)?;
        let layer = gzip(&tar)?;
        let created = rfc3339(epoch)?;
        let labels = HashMap::from([
            (ANNOTATION_TITLE.to_string(), BIN_NAME.to_string()),
            (ANNOTATION_VERSION.to_string(), VERSION.to_string()),
            (ANNOTATION_SOURCE.to_string(), SOURCE_URL.to_string()),
            (ANNOTATION_LICENSES.to_string(), "Apache-2.0".to_string()),
        ]);
        let config = ImageConfigurationBuilder::default()
            .created(created.clone())
            .architecture(Arch::Amd64)
            .os(Os::Linux)
            .config(
                ConfigBuilder::default()
                    .user(USER)
                    .exposed_ports(vec![PORT.to_string()])
                    .entrypoint(vec![format!("/{BIN_NAME}")])
                    .cmd(vec!["run".to_string()])
                    .labels(labels)
                    .build()?,
            )
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(vec![sha256_digest(&tar)])
                    .build()?,
            )
            .history(vec![
                HistoryBuilder::default()
                    .created(created)
                    .created_by(HISTORY_CREATED_BY)
                    .build()?,
            ])
            .build()?;
        let config = canonical_json(&config)?;
        let manifest = canonical_json(
            &ImageManifestBuilder::default()
                .schema_version(SCHEMA_VERSION)
                .media_type(MediaType::ImageManifest)
                .config(descriptor(MediaType::ImageConfig, &config)?)
                .layers(vec![descriptor(MediaType::ImageLayerGzip, &layer)?])
                .build()?,
        )?;
        let mut manifest_desc = descriptor(MediaType::ImageManifest, &manifest)?;
        manifest_desc.set_platform(Some(
            PlatformBuilder::default()
                .architecture(Arch::Amd64)
                .os(Os::Linux)
                .build()?,
        ));
        manifest_desc.set_annotations(Some(HashMap::from([
            (
                ANNOTATION_CONTAINERD_NAME.to_string(),
                format!("{IMAGE_REPOSITORY}:{VERSION}"),
            ),
            (ANNOTATION_REF_NAME.to_string(), VERSION.to_string()),
        ])));
        let index = canonical_json(
            &ImageIndexBuilder::default()
                .schema_version(SCHEMA_VERSION)
                .media_type(MediaType::ImageIndex)
                .manifests(vec![manifest_desc])
                .build()?,
        )?;
        let oci_layout = canonical_json(
            &OciLayoutBuilder::default()
                .image_layout_version("1.0.0")
                .build()?,
        )?;
        let blob = |b: &[u8]| format!("blobs/sha256/{:x}", Sha256::digest(b));
        Ok(Layout {
            manifest_digest: sha256_digest(&manifest),
            layer_size: layer.len(),
            tar_size: tar.len(),
            files: vec![
                ("oci-layout".into(), oci_layout),
                ("index.json".into(), index),
                (blob(&manifest), manifest),
                (blob(&config), config),
                (blob(&layer), layer),
            ],
        })
    }

    /// Writes the layout into a fresh directory next to `out`, then puts it in place of `out`
    /// (replacing an earlier layout there; anything else there is refused).
    pub fn write_to(&self, out: &Path) -> Result<()> {
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

/// A ustar archive of one regular file, /recording-canary, mode 0755, owned by 0:0, with
/// `mtime` as its time, ending with the two zero blocks.
fn tar(binary: &[u8], mtime: u64) -> Result<Vec<u8>> {
    let mut header = tar::Header::new_ustar();
    header.set_path(BIN_NAME)?;
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o755);
    header.set_uid(0);
    header.set_gid(0);
    header.set_size(binary.len() as u64);
    header.set_mtime(mtime);
    header.set_device_major(0)?;
    header.set_device_minor(0)?;
    header.set_cksum();
    // tar-rs writes the checksum as seven octal digits and a NUL; GNU tar (and this tool before
    // it used tar-rs) as six digits, a NUL and a space. Both are valid ustar; the second keeps
    // the layer, and so the image digest, of a given binary what it was.
    let sum = header.cksum()?;
    header
        .as_old_mut()
        .cksum
        .copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut archive = tar::Builder::new(Vec::new());
    archive.append(&header, binary)?;
    Ok(archive.into_inner()?)
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

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn descriptor(media_type: MediaType, blob: &[u8]) -> Result<Descriptor> {
    let digest = Sha256Digest::from_str(&format!("{:x}", Sha256::digest(blob)))?;
    Ok(Descriptor::new(media_type, blob.len() as u64, digest))
}

/// `epoch` in RFC 3339, UTC, whole seconds: 1970-01-01T00:00:00Z.
fn rfc3339(epoch: u64) -> Result<String> {
    let seconds = i64::try_from(epoch).map_err(|_| format!("epoch {epoch} is out of range"))?;
    let t = jiff::Timestamp::from_second(seconds).map_err(|e| format!("epoch {epoch}: {e}"))?;
    Ok(t.to_string())
}

/// A document's JSON with every object's keys in sorted order, so that the same document gives
/// the same bytes (with serde_json's default sorted maps, `sort_all_objects` has nothing to do;
/// it keeps the order should a crate in the tree turn on `preserve_order`).
fn canonical_json(doc: &impl Serialize) -> Result<Vec<u8>> {
    let mut value = serde_json::to_value(doc)?;
    value.sort_all_objects();
    Ok(serde_json::to_vec(&value)?)
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::process::Command;

    use object::elf::PT_LOAD;
    use serde_json::Value;

    use super::super::tests::synthetic_elf;
    use super::*;

    const BLOCK: usize = 512;

    fn file<'a>(layout: &'a Layout, path: &str) -> &'a [u8] {
        &layout.files.iter().find(|(n, _)| n == path).unwrap().1
    }

    #[test]
    fn the_layout_is_byte_identical_to_the_one_before_the_move() {
        // index.json and the manifest digest that src/bin/oci-image.rs (commit 3a7da93, the
        // tool's own tar writer and `json!`) wrote for this binary, at epochs 0 and 1700000000.
        let fake = synthetic_elf(&[PT_LOAD], "");
        let layout = Layout::build(&fake, 0).unwrap();
        assert_eq!(
            layout.manifest_digest,
            "sha256:52a432931b8a0058eab4d9791657e6b97c4cad783dcf85b4c6bb6fe7d1e9ce6f"
        );
        assert_eq!(
            sha256_digest(file(&layout, "index.json")),
            "sha256:5f4f173fefcd4cde7677cc124835f7c26af8dd7f56420b574926bb8496a3a5da"
        );
        assert_eq!(
            file(&layout, "oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#
        );
        assert_eq!(
            Layout::build(&fake, 1_700_000_000).unwrap().manifest_digest,
            "sha256:3535d66f1ceec79bf6f676c9380c6dbac6b43433236145bf3323312a1588f92a"
        );
    }

    #[test]
    fn the_same_binary_gives_a_byte_identical_layout() {
        let fake = synthetic_elf(&[PT_LOAD], "");
        let a = Layout::build(&fake, 0).unwrap();
        let b = Layout::build(&fake, 0).unwrap();
        assert_eq!(a.files, b.files);
        assert_eq!(a.manifest_digest, b.manifest_digest);
        // The gzip header: no name (FLG 0), mtime 0, best compression (XFL 2), OS unknown.
        let layer = &a.files[4].1;
        assert_eq!(&layer[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 255]);
        // Another time or another binary gives another image.
        assert_ne!(
            Layout::build(&fake, 1).unwrap().manifest_digest,
            a.manifest_digest
        );
        let other = synthetic_elf(&[PT_LOAD, PT_LOAD], "");
        assert_ne!(
            Layout::build(&other, 0).unwrap().manifest_digest,
            a.manifest_digest
        );
    }

    #[test]
    fn the_ustar_header_has_the_standard_fields_and_a_gnu_style_checksum() {
        let archive = tar(&[0u8; 1234], 1_700_000_000).unwrap();
        let h = &archive[..BLOCK];
        assert_eq!(&h[..17], b"recording-canary\0");
        assert_eq!(&h[100..108], b"0000755\0");
        assert_eq!(&h[108..116], b"0000000\0");
        assert_eq!(&h[116..124], b"0000000\0");
        assert_eq!(&h[124..136], b"00000002322\0"); // 1234
        assert_eq!(&h[136..148], b"14524770400\0"); // 1700000000
        assert_eq!(h[156], b'0');
        assert_eq!(&h[257..265], b"ustar\x0000");
        assert_eq!(&h[329..345], b"0000000\x000000000\0"); // devmajor, devminor
        // The checksum: the unsigned sum of all bytes with the field itself counted as spaces.
        let mut spaced = h.to_vec();
        spaced[148..156].copy_from_slice(b"        ");
        let sum: u32 = spaced.iter().map(|&b| u32::from(b)).sum();
        assert_eq!(&h[148..156], format!("{sum:06o}\0 ").as_bytes());
    }

    #[test]
    fn the_tar_is_padded_to_blocks_and_lists_with_system_tar() {
        let data = b"#!fake binary\n";
        let archive = tar(data, 0).unwrap();
        assert_eq!(archive.len(), 4 * BLOCK); // header, one data block, two zero blocks
        assert_eq!(&archive[BLOCK..BLOCK + data.len()], data);
        assert!(archive[BLOCK + data.len()..].iter().all(|&b| b == 0));

        let dir = std::env::temp_dir().join(format!("xtask-image-tar-{}", std::process::id()));
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
    fn the_layout_links_index_manifest_config_and_layer_by_digest() {
        let fake = synthetic_elf(&[PT_LOAD], "");
        let layout = Layout::build(&fake, 0).unwrap();
        let blob = |d: &Value| -> Vec<u8> {
            let digest = d["digest"].as_str().unwrap();
            let bytes = file(&layout, &format!("blobs/sha256/{}", &digest[7..])).to_vec();
            assert_eq!(sha256_digest(&bytes), digest);
            assert_eq!(d["size"], bytes.len());
            bytes
        };
        let index: Value = serde_json::from_slice(file(&layout, "index.json")).unwrap();
        let desc = &index["manifests"][0];
        assert_eq!(desc["annotations"][ANNOTATION_REF_NAME], VERSION);
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
        assert_eq!(
            config["config"]["ExposedPorts"][PORT],
            serde_json::json!({})
        );
        assert_eq!(&tar[BLOCK..BLOCK + fake.len()], &fake[..]);
    }

    #[test]
    fn created_is_rfc3339_utc_in_whole_seconds() {
        assert_eq!(rfc3339(0).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400).unwrap(), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000).unwrap(), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(4_102_444_799).unwrap(), "2099-12-31T23:59:59Z");
        assert!(rfc3339(u64::MAX).is_err());
        assert!(rfc3339(1 << 40).is_err()); // past year 9999
    }
}
