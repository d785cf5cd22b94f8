//! The operator's tool against a real nats-server: set up the core, sign and publish a
//! manifest that an edge applies, see the edge in `status`, and tail its records.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// edgectl as the operator runs it against `url`; the subcommand follows.
fn edgectl_cmd(pki: &Pki, url: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_edgectl"));
    c.arg("--server")
        .arg(url)
        .arg("--ca")
        .arg(pki.path("ca.pem"))
        .arg("--cert")
        .arg(pki.path("client.pem"))
        .arg("--key")
        .arg(pki.path("client.key"));
    c
}

fn edgectl(pki: &Pki, url: &str, args: &[&str]) -> String {
    let out = edgectl_cmd(pki, url)
        .args(args)
        .output()
        .expect("run edgectl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "edgectl {args:?}: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn operator_sets_up_the_core_publishes_to_a_site_and_sees_it() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&tmp.path().join("pki"));
    let nats = Nats::start(&tmp.path().join("nats"), &pki);
    let url = nats.url();
    let keys = tmp.path().join("keys");
    edgectl(&pki, &url, &["setup"]);
    // Setting up twice is harmless.
    edgectl(&pki, &url, &["setup"]);
    edgectl(&pki, &url, &["keygen", "--out", keys.to_str().unwrap()]);
    let model = tmp.path().join("model.bin");
    std::fs::write(&model, vec![42u8; 200_000]).unwrap();
    let out = edgectl(
        &pki,
        &url,
        &["put-object", "--name", "model-v1", model.to_str().unwrap()],
    );
    let sha = out.split_whitespace().last().unwrap().to_owned();
    let manifest = tmp.path().join("manifest.json");
    std::fs::write(
        &manifest,
        format!(r#"{{"version":1,"items":[{{"kind":"models","name":"model.bin","store":"object","key":"model-v1","sha256":"{sha}"}}]}}"#),
    )
    .unwrap();
    edgectl(
        &pki,
        &url,
        &[
            "publish",
            "--site",
            "s1",
            "--signing-key",
            keys.join("manifest.key").to_str().unwrap(),
            manifest.to_str().unwrap(),
        ],
    );

    let dir = tmp.path().join("edge");
    std::fs::create_dir_all(&dir).unwrap();
    let down = tmp.path().join("downlink");
    let mut f = Fabricd::configure(
        &dir,
        &format!(
            "{}\n[downlink]\npublic_key = \"{}\"\ndir = \"{}\"\n",
            pki.core_toml_reporting(&url, "client", 1),
            keys.join("manifest.pub").display(),
            down.display()
        ),
    );
    f.start();
    wait_for("the model to be written", Duration::from_secs(30), || {
        (std::fs::read(down.join("models/model.bin")).ok()?.len() == 200_000).then_some(())
    });
    let mut s = tcp(f.tcp);
    for i in 0..3 {
        produce(
            &mut s,
            &record("temp.rack1", format!("reading {i}").as_bytes()),
        )
        .unwrap();
    }
    // Telemetry JSON goes compressed; bytes that do not compress go as they are.
    let json = r#"{"sensor":"temp","rack":1,"value":21.5,"unit":"C"}"#.repeat(80);
    produce(&mut s, &record("temp.rack1", json.as_bytes())).unwrap();
    let noise = noise(4096, 0x9e37_79b9);
    produce(&mut s, &record("cam.rack1", &noise)).unwrap();
    // Five records and the downlink report of the manifest.
    let tail = edgectl(
        &pki,
        &url,
        &["tail", "--site", "s1", "--all", "--count", "6"],
    );
    // Each line: subject, id (`<site>/<machine>/<offset>.<crc>`), value.
    let line = |offset: u64, value: &str| {
        tail.lines().any(|l| {
            l.strip_prefix(&format!("edge.s1.m1.temp.rack1 s1/m1/{offset}."))
                .and_then(|rest| rest.split_once(' '))
                .is_some_and(|(crc, v)| crc.len() == 8 && v == value)
        })
    };
    assert!(line(2, "reading 2"), "{tail}");
    assert!(
        line(3, &json.escape_debug().to_string()),
        "the compressed record does not read back as sent:\n{tail}"
    );
    wait_for("all five records acked", Duration::from_secs(20), || {
        (metric(&f, "fabricd_records_out_total")? == 5).then_some(())
    });
    assert_eq!(
        metric(&f, "fabricd_uplink_compressed_records_total"),
        Some(1)
    );
    let out = metric(&f, "fabricd_bytes_out_total").unwrap();
    let wire = metric(&f, "fabricd_uplink_wire_bytes_total").unwrap();
    assert!(
        wire < out - json.len() as u64 / 2,
        "compression saved too little: {wire} bytes on the wire for {out}"
    );

    // The box reports what the core acked and its lag: none once the core has everything.
    let (text, cols) = wait_for(
        "a status report after the acks",
        Duration::from_secs(20),
        || {
            let status = edgectl(&pki, &url, &["status"]);
            let line = status.lines().find(|l| l.starts_with("s1.m1"))?;
            let cols: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
            (cols[3] == "4").then_some((status, cols))
        },
    );
    assert_eq!(cols[1], "5", "records at the core:\n{text}");
    assert_eq!(cols[2], "4", "last offset:\n{text}");
    assert_eq!(cols[4], "0", "lag records:\n{text}");
    assert_eq!(cols[5], "0", "lag bytes:\n{text}");
    assert_eq!(cols[6], "0", "dropped:\n{text}");
    let contact: u64 = cols[7].trim_end_matches('s').parse().unwrap();
    assert!(contact <= 5, "last contact {contact}s ago:\n{text}");
}

/// The core down for a few seconds while the operator publishes (a server restarted):
/// `publish` says it is trying again and gets through once the core is back; with
/// `--retry-secs 0` it fails at once, naming the connection it could not make.
#[test]
fn publish_tries_again_while_the_core_is_down_and_gets_through() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&tmp.path().join("pki"));
    let mut nats = Nats::start(&tmp.path().join("nats"), &pki);
    let url = nats.url();
    let keys = tmp.path().join("keys");
    edgectl(&pki, &url, &["setup"]);
    edgectl(&pki, &url, &["keygen", "--out", keys.to_str().unwrap()]);
    let manifest = tmp.path().join("manifest.json");
    std::fs::write(
        &manifest,
        format!(
            r#"{{"version":7,"items":[{{"kind":"models","name":"m.bin","store":"object","key":"m-v7","sha256":"{}"}}]}}"#,
            "ab".repeat(32)
        ),
    )
    .unwrap();
    let key = keys.join("manifest.key");
    let publish = |retry: &str| {
        let mut c = edgectl_cmd(&pki, &url);
        c.args([
            "--retry-secs",
            retry,
            "publish",
            "--site",
            "s1",
            "--signing-key",
        ])
        .arg(&key)
        .arg(&manifest);
        c
    };
    nats.stop();
    let once = publish("0").output().unwrap();
    let said = String::from_utf8_lossy(&once.stderr).into_owned();
    assert!(
        !once.status.success() && said.contains("cannot connect") && !said.contains("trying again"),
        "{said}"
    );
    let mut retrying = publish("60")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    nats.restart();
    wait_for("publish to finish", Duration::from_secs(60), || {
        retrying.try_wait().unwrap().map(|_| ())
    });
    let out = retrying.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("{said}{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("cannot connect") && said.contains("trying again in 2s (--retry-secs 60)"),
        "{said}"
    );
    // The manifest is at the core: a second publish of it is answered at once.
    let again = publish("0").output().unwrap();
    assert!(again.status.success(), "{again:?}");
}
