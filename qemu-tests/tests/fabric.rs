//! The data fabric from inside the appliance: fabricd in the guest mirrors records to a
//! real nats-server on the host (TLS with client certificates, JetStream), exactly once
//! and in order, and catches up by itself after the link is cut.
//!
//! The box's core address and its site's enrollment certificate reach it as site
//! provisioning (fw_cfg item `opt/org.edgeos/provision`, unpacked by init into
//! /var/lib/edge/provision). Its TPM comes from a manufacturer (swtpm_setup with an EK
//! certificate); the operator enrolls it with `edgectl enroll`, which checks the TPM and
//! the boot against the image's pcr11.json and issues the site certificate for a key in
//! the TPM, and everything after flows under that key. The core runs the access
//! configuration `edgectl nats-config` writes (the box may use only its site's subjects). The
//! guest reaches the core at 10.0.2.100:4222 (a user-net guest forward whose relay,
//! socat, connects to a proxy this test owns, so the test can cut the link); the test
//! posts records to fabricd's HTTP listener through a host forward.
//!
//! The box's metrics: its fabricd scrapes init, fabricd, storaged and noded, and the operator's
//! `edgectl prometheus` writes them into a real Prometheus on the host, labelled with the
//! box (its pool's size among them); a minute's cut in which storaged is killed four
//! times arrives afterwards at its own times, and the crash-loop alert fires; its service
//! and pod logs reach `edgectl logs`.
//!
//! The other direction: the operator publishes a signed downlink manifest delivering a
//! pod, which noded runs; then a newer image allowlist, after which a pod whose image it
//! leaves out is refused while the running one carries on.

use anyhow::{bail, Context, Result};
use qemu_tests::core::{free_port, operator_key, run, Operator};
use qemu_tests::{all_ready, pod, pod_running as running, Machine, Options};
use sha2::Digest as _;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "../../fabricd/tests/common/prometheus.rs"]
mod prometheus;

const TOPIC: &str = "sensors.temp";
/// What the image's sensor pod posts to (image/overlay/etc/edge/pods/sensor.yaml).
const SENSOR_TOPIC: &str = "pods.sensor.temp0";
const SUBJECT: &str = "edge.site0.edge0.sensors.temp";

/// A pod the core delivers: a sensor printing to its log only.
const RELAY: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: relay
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  containers:
    - name: relay
      image: edge.local/sensor:1
      env:
        - name: SENSOR_NAME
          value: relay0
"#;

/// The same image under another pod, delivered after an allowlist that leaves it out.
const STRANGER: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: stranger
spec:
  hostNetwork: true
  containers:
    - name: stranger
      image: edge.local/sensor:1
"#;

fn unix_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// What the fabric scenario asks the core about its records.
trait Records {
    fn cmd(&self) -> Command;
    /// Records of `topic` the core holds from this box (`edgectl status`).
    fn records_of(&self, topic: &str) -> Result<u64> {
        let out = run(self.cmd().args(["status", "--topic", topic]))?;
        Ok(out
            .lines()
            .find(|l| l.starts_with("site0.edge0"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0))
    }

    /// The test's own records (the box's sensor pod posts beside them).
    fn records(&self) -> Result<u64> {
        self.records_of(TOPIC)
    }

    fn wait_records(&self, n: u64, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let have = self.records()?;
            if have >= n {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!("the core holds {have} of {n} records after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Every record of the test's topic at the core, in stream order: (subject,
    /// message id, value).
    fn all(&self, n: u64) -> Result<Vec<AtCore>> {
        self.tail(TOPIC, n)
    }

    /// The first `n` records of `topic` at the core, in stream order.
    fn tail(&self, topic: &str, n: u64) -> Result<Vec<AtCore>> {
        let out = run(self
            .cmd()
            .args([
                "tail",
                "--site",
                "site0",
                "--topic",
                topic,
                "--all",
                "--producer",
                "--count",
            ])
            .arg(n.to_string()))?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(4, ' ');
                Some(AtCore {
                    subject: f.next()?.into(),
                    id: f.next()?.into(),
                    producer: f.next()?.into(),
                    value: f.next()?.into(),
                })
            })
            .collect())
    }
}

impl Records for Operator {
    fn cmd(&self) -> Command {
        Operator::cmd(self)
    }
}

/// A record as `edgectl tail --producer` prints it.
struct AtCore {
    subject: String,
    /// The message id (`<site>/<machine>/<offset>`).
    id: String,
    /// The Edge-Producer fabricd stamped.
    producer: String,
    /// The value, escaped.
    value: String,
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// One keep-alive HTTPS connection to fabricd in the guest, as a machine on the site
/// network makes it: TLS with its client certificate (`plc`, CN plc-7).
struct Producer {
    conn: BufReader<Tls>,
}

/// The TLS client of a site machine holding `<client>.pem`/`.key` of the test CA in
/// `dir`, trusting that CA.
fn site_machine(
    dir: &std::path::Path,
    client: &str,
) -> Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = |n: &str| -> Result<Vec<CertificateDer<'static>>> {
        Ok(CertificateDer::pem_file_iter(dir.join(n))?.collect::<Result<_, _>>()?)
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in certs("ca.pem")? {
        roots.add(c)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(
                certs(&format!("{client}.pem"))?,
                PrivateKeyDer::from_pem_file(dir.join(format!("{client}.key")))?,
            )?,
    ))
}

