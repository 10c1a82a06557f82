//! The sealed snapshot file and the control-plane watch client.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokn_proxy::control::{
    read_sealed, seal, unseal, write_sealed, ControlSync, SealError, SnapshotFileError, SyncError,
};
use tokn_proxy::hot_state::HotState;
use tokn_proxy::snapshot::{ConfigSource, Snapshot, SnapshotSlot};

use crate::{load, pushed};

const KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

fn key() -> [u8; 32] {
    tokn_config::decode_hex32(KEY_HEX).unwrap()
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "tokn-state-{name}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn pushed_json(version: u64) -> Vec<u8> {
    let keys = serde_json::json!([{"id": "k1", "account": "a1",
        "key_sha256": hex::encode(tokn_config::hash_key("tok_test_persisted_key_01"))}]);
    serde_json::to_vec(&pushed(version, Some(keys))).unwrap()
}

#[test]
fn a_sealed_snapshot_round_trips_private_and_unreadable() {
    let d = dir("seal");
    let path = d.join("snapshot.sealed");
    let plain = pushed_json(4);
    write_sealed(&path, &key(), &plain).unwrap();
    let first = std::fs::read(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(first.starts_with(b"tokn-snapshot-1\n"));
    // The seller credential and the catalog are not readable in the file.
    for needle in [&b"sk-gemini-never-logged"[..], b"mock-pool", b"version"] {
        assert!(!first.windows(needle.len()).any(|w| w == needle));
    }
    assert_eq!(read_sealed(&path, &key()).unwrap().unwrap(), plain);
    // A fresh nonce on every write: the same plaintext seals differently.
    write_sealed(&path, &key(), &plain).unwrap();
    let second = std::fs::read(&path).unwrap();
    assert_ne!(first, second);
    assert_eq!(unseal(&key(), &second).unwrap(), plain);
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(read_sealed(&d.join("absent"), &key()).unwrap().is_none());
}

#[test]
fn a_tampered_or_truncated_snapshot_is_rejected() {
    let d = dir("tamper");
    let path = d.join("snapshot.sealed");
    write_sealed(&path, &key(), &pushed_json(4)).unwrap();
    let good = std::fs::read(&path).unwrap();
    // Every single flipped byte is caught: tag, nonce, ciphertext or authentication tag.
    for i in (0..good.len()).step_by(7) {
        let mut bad = good.clone();
        bad[i] ^= 0x01;
        let err = unseal(&key(), &bad).unwrap_err();
        let expected = if i < 16 {
            SealError::Format
        } else {
            SealError::Corrupt
        };
        assert_eq!(err, expected, "byte {i}");
    }
    assert_eq!(
        unseal(&key(), &good[..good.len() - 1]).unwrap_err(),
        SealError::Corrupt
    );
    assert_eq!(unseal(&key(), &good[..20]).unwrap_err(), SealError::Format);
    assert_eq!(unseal(&key(), b"").unwrap_err(), SealError::Format);
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x80;
    std::fs::write(&path, &bad).unwrap();
    assert!(matches!(
        read_sealed(&path, &key()),
        Err(SnapshotFileError::Seal(SealError::Corrupt))
    ));
}

#[test]
fn a_snapshot_sealed_under_another_key_is_rejected() {
    let d = dir("wrongkey");
    let path = d.join("snapshot.sealed");
    write_sealed(&path, &key(), &pushed_json(4)).unwrap();
    let mut other = key();
    other[0] ^= 1;
    assert!(matches!(
        read_sealed(&path, &other),
        Err(SnapshotFileError::Seal(SealError::Corrupt))
    ));
}

fn control_base(url: &str, snapshot: &Path, token: &str) -> tokn_config::ValidConfig {
    load(&format!(
        "[control]\nurl = \"{url}\"\ntoken = \"{token}\"\nsnapshot_path = \"{}\"\nsnapshot_key = \"{KEY_HEX}\"\nwatch_timeout_s = 1\n",
        snapshot.display()
    ))
}

fn sync_for(base: &tokn_config::ValidConfig) -> (ControlSync, Arc<SnapshotSlot>) {
    let slot = Arc::new(SnapshotSlot::new(Snapshot::empty(), ConfigSource::None));
    let hot = Arc::new(HotState::from_config(base).unwrap());
    (ControlSync::new(base, slot.clone(), hot).unwrap(), slot)
}

#[test]
fn the_persisted_snapshot_is_served_at_start_and_a_bad_one_ignored() {
    let d = dir("persisted");
    let path = d.join("snapshot.sealed");
    let base = control_base("http://127.0.0.1:9", &path, "proxy-token");

    // Nothing persisted: the empty snapshot stays.
    let (sync, slot) = sync_for(&base);
    assert_eq!(sync.load_persisted(), None);
    assert_eq!((slot.version(), slot.source()), (0, ConfigSource::None));

    write_sealed(&path, &key(), &pushed_json(12)).unwrap();
    let (sync, slot) = sync_for(&base);
    assert_eq!(sync.load_persisted(), Some(12));
    assert_eq!(slot.version(), 12);
    assert_eq!(slot.source(), ConfigSource::Persisted);
    let snap = slot.load();
    assert!(snap.models.contains_key("mock"));
    assert!(snap
        .keys
        .get(&tokn_config::hash_key("tok_test_persisted_key_01"))
        .is_some());
    assert_eq!(tokn_proxy::metrics::CONFIG_POOLS_SKIPPED.get(), 1);
    // An older version is never applied over a newer one.
    assert!(matches!(
        sync.apply(&pushed_json(11), ConfigSource::Control),
        Err(SyncError::Stale { got: 11, have: 12 })
    ));
    // Unknown fields are refused.
    let mut odd: serde_json::Value = serde_json::from_slice(&pushed_json(13)).unwrap();
    odd["surprise"] = serde_json::json!(1);
    assert!(matches!(
        sync.apply(&serde_json::to_vec(&odd).unwrap(), ConfigSource::Control),
        Err(SyncError::Parse(_))
    ));

    // Tampered: ignored, the proxy waits for the control plane instead.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[40] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let (sync, slot) = sync_for(&base);
    assert_eq!(sync.load_persisted(), None);
    assert_eq!(slot.version(), 0);
}

fn delta_json(from: u64, version: u64, keys: serde_json::Value, revoked: &[&str]) -> Vec<u8> {
    let revoked: Vec<String> = revoked
        .iter()
        .map(|k| hex::encode(tokn_config::hash_key(k)))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "from": from, "version": version, "keys": keys, "revoked": revoked}))
    .unwrap()
}

