//! The downlink against a real nats-server: a signed manifest's items are verified and
//! written; a tampered object or a manifest signed by another key is refused, reported
//! to the core and never written.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use ring::signature::{Ed25519KeyPair, KeyPair};

fn keypair() -> Ed25519KeyPair {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
}

fn sha(b: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn signed(kp: &Ed25519KeyPair, manifest: &serde_json::Value) -> bytes::Bytes {
    let body = serde_json::to_vec(manifest).unwrap();
    let mut v = kp.sign(&body).as_ref().to_vec();
    v.extend_from_slice(&body);
    v.into()
}

/// The KV bucket and object store as `edgectl setup` makes them.
async fn buckets(
    client: &async_nats::Client,
) -> (
    async_nats::jetstream::kv::Store,
    async_nats::jetstream::object_store::ObjectStore,
) {
    let js = async_nats::jetstream::new(client.clone());
    // create_key_value asks for account info in a shape nats-server 2.9 does not
    // send, so the operator side makes the bucket's stream as the KV layout says.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "KV_edge-config".into(),
        subjects: vec!["$KV.edge-config.>".into()],
        max_messages_per_subject: 1,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    let kv = js.get_key_value("edge-config").await.unwrap();
    let objects = js
        .create_object_store(async_nats::jetstream::object_store::Config {
            bucket: "edge-objects".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    (kv, objects)
}

fn write_public_key(path: &std::path::Path, kp: &Ed25519KeyPair) {
    std::fs::write(
        path,
        kp.public_key()
            .as_ref()
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>(),
    )
    .unwrap();
}

#[test]
fn signed_items_are_written_and_tampered_ones_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&tmp.path().join("pki"));
    let nats = Nats::start(&tmp.path().join("nats"), &pki);
    let rt = core_runtime();
    let kp = keypair();
    let key_file = tmp.path().join("core.pub");
    write_public_key(&key_file, &kp);
    let model: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (client, kv, objects) = rt.block_on(async {
        let client = core_client(&pki, &nats.url()).await;
        let (kv, objects) = buckets(&client).await;
        objects
            .put("model-v1", &mut model.as_slice())
            .await
            .unwrap();
        kv.put("s1.cfg.app", b"threshold = 3\n".to_vec().into())
            .await
            .unwrap();
        (client, kv, objects)
    });
    let mut reports = rt
        .block_on(client.subscribe("edge.s1.m1._downlink"))
        .unwrap();
    let manifest = serde_json::json!({"version": 1, "items": [
        {"kind": "models", "name": "model.bin", "store": "object", "key": "model-v1", "sha256": sha(&model)},
        {"kind": "config", "name": "app.toml", "store": "kv", "key": "s1.cfg.app", "sha256": sha(b"threshold = 3\n")},
    ]});
    rt.block_on(kv.put("s1.manifest", signed(&kp, &manifest)))
        .unwrap();

    let dir = tmp.path().join("edge");
    std::fs::create_dir_all(&dir).unwrap();
    let down = tmp.path().join("downlink");
    let mut f = Fabricd::configure(
        &dir,
        &format!(
            "{}\n[downlink]\npublic_key = \"{}\"\ndir = \"{}\"\n",
            pki.core_toml(&nats.url(), "client"),
            key_file.display(),
            down.display()
        ),
    );
    f.start();
    wait_for("the model to be written", Duration::from_secs(30), || {
        (std::fs::read(down.join("models/model.bin")).ok()? == model).then_some(())
    });
    // Items are applied one after the other: the config may follow the model.
    wait_for("the config to be written", Duration::from_secs(30), || {
        (std::fs::read(down.join("config/app.toml")).ok()? == b"threshold = 3\n").then_some(())
    });
    let report = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), reports.next())
            .await
            .unwrap()
            .unwrap()
    });
    let report: serde_json::Value = serde_json::from_slice(&report.payload).unwrap();
    assert_eq!(report["applied"].as_array().unwrap().len(), 2, "{report}");

    // The core signed new weights, but the object store holds other bytes.
    rt.block_on(objects.put("model-v2", &mut &b"evil weights"[..]))
        .unwrap();
    let tampered = serde_json::json!({"version": 2, "items": [
        {"kind": "models", "name": "model.bin", "store": "object", "key": "model-v2", "sha256": sha(b"good weights v2")},
    ]});
    rt.block_on(kv.put("s1.manifest", signed(&kp, &tampered)))
        .unwrap();
    let report = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), reports.next())
            .await
            .unwrap()
            .unwrap()
    });
    let report: serde_json::Value = serde_json::from_slice(&report.payload).unwrap();
    let refused = report["refused"].to_string();
    assert!(refused.contains("sha256"), "{report}");
    assert_eq!(
        std::fs::read(down.join("models/model.bin")).unwrap(),
        model,
        "the verified model stays"
    );
    assert!(!down.join("models/.model.bin.partial").exists());

    // A manifest signed by someone else.
    let forged = serde_json::json!({"version": 3, "items": [
        {"kind": "models", "name": "model.bin", "store": "object", "key": "model-v2", "sha256": sha(b"evil weights")},
    ]});
    rt.block_on(kv.put("s1.manifest", signed(&keypair(), &forged)))
        .unwrap();
    let report = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), reports.next())
            .await
            .unwrap()
            .unwrap()
    });
    let report: serde_json::Value = serde_json::from_slice(&report.payload).unwrap();
    assert!(
        report["refused"].to_string().contains("signature"),
        "{report}"
    );
    assert_eq!(std::fs::read(down.join("models/model.bin")).unwrap(), model);
    assert!(f.logged("downlink refused"), "{}", f.log_text());

    // An update carries when it was published: its copy gets that time, and the same
    // bytes published again get the new time without being fetched again (init takes
    // it for a new copy: a version it rolled back from is tried again).
    rt.block_on(objects.put("os-2.bundle", &mut &b"bundle bytes"[..]))
        .unwrap();
    let bundle = down.join("updates/os-2.bundle");
    let mtime = || {
        std::fs::metadata(&bundle)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
    };
    for (version, published) in [(4, 1_700_000_000_123u64), (5, 1_700_000_100_456)] {
        let offer = serde_json::json!({"version": version, "items": [
            {"kind": "updates", "name": "os-2.bundle", "store": "object", "key": "os-2.bundle",
             "sha256": sha(b"bundle bytes"), "version": "2", "published_ms": published},
        ]});
        rt.block_on(kv.put("s1.manifest", signed(&kp, &offer)))
            .unwrap();
        wait_for("the update's copy stamped", Duration::from_secs(30), || {
            (mtime()? == published).then_some(())
        });
    }
    assert_eq!(std::fs::read(&bundle).unwrap(), b"bundle bytes");
    assert!(f.is_running());
}