impl Producer {
    fn connect(
        port: u16,
        tls: &std::sync::Arc<rustls::ClientConfig>,
        timeout: Duration,
    ) -> Result<Producer> {
        let start = Instant::now();
        loop {
            // The forward accepts before fabricd does; a first request proves it.
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) {
                stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
                let conn = rustls::ClientConnection::new(tls.clone(), name)?;
                let mut p = Producer {
                    conn: BufReader::new(rustls::StreamOwned::new(conn, stream)),
                };
                if p.post("probe.hello").is_ok() {
                    return Ok(p);
                }
            }
            if start.elapsed() > timeout {
                bail!("fabricd's HTTP listener not reachable through 127.0.0.1:{port}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// POSTs `value` to TOPIC (the probe goes to its own topic); returns the offset.
    fn post(&mut self, value: &str) -> Result<u64> {
        let topic = if value.starts_with("probe.") {
            "probe"
        } else {
            TOPIC
        };
        let s = self.conn.get_mut();
        write!(
            s,
            "POST /topics/{topic} HTTP/1.1\r\nHost: edge\r\nContent-Length: {}\r\n\r\n{value}",
            value.len()
        )?;
        s.flush()?;
        let mut status = String::new();
        self.conn.read_line(&mut status)?;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if self.conn.read_line(&mut h)? == 0 {
                bail!("connection closed inside a response");
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse()?;
                }
            }
        }
        let mut body = vec![0u8; len];
        self.conn.read_exact(&mut body)?;
        let body = String::from_utf8_lossy(&body);
        if !status.contains(" 200 ") {
            bail!("POST {value}: {} {body}", status.trim_end());
        }
        body.trim()
            .strip_prefix("{\"offset\":")
            .and_then(|b| b.strip_suffix('}'))
            .and_then(|o| o.parse().ok())
            .with_context(|| format!("POST {value}: unexpected body {body}"))
    }
}

/// Each record of `range` at the core once, in order, with its subject and a message
/// id of this box; nothing else on the topic.
fn check(at_core: &[AtCore], count: usize) {
    let ours: Vec<_> = at_core.iter().filter(|r| r.subject == SUBJECT).collect();
    let values: Vec<&str> = ours.iter().map(|r| r.value.as_str()).collect();
    let want: Vec<String> = (0..count).map(|i| format!("reading-{i:05}")).collect();
    assert_eq!(values, want, "the core holds each record once, in order");
    // Posted by the site machine whose client certificate names it plc-7.
    assert!(
        ours.iter().all(|r| r.producer == "lan:plc-7"),
        "each record names the machine that sent it: {:?}",
        ours.iter().map(|r| &r.producer).collect::<BTreeSet<_>>()
    );
    let mut ids: Vec<&str> = ours.iter().map(|r| r.id.as_str()).collect();
    assert!(
        ids.iter().all(|id| id.starts_with("site0/edge0/")),
        "{ids:?}"
    );
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), count, "message ids are unique");
}