fn delta_key(id: &str, key: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "account": "a1",
        "key_sha256": hex::encode(tokn_config::hash_key(key))})
}

/// A delta log record as the proxy appends it: length (u32, little-endian), then sealed.
fn log_record(plain: &[u8]) -> Vec<u8> {
    let sealed = seal(&key(), plain).unwrap();
    let mut record = (sealed.len() as u32).to_le_bytes().to_vec();
    record.extend(sealed);
    record
}

#[test]
fn persisted_deltas_replay_in_order_up_to_one_a_crash_cut_short() {
    let d = dir("deltas");
    let path = d.join("snapshot.sealed");
    let log = d.join("snapshot.sealed.deltas");
    let base = control_base("http://127.0.0.1:9", &path, "proxy-token");
    write_sealed(&path, &key(), &pushed_json(12)).unwrap();
    let third = log_record(&delta_json(
        15,
        16,
        serde_json::json!([delta_key("k3", "tok_test_delta_key_03")]),
        &[],
    ));
    let mut bytes = log_record(&delta_json(
        12,
        13,
        serde_json::json!([delta_key("k2", "tok_test_delta_key_02")]),
        &[],
    ));
    bytes.extend(log_record(&delta_json(
        13,
        15,
        serde_json::json!([]),
        &["tok_test_persisted_key_01"],
    )));
    // The last append was cut short by a crash.
    bytes.extend(&third[..third.len() - 5]);
    std::fs::write(&log, &bytes).unwrap();

    let (sync, slot) = sync_for(&base);
    assert_eq!(sync.load_persisted(), Some(15));
    let snap = slot.load();
    let has = |k: &str| snap.keys.get(&tokn_config::hash_key(k)).is_some();
    assert!(has("tok_test_delta_key_02"));
    assert!(
        !has("tok_test_persisted_key_01"),
        "revoked by the second delta"
    );
    assert!(
        !has("tok_test_delta_key_03"),
        "the torn record is not applied"
    );
    assert!(
        snap.models.contains_key("mock"),
        "the rest is the sealed file's"
    );

    // A delta from another version, or one naming a model the catalog lacks, changes nothing.
    assert!(matches!(
        sync.apply_delta(
            &delta_json(14, 16, serde_json::json!([]), &[]),
            ConfigSource::Control
        ),
        Err(SyncError::Gap { from: 14, have: 15 })
    ));
    let mut odd = delta_key("k4", "tok_test_delta_key_04");
    odd["allowed_models"] = serde_json::json!(["no-such-model"]);
    assert!(matches!(
        sync.apply_delta(
            &delta_json(15, 16, serde_json::json!([odd]), &[]),
            ConfigSource::Control
        ),
        Err(SyncError::Config(_))
    ));
    assert_eq!(slot.version(), 15);

    // The torn record was cut off: what comes next is appended after the last good one.
    let whole = bytes.len() - (third.len() - 5);
    assert_eq!(std::fs::metadata(&log).unwrap().len(), whole as u64);

    // A newer sealed file with the older log beside it (a crash between writing the file and
    // emptying the log): the file's version, the log's deltas refused and cut off.
    write_sealed(&path, &key(), &pushed_json(20)).unwrap();
    let (sync, slot) = sync_for(&base);
    assert_eq!(sync.load_persisted(), Some(20));
    assert!(slot
        .load()
        .keys
        .get(&tokn_config::hash_key("tok_test_delta_key_02"))
        .is_none());
    assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
    let _ = std::fs::remove_dir_all(&d);
}

