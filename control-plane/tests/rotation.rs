//! Key-encryption-key rotation: credentials sealed under KEK 1 are re-wrapped under KEK 2 by
//! `tokn-control rewrap`, after which the service runs with KEK 2 alone and still opens them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use common::*;
use serde_json::json;
use sqlx::Connection;
use tokn_testkit::control::random_hex32;
use tokn_testkit::{Behavior, ControlOptions, ControlProcess, FakeUpstream, TestDatabase};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_moves_every_credential_to_the_newest_key() {
    let db = TestDatabase::create("rotation").await;
    let fake = FakeUpstream::start(Behavior::default()).await.unwrap();
    let kek1 = (1, random_hex32());
    let kek2 = (2, random_hex32());
    let mut control = ControlProcess::start(
        &control_binary(),
        ControlOptions {
            database_url: Some(db.url.clone()),
            verify_openai_base: Some(fake.base_url()),
            keks: vec![kek1.clone()],
            ..ControlOptions::default()
        },
    );
    let c = Client::new();
    let m = market(&c, &control, &fake, &["sk-rotate-a", "sk-rotate-b"]).await;
    let versions = |url: String| async move {
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        let v: Vec<i64> = sqlx::query_scalar("SELECT kek_version FROM credentials ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        let _ = conn.close().await;
        v
    };
    assert_eq!(versions(db.url.clone()).await, [1, 1]);

    // Rotation: the operator adds KEK 2 and runs `rewrap` (the service may keep running).
    let (ok, log) = control.run_command("rewrap", std::slice::from_ref(&kek2));
    assert!(ok, "{log}");
    assert!(
        log.contains("re-wrapped 2 credential(s); 0 already current"),
        "{log}"
    );
    assert_eq!(versions(db.url.clone()).await, [2, 2]);
    let (ok, log) = control.run_command("rewrap", std::slice::from_ref(&kek2));
    assert!(
        ok && log.contains("re-wrapped 0 credential(s); 2 already current"),
        "{log}"
    );

    // KEK 1 retired: the service runs on KEK 2 alone and still opens every credential.
    control.kill();
    let control = ControlProcess::start(
        &control_binary(),
        ControlOptions {
            database_url: Some(db.url.clone()),
            verify_openai_base: Some(fake.base_url()),
            keks: vec![kek2],
            dir: Some(control.dir.clone()),
            ..ControlOptions::default()
        },
    );
    for id in &m.creds {
        let v = c
            .api(
                &control,
                "POST",
                &format!("/v1/credentials/{id}/verify"),
                &m.seller,
                None,
            )
            .await;
        assert_eq!(v["verify_status"], "valid", "{v}");
        assert_eq!(v["kek_version"], 2);
    }
    let made = c
        .api(
            &control,
            "POST",
            "/v1/credentials",
            &m.seller,
            Some(json!({"credential": {"provider": "openai", "api_key": "sk-new"}})),
        )
        .await;
    assert_eq!(
        made["kek_version"], 2,
        "new records are sealed under the newest key"
    );
    drop(control);
    db.drop_db().await;
}