#[test]
fn fabricd_in_the_appliance_mirrors_to_the_core_exactly_once_across_a_link_cut() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let (core, link, op) = qemu_tests::core::start(dir)?;

    // Site provisioning for this box, as the operator's tooling would make it: the core,
    // and the site's enrollment certificate. The site key and certificate come later.
    let bundle_path = dir.join("provision.toml");
    std::fs::write(&bundle_path, qemu_tests::core::provision_bundle(dir, "")?)?;

    let http_port = free_port()?;
    let mut opts = Options::new(&qemu_tests::image_from_env()?);
    opts.hostfwd.push((http_port, 7401));
    opts.guestfwd.push(format!(
        "tcp:10.0.2.100:4222-cmd:socat - TCP:127.0.0.1:{}",
        link.port
    ));
    opts.fw_cfg
        .push(("opt/org.edgeos/provision".into(), bundle_path.clone()));
    let manufacturer = dir.join("tpm-manufacturer");
    opts.tpm_manufacturer = Some(manufacturer.clone());
    // storaged's pool, whose size the core sees in its metrics.
    opts.pool_disk_mib = Some(512);
    let mut m = Machine::with_options("fabric", opts)?;
    m.boot()?;
    // The first boot shows the data partition's recovery key once, and keeps it on the
    // partition for escrow.
    let shown = m.wait_for_console("edgeos: data: recovery key", Duration::from_secs(120))?;
    let recovery = shown
        .trim_end()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_owned();
    // The item is measured into PCR 15 before it is unpacked: zeros extended once with
    // its SHA-256, the value a verifier holding the same item computes.
    let measured = m.wait_for_console("edgeos: tpm: provisioning (", Duration::from_secs(120))?;
    let want = edge_tpm::policy::hex(&edge_tpm::policy::extend(
        &[0; 32],
        &sha2::Sha256::digest(std::fs::read(&bundle_path)?).into(),
    ));
    assert!(
        measured
            .trim_end()
            .ends_with(&format!("measured: PCR 15 {want}")),
        "{measured:?}, want PCR 15 {want}"
    );
    let line = m.wait_for_console("edgeos: provisioning:", Duration::from_secs(120))?;
    assert!(line.contains("provisioning: 7 file(s)"), "{line}");
    let ready = m.wait_ready()?;
    m.wait_status(Duration::from_secs(60), "all services ready", all_ready)?;

    // The operator enrolls the box: its TPM's maker is trusted, and its boot is the
    // image's (the pcr11.json the build wrote).
    // The release is signed by the image's PCR-policy key (the build's copy of it).
    let pcr11 = qemu_tests::image_from_env()?.with_file_name("pcr11.json");
    let release_key = pcr11.with_file_name("pcr-policy.pub.pem");
    let t = Instant::now();
    let enrolled = run(op
        .cmd()
        .args(["enroll", "--site", "site0", "--timeout-secs", "300"])
        .arg("--manufacturer-ca")
        .arg(manufacturer.join("swtpm-localca-rootca-cert.pem"))
        .arg("--manufacturer-ca")
        .arg(manufacturer.join("issuercert.pem"))
        .arg("--release")
        .arg(format!("{}={}", ready.version, pcr11.display()))
        .arg("--release-key")
        .arg(&release_key)
        .arg("--issuer-cert")
        .arg(dir.join("ca.pem"))
        .arg("--issuer-key")
        .arg(dir.join("ca.key"))
        .arg("--escrow-key")
        .arg(dir.join("escrow.pub")))?;
    assert!(
        enrolled.contains("enrolled machine edge0 of site site0")
            && enrolled.contains(&format!(
                "booted release {} slot {}",
                ready.version, ready.slot
            )),
        "{enrolled}"
    );
    eprintln!("enrolled in {:?}: {}", t.elapsed(), enrolled.trim_end());
    // The recovery key the console showed reached the core, encrypted to the escrow key.
    run(op
        .cmd()
        .args([
            "recovery-key",
            "--site",
            "site0",
            "--machine",
            "edge0",
            "--out",
        ])
        .arg(dir.join("recovery.sealed")))?;
    let opened = run(Command::new("openssl")
        .current_dir(dir)
        .args([
            "pkeyutl",
            "-decrypt",
            "-inkey",
            "escrow.key",
            "-in",
            "recovery.sealed",
        ])
        .args([
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            "rsa_oaep_md:sha256",
        ]))?;
    assert_eq!(
        opened, recovery,
        "the escrowed recovery key is the one shown"
    );

    // Records posted in the guest reach the core exactly once, in order.
    let mut prod = Producer::connect(
        http_port,
        &site_machine(dir, "plc")?,
        Duration::from_secs(60),
    )?;
    // The site network's listener is open now that its certificate is provisioned, and
    // it is the one system.toml declares (init looks every 10 s).
    let st = m.wait_status(Duration::from_secs(30), "fabricd's listener seen", |st| {
        st["listening"]["open"] == serde_json::json!(["tcp/0.0.0.0:7401"])
    })?;
    assert_eq!(st["listening"]["undeclared"], serde_json::json!([]), "{st}");
    let first = 500;
    let t = Instant::now();
    for i in 0..first {
        prod.post(&format!("reading-{i:05}"))?;
    }
    eprintln!("{first} records posted in {:?}", t.elapsed());
    op.wait_records(first as u64, Duration::from_secs(60))?;
    check(&op.all(first as u64)?, first);

    // The link is cut: fabricd keeps taking records; once restored they all arrive,
    // the earlier ones still once.
    link.set_cut(true);
    let total = 1000;
    for i in first..total {
        prod.post(&format!("reading-{i:05}"))?;
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(op.records()?, first as u64, "nothing crosses a cut link");
    link.set_cut(false);
    op.wait_records(total as u64, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(op.records()?, total as u64, "no record twice at the core");
    check(&op.all(total as u64)?, total);

    // The image's static sensor pod scores each reading with the inference pod's model
    // and posts it to fabricd: scored readings reach the core.
    let start = Instant::now();
    loop {
        let n = op.records_of(SENSOR_TOPIC)?;
        let readings = if n > 0 {
            op.tail(SENSOR_TOPIC, n)?
        } else {
            vec![]
        };
        // `edgectl tail` prints values escaped (`{\"sensor\":...`): match the names only.
        let scored = |v: &str| v.contains("temp0") && v.contains("score") && v.contains("anomaly");
        if let Some(r) = readings.iter().find(|r| scored(&r.value)) {
            // Sent through the pod's own channel (a socket noded mounted into it), so
            // fabricd names the pod, which the pod cannot forge.
            assert_eq!(r.producer, "pod:default/sensor", "{}", r.value);
            break;
        }
        if start.elapsed() > Duration::from_secs(150) {
            bail!(
                "no scored reading of the sensor pod reached the core ({n} readings, the last \
                 {:?}); the sensor's log ends: {:?}",
                readings.last().map(|r| &r.value),
                m.logs("sensor", false, 1000).map(|l| l
                    .into_iter()
                    .filter(|l| !l.starts_with('{'))
                    .take(10)
                    .collect::<Vec<_>>())
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }

    // The box's metrics at the core: every daemon's, through the fabric, in Prometheus.
    let prom = prometheus::Prometheus::start(&dir.join("prometheus"));
    let bridge_log = dir.join("bridge.log");
    let bridge = prometheus::Bridge(
        op.cmd()
            .args(["prometheus", "--write-url", &prom.write_url()])
            // The core's verdict on the box's boot, every 5 s.
            .args(["--attestation-every-secs", "5", "--release"])
            .arg(format!("{}={}", ready.version, pcr11.display()))
            .arg("--release-key")
            .arg(&release_key)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&bridge_log)?)
            .spawn()?,
    );
    // The box's scrapes since it booted arrive in order, the early ones from before it
    // was ready: what follows is waited for, not asserted on the first answer.
    let os = format!(
        "edge_os_info{{site=\"site0\",version=\"{}\",slot=\"{}\"}}",
        ready.version, ready.slot
    );
    let mut want: Vec<(String, f64)> = ["init", "fabricd", "storaged", "noded"]
        .iter()
        .map(|job| {
            (
                format!("up{{site=\"site0\",machine=\"edge0\",job=\"{job}\"}}"),
                1.0,
            )
        })
        .collect();
    want.extend([
        (os, 1.0),
        (r#"edge_ready{site="site0",machine="edge0"}"#.into(), 1.0),
        (r#"init_ready{site="site0",machine="edge0"}"#.into(), 1.0),
        // Every service is ready, and init says so for each.
        (
            r#"count(init_service_state{site="site0",machine="edge0",state="ready"} == 1)"#.into(),
            4.0,
        ),
        // The pool on the box's second disk, and its size in bytes.
        (
            r#"storaged_pool_present{site="site0",machine="edge0"}"#.into(),
            1.0,
        ),
        (
            r#"storaged_pool_data_blocks{site="site0",machine="edge0"} * on (site, machine, job) storaged_pool_data_block_bytes > bool 100e6"#.into(),
            1.0,
        ),
        // The core trusts its boot: its last boot report replays to the image's release.
        (
            r#"edge_attestation{site="site0",machine="edge0",job="core",state="trusted"}"#.into(),
            1.0,
        ),
        // Its pods are counted (the image's static ones run).
        (
            r#"sum(noded_pods{site="site0",machine="edge0",state="running"}) > bool 0"#.into(),
            1.0,
        ),
    ]);
    let start = Instant::now();
    loop {
        let wrong: Vec<String> = want
            .iter()
            .filter(|(expr, v)| prom.value(expr, None) != Some(*v))
            .map(|(expr, v)| format!("{expr} (want {v}): {}", prom.query(expr, None)))
            .collect();
        if wrong.is_empty() {
            break;
        }
        if start.elapsed() > Duration::from_secs(180) {
            bail!(
                "after 180 s in Prometheus:\n{}\nthe bridge said: {}",
                wrong.join("\n"),
                std::fs::read_to_string(&bridge_log)?
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }

    // The link is cut for a minute, and storaged killed (-9) four times in it: the
    // minute's scrapes reach Prometheus once the link heals, each at its own time, with
    // the restarts init counted, and the crash-loop alert fires.
    let restarts =
        r#"max(init_service_restarts_total{site="site0",machine="edge0",service="storaged"})"#;
    let before = prom.value(restarts, None).unwrap_or(0.0);
    link.set_cut(true);
    let cut_at = unix_s();
    let mut killed_pid = None;
    for kill in 0..4 {
        let st = m.wait_status(
            Duration::from_secs(120),
            &format!("storaged back before kill {}", kill + 1),
            |st| {
                qemu_tests::service(st, "storaged").is_some_and(|s| {
                    s["state"] == "ready"
                        && s["pid"].as_u64().is_some()
                        && s["pid"].as_u64() != killed_pid
                })
            },
        )?;
        killed_pid = qemu_tests::service(&st, "storaged").and_then(|s| s["pid"].as_u64());
        m.request(serde_json::json!({"cmd": "kill", "service": "storaged", "signal": 9}))?;
    }
    eprintln!(
        "storaged killed 4 times in {:.0} s of the cut",
        unix_s() - cut_at
    );
    let left = 60.0 - (unix_s() - cut_at);
    if left > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(left));
    }
    let stamp = r#"edge_scrape_timestamp_seconds{site="site0",machine="edge0",job="fabricd"}"#;
    let in_cut = || {
        prom.value(
            &format!("count_over_time({stamp}[50s])"),
            Some(cut_at + 55.0),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(in_cut(), 0.0, "scrapes crossed the cut link");
    link.set_cut(false);
    let healed = Instant::now();
    let crash_loop = r#"ALERTS{alertname="EdgeServiceCrashLooping",alertstate="firing",site="site0",machine="edge0",service="storaged"}"#;
    loop {
        let (n, r, alert) = (
            in_cut(),
            prom.value(restarts, None),
            prom.value(crash_loop, None),
        );
        if n >= 3.0 && r.is_some_and(|r| r >= before + 4.0) && alert == Some(1.0) {
            eprintln!(
                "after the cut: {n} of its scrapes at their own times, storaged restarts {before} -> {r:?}, the crash-loop alert firing, {:?} after it healed",
                healed.elapsed()
            );
            eprintln!("ALERTS: {}", prom.query(crash_loop, None)["data"]["result"]);
            eprintln!(
                "up: {}",
                prom.query(r#"up{site="site0",machine="edge0"}"#, None)["data"]["result"]
            );
            break;
        }
        if healed.elapsed() > Duration::from_secs(180) {
            bail!(
                "180 s after the cut healed: {n} scrapes from its minute, storaged restarts {before} -> {r:?}, crash-loop alert {alert:?}; the bridge said: {}",
                std::fs::read_to_string(&bridge_log)?
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    drop(bridge);
    drop(prom);

    // The box's logs at the core: a service's (init's file) and a pod's (its CRI log).
    let start = Instant::now();
    for (args, want) in [
        (["--service", "noded"], "INFO"),
        (["--pod", "sensor"], "temp0"),
    ] {
        loop {
            let out = run(op
                .cmd()
                .args(["logs", "--site", "site0", "--machine", "edge0"])
                .args(args))?;
            if out.contains(want) {
                break;
            }
            if start.elapsed() > Duration::from_secs(120) {
                bail!("edgectl logs {args:?} has no {want:?} after 120 s:\n{out}");
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    // Pods from the core: a signed manifest brings a pod file to the downlink's pods/.
    let key = operator_key()?;
    let relay_sha = op.put_kv("site0.pods.relay", "relay.yaml", RELAY)?;
    let relay = serde_json::json!({"kind": "pods", "name": "relay.yaml", "store": "kv",
        "key": "site0.pods.relay", "sha256": relay_sha});
    op.publish(&key, &serde_json::json!({"version": 1, "items": [relay]}))?;
    let pods = m.wait_pods(Duration::from_secs(300), "the delivered pod running", |p| {
        running(p, "downlink/relay.yaml")
    })?;
    let p = pod(&pods, "downlink/relay.yaml").unwrap();
    assert_eq!(p["name"], "relay", "{p}");

    // A newer allowlist from the core that leaves the sensor image out: a pod delivered
    // after it is refused, naming the image and the list, and the running relay (same
    // image) is stopped: the core revoked its digest.
    let list = dir.join("allowlist");
    run(op
        .cmd()
        .args(["allowlist", "--version", "2", "--signing-key"])
        .arg(&key)
        .arg("--out")
        .arg(&list)
        .arg(format!("sha256:{}", "0".repeat(64))))?;
    let list_sha = op.put_kv_file("site0.config.allowlist", &list)?;
    let stranger_sha = op.put_kv("site0.pods.stranger", "stranger.yaml", STRANGER)?;
    let allowlist = serde_json::json!({"kind": "config", "name": "image-allowlist",
        "store": "kv", "key": "site0.config.allowlist", "sha256": list_sha});
    // Items are applied in order: the list is in place before the pod arrives.
    op.publish(
        &key,
        &serde_json::json!({"version": 2, "items": [
            allowlist,
            relay,
            {"kind": "pods", "name": "stranger.yaml", "store": "kv",
             "key": "site0.pods.stranger", "sha256": stranger_sha},
        ]}),
    )?;
    let pods = m.wait_pods(
        Duration::from_secs(180),
        "the stranger refused, the relay stopped",
        |p| {
            pod(p, "downlink/stranger.yaml").is_some_and(|s| !s["error"].is_null())
                && pod(p, "downlink/relay.yaml").is_some_and(|r| {
                    r["error"]
                        .as_str()
                        .is_some_and(|e| e.starts_with("stopped: "))
                })
        },
    )?;
    let stranger = pod(&pods, "downlink/stranger.yaml").unwrap();
    let e = stranger["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("image edge.local/sensor:1")
            && e.contains("is not allowed by the image allowlist")
            && e.contains("/var/lib/edge/downlink/config/image-allowlist version 2"),
        "{stranger}"
    );
    assert_ne!(stranger["state"], "running", "{stranger}");
    let relay_now = pod(&pods, "downlink/relay.yaml").unwrap();
    assert!(!running(&pods, "downlink/relay.yaml"), "{relay_now}");
    assert!(
        relay_now["error"]
            .as_str()
            .is_some_and(|e| e.contains("/var/lib/edge/downlink/config/image-allowlist version 2")),
        "{relay_now}"
    );

    // The core takes the pods back: a manifest that no longer offers them removes their
    // files, and noded stops the running relay.
    op.publish(
        &key,
        &serde_json::json!({"version": 3, "items": [allowlist]}),
    )?;
    let pods = m.wait_pods(Duration::from_secs(120), "the withdrawn pods gone", |p| {
        pod(p, "downlink/relay.yaml").is_none() && pod(p, "downlink/stranger.yaml").is_none()
    })?;
    assert!(
        pod(&pods, "sensor.yaml").is_some(),
        "the image's own pods stay: {pods:?}"
    );

    // The box quotes its boot into its status reports; the core replays the last one to
    // the release it booted. init's health file reaches the core too: the box is ready.
    let release = format!("{}={}", ready.version, pcr11.display());
    let want = format!(" ready {:>14}", format!("{}/{}", ready.version, ready.slot));
    let start = Instant::now();
    loop {
        let out = run(op
            .cmd()
            .args(["status", "--release", &release, "--release-key"])
            .arg(&release_key))?;
        let row = out
            .lines()
            .find(|l| l.starts_with("site0.edge0 "))
            .unwrap_or_default();
        if row.ends_with(&want) {
            eprintln!("edgectl status: {row}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the box's boot and health (ready) are not in edgectl status: {out}"
        );
        std::thread::sleep(Duration::from_secs(3));
    }

    // Provisioned as another site (site1), the box holds only site0's certificate:
    // nats-server refuses it site1's subjects, the box says so on its console, and
    // nothing it takes reaches the core as site1.
    std::fs::write(
        &bundle_path,
        qemu_tests::core::provision_bundle(dir, "site = \"site1\"\n")?,
    )?;
    m.powerdown()?;
    m.wait_exit(Duration::from_secs(90))?;
    m.reboot_same_disk()?;
    m.wait_ready()?;
    let line = m.wait_for_console("the core reported an error", Duration::from_secs(120))?;
    eprintln!("as site1: {}", line.trim_end());
    let lower = line.to_lowercase();
    assert!(
        lower.contains("fabricd:")
            && lower.contains("permissions violation")
            && lower.contains("site1"),
        "{line}"
    );
    std::thread::sleep(Duration::from_secs(5));
    let out = run(op.cmd().args(["status", "--topic", ">"]))?;
    assert!(
        !out.lines().any(|l| l.starts_with("site1.")),
        "records as site1 reached the core: {out}"
    );

    // The same disk in another box, whose TPM (from the same maker) is not this one: it
    // cannot open the data partition, where the site key's blobs and the certificate
    // are, so nothing of the site's reaches the core from it.
    m.powerdown()?;
    m.wait_exit(Duration::from_secs(90))?;
    let at_core = op.records()?;
    let mut copy_opts = Options::new(m.disk());
    copy_opts.tpm_manufacturer = Some(manufacturer.clone());
    copy_opts.guestfwd = vec![format!(
        "tcp:10.0.2.100:4222-cmd:socat - TCP:127.0.0.1:{}",
        link.port
    )];
    let mut copy = Machine::with_options("fabric-copy", copy_opts)?;
    copy.boot()?;
    let line = copy.wait_for_console("edgeos: data: locked:", qemu_tests::machine::BOOT_TIMEOUT)?;
    eprintln!("the copy: {}", line.trim_end());
    copy.wait_status(
        Duration::from_secs(120),
        "data locked in the status",
        |st| st["data"]["locked"].is_string(),
    )?;
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(op.records()?, at_core, "nothing from the copy at the core");
    copy.finish();
    m.finish();
    drop(core);
    Ok(())
}