#[test]
fn an_interrupted_object_download_resumes_where_it_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&tmp.path().join("pki"));
    let nats = Nats::start(&tmp.path().join("nats"), &pki);
    let rt = core_runtime();
    let kp = keypair();
    let key_file = tmp.path().join("core.pub");
    write_public_key(&key_file, &kp);
    // 6 MiB that do not compress, in the object store's 128 KiB chunks.
    let bundle = noise(6 << 20, 0x2545_f491);
    rt.block_on(async {
        let client = core_client(&pki, &nats.url()).await;
        let (kv, objects) = buckets(&client).await;
        objects
            .put("bundle-v1", &mut bundle.as_slice())
            .await
            .unwrap();
        let manifest = serde_json::json!({"version": 1, "items": [
            {"kind": "updates", "name": "os.bundle", "store": "object", "key": "bundle-v1", "sha256": sha(&bundle)},
        ]});
        kv.put("s1.manifest", signed(&kp, &manifest)).await.unwrap();
    });

    let dir = tmp.path().join("edge");
    std::fs::create_dir_all(&dir).unwrap();
    let down = tmp.path().join("downlink");
    let config = |limit: &str| {
        format!(
            "{}\n[downlink]\npublic_key = \"{}\"\ndir = \"{}\"\n{limit}",
            pki.core_toml(&nats.url(), "client"),
            key_file.display(),
            down.display()
        )
    };
    // A thin link: 1 MiB/s, so the download takes six seconds.
    let mut f = Fabricd::configure(&dir, &config("max_kib_per_sec = 1024\n"));
    f.start();
    let partial = down.join("updates/.os.bundle.partial");
    let progress = down.join("updates/.os.bundle.progress");
    wait_for("two MiB downloaded", Duration::from_secs(30), || {
        let p: serde_json::Value = serde_json::from_slice(&std::fs::read(&progress).ok()?).ok()?;
        (p["bytes"].as_u64()? >= 2 << 20).then_some(())
    });
    f.kill9();
    let kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&progress).unwrap()).unwrap();
    let kept = kept["bytes"].as_u64().unwrap();
    assert!(kept < bundle.len() as u64, "the download was not cut");
    assert!(std::fs::metadata(&partial).unwrap().len() >= kept);
    assert!(!down.join("updates/os.bundle").exists());

    // Restarted (now without the limit), it fetches only the rest.
    let mut f = Fabricd::configure(&dir, &config(""));
    f.start();
    wait_for("the bundle to be written", Duration::from_secs(60), || {
        (std::fs::read(down.join("updates/os.bundle")).ok()? == bundle).then_some(())
    });
    assert!(f.logged("resuming the download"), "{}", f.log_text());
    assert_eq!(
        metric(&f, "fabricd_downlink_resumed_bytes_total"),
        Some(kept)
    );
    assert_eq!(
        metric(&f, "fabricd_downlink_bytes_total"),
        Some(bundle.len() as u64 - kept)
    );
    assert_eq!(
        metric(&f, "fabricd_downlink_items_total{result=\"applied\"}"),
        Some(1)
    );
    assert!(!partial.exists() && !progress.exists());
}
