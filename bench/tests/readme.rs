//! The README's headline performance table is the committed results' (`bench/headline.py`
//! makes it from `bench/results/results.json`), so the two never disagree.

#[test]
fn the_readme_quotes_the_committed_results() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the bench crate is in the workspace");
    let out = std::process::Command::new("python3")
        .arg(root.join("bench/headline.py"))
        .arg("--check")
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
