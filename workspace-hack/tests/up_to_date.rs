//! The manifest lists what `generate.py` would list today: a dependency added or changed with other
//! features in one binary fails here rather than making the second release build recompile
//! the shared packages.

use std::path::Path;
use std::process::Command;

#[test]
fn the_manifest_unifies_every_shared_package() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(root.join("generate.py"))
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