/// What the watch client does against the real control plane (a sync, a 204, a refused token)
/// is tested with `tokn-control` itself in `control-plane/tests/proxy_sync.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_control_plane_is_a_transport_error_that_names_no_token() {
    let d = dir("watch");
    let base = control_base(
        "http://127.0.0.1:9",
        &d.join("snapshot.sealed"),
        "proxy-token-unsent",
    );
    let (sync, slot) = sync_for(&base);
    let err = sync.watch_once().await.unwrap_err();
    assert!(matches!(err, SyncError::Transport(_)), "{err}");
    assert!(!err.to_string().contains("proxy-token-unsent"), "{err}");
    assert!(!format!("{sync:?}").contains("proxy-token-unsent"));
    assert_eq!((slot.version(), slot.source()), (0, ConfigSource::None));
    assert_eq!(slot.sync_age_s(), None);
}

#[test]
fn the_control_plane_ca_file_is_loaded_or_refused_at_start() {
    let d = dir("ca");
    let path = d.join("snapshot.sealed");
    let with_ca = |ca: &Path| {
        let base = load(&format!(
            "[control]\nurl = \"https://127.0.0.1:9\"\ntoken = \"t\"\nsnapshot_path = \"{}\"\nsnapshot_key = \"{KEY_HEX}\"\nca_file = \"{}\"\n",
            path.display(),
            ca.display()
        ));
        let slot = Arc::new(SnapshotSlot::new(Snapshot::empty(), ConfigSource::None));
        let hot = Arc::new(HotState::from_config(&base).unwrap());
        ControlSync::new(&base, slot, hot).map(|_| ())
    };
    let ca = tokn_testkit::tls::TestCa::create(&d).unwrap();
    with_ca(&ca.ca_cert_path).unwrap();
    let err = with_ca(&d.join("missing.pem")).unwrap_err();
    assert!(err.starts_with("control.ca_file"), "{err}");
    std::fs::write(d.join("empty.pem"), "not a certificate\n").unwrap();
    let err = with_ca(&d.join("empty.pem")).unwrap_err();
    assert!(err.starts_with("control.ca_file"), "{err}");
}
