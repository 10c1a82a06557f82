//! Python tools the tests drive (the official OpenAI SDK, an OpenAPI validator), each in a venv
//! made once under the caller's target tmp dir and reused by later runs.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The interpreter of a venv at `dir/name` with `packages` installed (pip requirement strings).
pub fn venv_python(dir: &Path, name: &str, packages: &[&str]) -> PathBuf {
    let venv = dir.join(name);
    let python = venv.join("bin/python");
    let ready = venv.join(".ready");
    if !ready.exists() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "python3 -m venv {} failed", venv.display());
        let ok = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(packages)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "pip install {packages:?} failed");
        let _ = std::fs::write(&ready, "");
    }
    python
}
