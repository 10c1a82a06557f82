//! The operator's commands (`tokn-control accounts|keys|grant|pool|approve|usage|ledger|drain|
//! signin-link`) against a running control plane, as an operator types them: tables by
//! default, JSON with `--json`, clear errors and exit codes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use tokn_testkit::control::{ControlOptions, ControlProcess};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tokn-control"))
}

/// Runs `tokn-control ARGS` against `control`; (exit code, stdout, stderr).
fn run(control: &ControlProcess, token: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary())
        .args(["--url", &control.url()])
        .args(args)
        .env("TOKN_ADMIN_TOKEN", token)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn the_operator_runs_everyday_tasks_from_the_command_line() {
    let control = ControlProcess::start(&binary(), ControlOptions::default());
    let admin = control.admin_token.clone();

    let (code, out, err) = run(
        &control,
        &admin,
        &["--json", "accounts", "create", "ana@example.com", "buyer"],
    );
    assert_eq!(code, 0, "{err}");
    let made: Value = serde_json::from_str(&out).unwrap();
    let id = made["account"]["id"].as_str().unwrap().to_owned();
    assert!(made["token"].as_str().unwrap().starts_with("tok_acct_"));

    let (code, out, _) = run(&control, &admin, &["accounts", "list"]);
    assert_eq!(code, 0);
    let mut lines = out.lines();
    assert_eq!(
        lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["id", "email", "role", "status"]
    );
    assert!(
        out.contains(&id) && out.contains("ana@example.com  buyer  active"),
        "{out}"
    );

    // A grant, twice with one reference: the money moves once.
    for _ in 0..2 {
        let (code, _, err) = run(
            &control,
            &admin,
            &[
                "grant",
                &id,
                "2.50",
                "--reference",
                "promo-1",
                "--memo",
                "promo",
            ],
        );
        assert_eq!(code, 0, "{err}");
    }
    let (_, out, _) = run(&control, &admin, &["--json", "accounts", "show", &id]);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        shown["balance_micros"], 12_500_000,
        "welcome credit + one grant: {shown}"
    );
    let (code, _, err) = run(
        &control,
        &admin,
        &["grant", &id, "1.2.3", "--reference", "x"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("not an amount of dollars"), "{err}");

    // The account's keys, and a leaked one revoked.
    let token = made["token"].as_str().unwrap();
    let key: Value = tokio::runtime::Runtime::new().unwrap().block_on(async {
        reqwest::Client::new()
            .post(format!("{}/v1/keys", control.url()))
            .bearer_auth(token)
            .json(&serde_json::json!({"name": "laptop"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    let key_id = key["id"].as_str().unwrap();
    let (code, out, err) = run(&control, &admin, &["keys", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("id") && out.contains(key_id) && out.contains("laptop"),
        "{out}"
    );
    let (code, out, err) = run(&control, &admin, &["keys", &id, "--revoke", key_id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked_at_ms\t1"), "{out}");

    let (code, out, _) = run(&control, &admin, &["accounts", "suspend", &id]);
    assert_eq!(code, 0);
    assert!(out.contains("status\tsuspended"), "{out}");
    let (_, out, _) = run(&control, &admin, &["accounts", "resume", &id]);
    assert!(out.contains("status\tactive"), "{out}");

    let (code, out, _) = run(&control, &admin, &["ledger"]);
    assert_eq!(code, 0);
    assert!(out.contains("imbalance_micros\t0"), "{out}");
    let (code, out, _) = run(&control, &admin, &["--json", "drain"]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["applied"], 0);
    let (code, out, _) = run(&control, &admin, &["usage", "--account", &id]);
    assert_eq!(code, 0);
    assert!(out.starts_with("request_id"), "{out}");
    let (code, out, _) = run(&control, &admin, &["signin-link"]);
    assert_eq!(code, 0);
    assert!(out.contains("/signin/link?token=sl_"), "{out}");

    // Errors say what went wrong, with a failing exit code.
    let (code, _, err) = run(&control, &admin, &["pool", "pool_nope", "pause"]);
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");
    let (code, _, err) = run(&control, &admin, &["pool", "pool_nope", "explode"]);
    assert_eq!(code, 1);
    assert!(err.contains("not pause or resume"), "{err}");
    let (code, _, err) = run(
        &control,
        "admin-wrong-token-0123456789",
        &["accounts", "list"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
    assert!(
        !err.contains("admin-wrong-token"),
        "the token is never echoed: {err}"
    );
}
