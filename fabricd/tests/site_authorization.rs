//! Authorization at the core, per site, against a real nats-server running the
//! configuration `edgectl nats-config` writes: a box of site s1 mirrors its records and
//! applies its manifests with nothing but its own permissions; site s1's certificate can
//! neither publish as site s2 nor read s2's downlink; a certificate the CA signed but
//! that names no user cannot connect, and a site removed from the configuration is cut
//! off when nats-server reloads it.

mod common;

use std::time::Duration;

use common::site_core::{write_access, Core};
use common::*;

#[test]
fn a_site_box_mirrors_and_applies_its_manifests_with_only_its_own_permissions() {
    let core = Core::start(&["s1", "s2"]);
    let tmp = core.tmp.path();
    let keys = tmp.join("keys");
    core.edgectl(&["keygen", "--out", keys.to_str().unwrap()]);
    let model = tmp.join("model.bin");
    std::fs::write(&model, noise(2 << 20, 0x1234_5678)).unwrap();
    let out = core.edgectl(&["put-object", "--name", "model-v1", model.to_str().unwrap()]);
    let model_sha = out.split_whitespace().last().unwrap().to_owned();
    let publish_config = |version: u32, text: &str| {
        let file = tmp.join("app.toml");
        std::fs::write(&file, text).unwrap();
        let out = core.edgectl(&["put-kv", "--kv-key", "s1.cfg.app", file.to_str().unwrap()]);
        let sha = out.split_whitespace().last().unwrap();
        let manifest = tmp.join("manifest.json");
        std::fs::write(
            &manifest,
            format!(
                r#"{{"version":{version},"items":[
                {{"kind":"models","name":"model.bin","store":"object","key":"model-v1","sha256":"{model_sha}"}},
                {{"kind":"config","name":"app.toml","store":"kv","key":"s1.cfg.app","sha256":"{sha}"}}]}}"#
            ),
        )
        .unwrap();
        core.edgectl(&[
            "publish",
            "--site",
            "s1",
            "--signing-key",
            keys.join("manifest.key").to_str().unwrap(),
            manifest.to_str().unwrap(),
        ]);
    };
    publish_config(1, "threshold = 1\n");

    // A box of site s1 (the harness's site) with the certificate of s1's boxes.
    let dir = tmp.join("edge");
    std::fs::create_dir_all(&dir).unwrap();
    let down = tmp.join("downlink");
    let mut f = Fabricd::configure(
        &dir,
        &format!(
            "{}\n[downlink]\npublic_key = \"{}\"\ndir = \"{}\"\n",
            core.pki.core_toml_reporting(&core.url(), "site-s1", 1),
            keys.join("manifest.pub").display(),
            down.display()
        ),
    );
    f.start();
    let config_is = |text: &str| {
        wait_for(
            &format!("app.toml to be {text:?}"),
            Duration::from_secs(20),
            || (std::fs::read(down.join("config/app.toml")).ok()? == text.as_bytes()).then_some(()),
        )
    };
    config_is("threshold = 1\n");
    assert_eq!(
        std::fs::read(down.join("models/model.bin")).unwrap(),
        std::fs::read(&model).unwrap()
    );
    // A manifest published while the box watches.
    publish_config(2, "threshold = 2\n");
    config_is("threshold = 2\n");

    let mut s = tcp(f.tcp);
    for i in 0..3 {
        produce(
            &mut s,
            &record("temp.rack1", format!("reading {i}").as_bytes()),
        )
        .unwrap();
    }
    wait_for("three records acked", Duration::from_secs(20), || {
        (metric(&f, "fabricd_records_out_total")? == 3).then_some(())
    });
    let subjects = wait_for(
        "the records and both downlink reports at the core",
        Duration::from_secs(10),
        || {
            let s = core.subjects("edge.>");
            (s.len() == 2 && s[0].1 == 2).then_some(s)
        },
    );
    assert_eq!(
        subjects,
        [
            ("edge.s1.m1._downlink".to_string(), 2),
            ("edge.s1.m1.temp.rack1".to_string(), 3)
        ]
    );
    // The box's status report, under its own key, with the acked offset.
    let status = core.operator();
    let reports = core
        .rt
        .block_on(status.js.get_key_value("edge-status"))
        .unwrap();
    let status = wait_for("the box's status report", Duration::from_secs(10), || {
        let report = core.rt.block_on(reports.get("s1.m1")).ok()??;
        let report: fabricd::uplink::BoxStatus = serde_json::from_slice(&report).unwrap();
        (report.classes[0].acked == Some(2)).then_some(report)
    });

    // Nothing the box did was refused: a missing permission would show in both logs and
    // end the box's session.
    let nats_log = core.nats.log_text();
    assert!(!nats_log.contains("Violation"), "{nats_log}");
    assert!(
        !f.log_contains("Violation") && !f.log_contains("the core reported an error"),
        "{}\n{status:?}",
        f.log_text()
    );
}

