//! The control plane over HTTPS: its API and the proxies' watch, with client certificates when
//! it requires them; plain HTTP is not spoken on a TLS port.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::time::Duration;

use tokn_testkit::control::random_hex32;
use tokn_testkit::harness::temp_dir;
use tokn_testkit::tls::TestCa;
use tokn_testkit::{ControlOptions, ControlProcess};

mod common;

use common::*;

fn trusting(ca: &TestCa, identity: bool) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.ca_cert_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(5));
    if identity {
        let pem = format!("{}\n{}", ca.leaf_cert_pem, ca.leaf_key_pem);
        builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

/// A proxy fed over HTTPS (its control section trusting the test CA, with a client
/// certificate when `identity`) reaches the pushed version.
async fn fed_over_tls(control: &ControlProcess, ca: &TestCa, identity: bool) -> bool {
    let dir = temp_dir("tls-proxy");
    let mut body = proxy_body(control, &dir.join("snapshot.sealed"), None);
    body.push_str(&format!("ca_file = \"{}\"\n", ca.ca_cert_path.display()));
    if identity {
        body.push_str(&format!(
            "client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
            ca.leaf_cert_path.display(),
            ca.leaf_key_path.display()
        ));
    }
    let proxy = start_proxy_with(control, &body, &random_hex32(), &[("TOKN_LOG", "info")]);
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        if proxy_status(&proxy).await["config_source"] == "control" {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_and_the_watch_speak_tls() {
    let ca = TestCa::create(&temp_dir("tls-ca")).unwrap();
    let control = ControlProcess::start(
        &control_binary(),
        ControlOptions {
            tls: Some((ca.leaf_cert_path.clone(), ca.leaf_key_path.clone(), None)),
            ..ControlOptions::default()
        },
    );
    assert!(control.url().starts_with("https://"));
    let https = trusting(&ca, false);
    let health = https
        .get(format!("{}/healthz", control.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let me = https
        .get(format!("{}/v1/admin/settings", control.url()))
        .bearer_auth(&control.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
    // Plain HTTP on the TLS port gets no HTTP answer; a client that does not trust the CA
    // gets no connection.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{}/healthz", control.port);
    assert!(
        plain.get(url).send().await.is_err(),
        "plain HTTP was answered"
    );
    let strangers = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    assert!(strangers
        .get(format!("{}/healthz", control.url()))
        .send()
        .await
        .is_err());
    // A stalled handshake holds up no one.
    let _stalled = std::net::TcpStream::connect(("127.0.0.1", control.port)).unwrap();
    assert_eq!(
        https
            .get(format!("{}/healthz", control.url()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        fed_over_tls(&control, &ca, false).await,
        "a proxy follows the watch over TLS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_when_a_client_ca_is_set() {
    let ca = TestCa::create(&temp_dir("tls-ca")).unwrap();
    let control = ControlProcess::start(
        &control_binary(),
        ControlOptions {
            tls: Some((
                ca.leaf_cert_path.clone(),
                ca.leaf_key_path.clone(),
                Some(ca.ca_cert_path.clone()),
            )),
            ..ControlOptions::default()
        },
    );
    let url = format!("{}/healthz", control.url());
    assert!(
        trusting(&ca, false).get(&url).send().await.is_err(),
        "no certificate, no answer"
    );
    let ok = trusting(&ca, true).get(&url).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert!(
        fed_over_tls(&control, &ca, true).await,
        "a proxy with its certificate is fed"
    );
    assert!(
        !fed_over_tls(&control, &ca, false).await,
        "a proxy without one is not"
    );
}
