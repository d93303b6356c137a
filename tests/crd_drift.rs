//! The CRD checked in under crds/ is exactly what `recording-canary crd` prints.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::process::Command;

#[test]
fn checked_in_crd_matches_what_the_binary_prints() {
    let out = Command::new(env!("CARGO_BIN_EXE_recording-canary"))
        .arg("crd")
        .output()
        .expect("run recording-canary crd");
    assert!(
        out.status.success(),
        "recording-canary crd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).expect("utf-8");
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/recordingcanaries.recordingcanary.dev.yaml"
    );
    let checked_in = std::fs::read_to_string(path)
        .expect("read crds/recordingcanaries.recordingcanary.dev.yaml");
    assert!(
        printed == checked_in,
        "crds/ drifted from the code; regenerate with:\n  cargo run -q -- crd > crds/recordingcanaries.recordingcanary.dev.yaml"
    );
}

#[test]
fn crd_has_the_admission_rules_and_printer_columns() {
    let y = recording_canary::api::crd_yaml().expect("render");
    for needle in [
        "maximum: 100",
        "minimum: 0",
        "x-kubernetes-validations",
        "shortNames",
        "rcanary",
        "Current",
        "subresources",
    ] {
        assert!(y.contains(needle), "CRD lacks {needle}");
    }
}