#[test]
fn a_site_certificate_cannot_publish_or_read_as_another_site() {
    let core = Core::start(&["s1", "s2"]);
    let tmp = core.tmp.path();
    let keys = tmp.join("keys");
    core.edgectl(&["keygen", "--out", keys.to_str().unwrap()]);
    let manifest = tmp.join("manifest.json");
    std::fs::write(&manifest, r#"{"version":1,"items":[]}"#).unwrap();
    for site in ["s1", "s2"] {
        core.edgectl(&[
            "publish",
            "--site",
            site,
            "--signing-key",
            keys.join("manifest.key").to_str().unwrap(),
            manifest.to_str().unwrap(),
        ]);
    }
    let s1 = core.connect("site-s1", "_INBOX_s1").unwrap();

    // Its own subject is taken; site s2's is refused and never reaches the stream.
    core.rt.block_on(async {
        let ack = s1
            .js
            .publish("edge.s1.m1.temp", "21.5".into())
            .await
            .unwrap();
        ack.await.expect("site s1's own record is stored");
        s1.client
            .publish("edge.s2.m1.temp", "forged".into())
            .await
            .unwrap();
        let forged = s1
            .js
            .publish("edge.s2.m1.temp", "forged".into())
            .await
            .unwrap();
        assert!(forged.await.is_err(), "a record as site s2 was acked");
        s1.client
            .publish("$KV.edge-status.s2.m1", "{}".into())
            .await
            .unwrap();
        s1.client.flush().await.unwrap();
    });
    s1.refused("Publish", "edge.s2.m1.temp");
    s1.refused("Publish", "$KV.edge-status.s2.m1");
    assert_eq!(
        core.subjects("edge.>"),
        [("edge.s1.m1.temp".to_string(), 1)],
        "the core holds a record under site s2"
    );

    // What the core holds of its records (asked before a resend): its own last record is
    // answered, another site's subject is refused.
    core.rt.block_on(async {
        let own = s1
            .client
            .request("$JS.API.DIRECT.GET.EDGE.edge.s1.m1.temp", "".into())
            .await
            .expect("site s1 asks for its own last record");
        assert_eq!(own.status, None, "{:?}", own.description);
        assert_eq!(&own.payload[..], b"21.5");
        let other = tokio::time::timeout(
            Duration::from_secs(2),
            s1.client
                .request("$JS.API.DIRECT.GET.EDGE.edge.s2.m1.temp", "".into()),
        )
        .await;
        assert!(
            !matches!(other, Ok(Ok(ref m)) if m.status.is_none()),
            "site s1 read site s2's last record"
        );
        s1.client.flush().await.unwrap();
    });
    s1.refused("Publish", "$JS.API.DIRECT.GET.EDGE.edge.s2.m1.temp");

    // Site s2's downlink: its manifest cannot be read, nor its keys watched, in any of the
    // ways the JetStream API offers.
    core.rt.block_on(async {
        let kv = s1.js.get_key_value("edge-config").await.unwrap();
        let own = kv.get("s1.manifest").await.unwrap();
        assert!(own.is_some(), "site s1 cannot read its own manifest");
        assert!(
            kv.get("s2.manifest").await.is_err(),
            "site s1 read site s2's manifest"
        );
        // How the box watches (a named consumer, the filter in the subject) ...
        use async_nats::jetstream::consumer::push::OrderedConfig;
        let named = kv
            .stream
            .create_consumer(OrderedConfig {
                name: Some("w1".into()),
                deliver_subject: s1.client.new_inbox(),
                filter_subject: "$KV.edge-config.s2.>".into(),
                ..Default::default()
            })
            .await;
        assert!(named.is_err(), "site s1 watches site s2's keys");
        // ... the client library's watch (the filter only in the request) ...
        assert!(kv.watch("s2.>").await.is_err());
        // ... and site s1's own subject with site s2's filter in the request: a box
        // asks for its manifests with direct gets and makes no consumer on the bucket,
        // so it may not make one even on its own keys.
        let crafted = serde_json::json!({"stream_name": "KV_edge-config", "config": {
            "name": "w2", "deliver_subject": s1.client.new_inbox(),
            "filter_subject": "$KV.edge-config.s2.>", "ack_policy": "none"}});
        let reply = s1
            .client
            .request(
                "$JS.API.CONSUMER.CREATE.KV_edge-config.w2.$KV.edge-config.s1.>",
                serde_json::to_vec(&crafted).unwrap().into(),
            )
            .await;
        assert!(
            reply
                .as_ref()
                .is_err_and(|e| e.kind() == async_nats::RequestErrorKind::NoResponders
                    || e.kind() == async_nats::RequestErrorKind::TimedOut),
            "a consumer of site s2's keys was asked for and answered: {:?}",
            reply.map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        );
        // Replies to other clients (site s2's boxes, the operator) are not for site s1.
        for inbox in ["_INBOX.>", "_INBOX_s2.>"] {
            let _sub = s1.client.subscribe(inbox).await.unwrap();
        }
        s1.client.flush().await.unwrap();
    });
    s1.refused(
        "Publish",
        "$JS.API.DIRECT.GET.KV_edge-config.$KV.edge-config.s2.manifest",
    );
    s1.refused(
        "Publish",
        "$JS.API.CONSUMER.CREATE.KV_edge-config.w1.$KV.edge-config.s2.>",
    );
    s1.refused(
        "Publish",
        "$JS.API.CONSUMER.CREATE.KV_edge-config.w2.$KV.edge-config.s1.>",
    );
    s1.refused("Publish", "$JS.API.CONSUMER.CREATE.KV_edge-config");
    s1.refused("Subscription", "_INBOX.>");
    s1.refused("Subscription", "_INBOX_s2.>");
}

#[test]
fn a_certificate_that_names_no_user_cannot_connect() {
    let core = Core::start(&["s1"]);
    // Signed by the core's CA, but its subject is no site's nor the operator's.
    let e = core.connect("stranger", "_INBOX_s1").err().unwrap();
    assert!(e.contains("authorization violation"), "{e}");
    let e = core.connect("client", "_INBOX").err().unwrap();
    assert!(e.contains("authorization violation"), "{e}");
    assert!(core.connect("site-s1", "_INBOX_s1").is_ok());
}

#[test]
fn a_site_removed_from_the_access_configuration_is_cut_off_on_reload() {
    let core = Core::start(&["s1", "s2"]);
    let s2 = core.connect("site-s2", "_INBOX_s2").unwrap();
    core.rt.block_on(async {
        let ack = s2.js.publish("edge.s2.m1.temp", "1".into()).await.unwrap();
        ack.await.unwrap();
    });
    write_access(&core.pki, &core.nats.dir, &["s1"]);
    core.nats.reload();
    wait_for(
        "site s2's connection to be closed",
        Duration::from_secs(10),
        || (s2.client.connection_state() != async_nats::connection::State::Connected).then_some(()),
    );
    let e = core.connect("site-s2", "_INBOX_s2").err().unwrap();
    assert!(e.contains("authorization violation"), "{e}");
    // Site s1 is untouched.
    let s1 = core.connect("site-s1", "_INBOX_s1").unwrap();
    core.rt.block_on(async {
        let ack = s1.js.publish("edge.s1.m1.temp", "1".into()).await.unwrap();
        ack.await.unwrap();
    });
}
