//! The produce API of the real daemon: framed protocol on the unix socket and TCP, and
//! HTTP POST; records are durable when acked; bad input drops the connection, not the
//! daemon.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;

use common::*;
use fabricd::produce;
use fabricd::record::Stored;
use fabricd::store::{Cursor, Limits, Log};

/// Every record the log of a stopped fabricd holds, oldest first.
fn stored(f: &Fabricd, classes: &[fabricd::config::ClassConfig]) -> Vec<Stored> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let log = Log::open(
        &f.dir.join("log"),
        classes,
        Limits {
            quota_bytes: 1 << 30,
            segment_bytes: 64 << 20,
        },
    )
    .unwrap();
    let mut out = Vec::new();
    for class in 0..classes.len() {
        let mut cur = Cursor::new(class, 0);
        loop {
            let got = log.read(&mut cur, 1 << 20).unwrap();
            if got.is_empty() {
                break;
            }
            out.extend(got);
        }
    }
    out.sort_by_key(|s| s.offset);
    out
}

/// The Edge-Producer fabricd stamped on a stored record; exactly one.
fn producer_of(s: &Stored) -> String {
    let who: Vec<&[u8]> = s
        .record
        .headers
        .iter()
        .filter(|(n, _)| n == produce::PRODUCER_HEADER)
        .map(|(_, v)| v.as_slice())
        .collect();
    assert_eq!(who.len(), 1, "{:?}", s.record.headers);
    String::from_utf8_lossy(who[0]).into_owned()
}

fn read_back(f: &Fabricd, classes: &[fabricd::config::ClassConfig]) -> Vec<(u64, String, Vec<u8>)> {
    stored(f, classes)
        .into_iter()
        .map(|s| (s.offset, s.record.topic, s.record.value))
        .collect()
}

fn default_class() -> Vec<fabricd::config::ClassConfig> {
    vec![fabricd::config::ClassConfig {
        name: "default".into(),
        topics: vec![">".into()],
        priority: 0,
        max_bytes: None,
        max_age_secs: None,
        when_full: Default::default(),
    }]
}

#[test]
fn acked_records_from_socket_tcp_and_http_survive_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let mut f = Fabricd::configure(tmp.path(), "");
    f.start();
    let mut unix = UnixStream::connect(&f.socket).unwrap();
    let mut acked = Vec::new();
    // Pipelined: many requests in flight, replies in order.
    let mut batch = Vec::new();
    for i in 0..500u32 {
        batch.extend(produce::encode_request(&record("unix.t", &i.to_be_bytes())));
    }
    unix.write_all(&batch).unwrap();
    for i in 0..500u32 {
        let (status, payload) = read_reply(&mut unix).unwrap();
        assert_eq!(status, produce::OK);
        acked.push((
            u64::from_be_bytes(payload[..8].try_into().unwrap()),
            "unix.t".to_string(),
            i.to_be_bytes().to_vec(),
        ));
    }
    let mut t = tcp(f.tcp);
    for i in 0..100u32 {
        let mut rec = record("tcp.t", &i.to_be_bytes());
        rec.key = Some(b"k".to_vec());
        rec.headers = vec![("h".into(), b"v".to_vec())];
        let off = produce(&mut t, &rec).unwrap();
        acked.push((off, "tcp.t".into(), i.to_be_bytes().to_vec()));
    }
    let (status, body) = http(f.http, b"POST /topics/http.t HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    acked.push((
        v["offset"].as_u64().unwrap(),
        "http.t".into(),
        b"hello".to_vec(),
    ));
    assert_eq!(
        metric(&f, "fabricd_records_in_total{class=\"default\"}"),
        Some(601)
    );
    assert_eq!(
        metric(&f, "fabricd_lag_records{class=\"default\"}"),
        Some(601),
        "no core: everything is behind"
    );
    assert_eq!(metric(&f, "fabricd_uplink_configured"), Some(0));
    let offsets: Vec<u64> = acked.iter().map(|a| a.0).collect();
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "offsets grow in ack order"
    );
    f.kill9();
    acked.sort();
    assert_eq!(read_back(&f, &default_class()), acked);
}

#[test]
fn garbage_frames_drop_the_connection_not_the_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let mut f = Fabricd::configure(tmp.path(), "max_record_bytes = 1000");
    f.start();
    // A length far over the limit.
    let mut s = tcp(f.tcp);
    s.write_all(&[0xff, 0xff, 0xff, 0xf0, 1, 2, 3]).unwrap();
    let (status, msg) = read_reply(&mut s).unwrap();
    assert_eq!(
        status,
        produce::TOO_LARGE,
        "{}",
        String::from_utf8_lossy(&msg)
    );
    assert!(
        read_reply(&mut s).is_none(),
        "connection closed after garbage"
    );
    // A well-sized frame of garbage.
    let mut s = UnixStream::connect(&f.socket).unwrap();
    s.write_all(&[0, 0, 0, 6, 9, 9, 9, 9, 9, 9]).unwrap();
    let (status, msg) = read_reply(&mut s).unwrap();
    assert_eq!(status, produce::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&msg).contains("unknown op"));
    assert!(read_reply(&mut s).is_none());
    // A bad topic.
    let mut s = tcp(f.tcp);
    let err = produce(&mut s, &record("a b", b"x")).unwrap_err();
    assert_eq!(err.0, produce::BAD_REQUEST, "{}", err.1);
    // An oversized value inside a frame that fits.
    let mut s = tcp(f.tcp);
    let err = produce(&mut s, &record("big", &[7u8; 1001])).unwrap_err();
    assert_eq!(err.0, produce::TOO_LARGE, "{}", err.1);
    // The daemon still serves.
    assert!(f.is_running());
    let mut s = tcp(f.tcp);
    produce(&mut s, &record("ok", b"fine")).unwrap();
    assert!(f.logged("refused a produce request"), "{}", f.log_text());
}

#[test]
fn records_carry_their_producer_and_one_noisy_producer_is_slowed_alone() {
    let tmp = tempfile::tempdir().unwrap();
    // 8 KiB a second each, and records of at most 4 KiB.
    let mut f = Fabricd::configure(
        tmp.path(),
        "producer_bytes_per_sec = 8192\nmax_record_bytes = 4096\n",
    );
    f.start();
    // A producer may not say who it is: fabricd says it.
    let mut forger = tcp(f.tcp);
    let mut forged = record("telemetry.x", b"1");
    forged.headers = vec![("edge-producer".into(), b"pod/default/alarm-panel".to_vec())];
    let err = produce(&mut forger, &forged).unwrap_err();
    assert_eq!(err.0, produce::BAD_REQUEST, "{}", err.1);
    assert!(
        err.1
            .contains("Edge-Producer is fabricd's to set (this producer is 127.0.0.1)"),
        "{}",
        err.1
    );
    // A bad request ends the connection; the producer connects again. The noisy one
    // (TCP from 127.0.0.1) runs through its second's worth and is told to slow down;
    // that connection stays.
    let mut noisy = tcp(f.tcp);
    let value = vec![7u8; 1000];
    let mut taken = 0;
    let refusal = loop {
        match produce(&mut noisy, &record("telemetry.x", &value)) {
            Ok(_) => taken += 1,
            Err(e) => break e,
        }
        assert!(taken < 100, "never slowed down");
    };
    assert_eq!(refusal.0, produce::SLOW_DOWN, "{}", refusal.1);
    assert!(
        refusal
            .1
            .contains("producer 127.0.0.1 is over producer_bytes_per_sec (8192)"),
        "{}",
        refusal.1
    );
    assert!(
        (5..=9).contains(&taken),
        "took {taken} KB-records of an 8 KiB second"
    );
    // Another producer (a program on the unix socket) is not held back by it.
    let mut quiet = UnixStream::connect(&f.socket).unwrap();
    produce(&mut quiet, &record("alarms.door", b"open")).unwrap();
    // HTTP from the noisy address shares its allowance: 429.
    let (status, body) = http(
        f.http,
        format!(
            "POST /topics/telemetry.y HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n{}",
            "x".repeat(1000)
        )
        .as_bytes(),
    );
    assert_eq!(status, 429, "{body}");
    // A second later it may send again.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    produce(&mut noisy, &record("telemetry.x", &value)).unwrap();
    drop((noisy, quiet));
    f.kill9();

    // Every stored record names its producer, as the core will see it.
    let got = stored(&f, &default_class());
    assert_eq!(got.len(), taken + 2, "what was taken, and nothing refused");
    for s in &got {
        let who = producer_of(s);
        if s.record.topic == "alarms.door" {
            assert!(who.starts_with("local:") && who.contains("/uid="), "{who}");
        } else {
            assert_eq!(who, "127.0.0.1");
        }
    }
}

#[test]
fn each_pod_produces_on_its_own_channel_under_its_own_name() {
    let tmp = tempfile::tempdir().unwrap();
    let pods = tmp.path().join("pods");
    let mut f = Fabricd::configure(
        tmp.path(),
        &format!("pod_channels = \"{}\"\n", pods.display()),
    );
    f.start();
    // What noded does for each pod it starts: a directory named for the pod.
    let sensor = pods.join("default_sensor_3f9a");
    let camera = pods.join("plant7_camera-2_77c1");
    let bad = pods.join("not-a-pod");
    for d in [&sensor, &camera, &bad] {
        std::fs::create_dir_all(d).unwrap();
    }
    let sock = |d: &std::path::Path| d.join(fabricd::pod_channels::SOCKET);
    let connect = |d: &std::path::Path| {
        wait_for(
            "the pod's channel",
            std::time::Duration::from_secs(10),
            || UnixStream::connect(sock(d)).ok(),
        )
    };
    // HTTP on the sensor's channel, the framed protocol on the camera's.
    let (status, body) = http_over(
        connect(&sensor),
        b"POST /topics/pods.sensor.t HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\n21.5",
    );
    assert_eq!(status, 200, "{body}");
    let mut cam = connect(&camera);
    produce(&mut cam, &record("pods.camera.frame", b"jpeg")).unwrap();
    // A pod may not claim another name on its channel either.
    let mut forged = record("pods.camera.frame", b"x");
    forged.headers = vec![("Edge-Producer".into(), b"pod:default/sensor".to_vec())];
    let err = produce(&mut cam, &forged).unwrap_err();
    assert!(
        err.1.contains("(this producer is pod:plant7/camera-2)"),
        "{}",
        err.1
    );
    // A directory that is not named for a pod gets no channel, and the log says why.
    wait_for(
        "the refusal of not-a-pod",
        std::time::Duration::from_secs(10),
        || {
            f.log
                .lock()
                .unwrap()
                .iter()
                .any(|l| {
                    l.contains("not-a-pod not opened: the name is not <namespace>_<name>_<uid>")
                })
                .then_some(())
        },
    );
    assert!(!sock(&bad).exists());
    // The pod is gone (noded removed its directory): its channel closes; a pod of the
    // same name started again gets a new one.
    std::fs::remove_dir_all(&sensor).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    std::fs::create_dir_all(&sensor).unwrap();
    let (status, body) = http_over(
        connect(&sensor),
        b"POST /topics/pods.sensor.t HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\n21.6",
    );
    assert_eq!(status, 200, "{body}");
    drop(cam);
    f.kill9();
    let got: Vec<(String, String)> = stored(&f, &default_class())
        .iter()
        .map(|s| {
            (
                producer_of(s),
                String::from_utf8_lossy(&s.record.value).into_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("pod:default/sensor".to_owned(), "21.5".to_owned()),
            ("pod:plant7/camera-2".to_owned(), "jpeg".to_owned()),
            ("pod:default/sensor".to_owned(), "21.6".to_owned()),
        ]
    );
}

/// A TLS client of the test CA's server certificate, proving `client`'s certificate
/// (`<client>.pem`, `.key` in the PKI) or none.
fn tls_to(
    addr: std::net::SocketAddr,
    pki: &Pki,
    client: Option<&str>,
) -> async_nats::rustls::StreamOwned<async_nats::rustls::ClientConnection, std::net::TcpStream> {
    use async_nats::rustls::pki_types::pem::PemObject;
    use async_nats::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use async_nats::rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
    let certs = |name: &str| -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(pki.path(name))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let mut roots = RootCertStore::empty();
    roots.add(certs("ca.pem").remove(0)).unwrap();
    let provider = std::sync::Arc::new(async_nats::rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some(c) => builder
            .with_client_auth_cert(
                certs(&format!("{c}.pem")),
                PrivateKeyDer::from_pem_file(pki.path(&format!("{c}.key"))).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let conn = ClientConnection::new(
        std::sync::Arc::new(config),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    StreamOwned::new(conn, tcp(addr))
}

#[test]
fn site_network_producers_prove_a_client_certificate_and_are_named_by_it() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&tmp.path().join("pki"));
    pki.issue_client("plc-7", "/CN=plc-7");
    let lan_tls = |dir: &std::path::Path| {
        format!(
            "[lan_tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
            dir.join("server.pem").display(),
            dir.join("server.key").display(),
            dir.join("ca.pem").display()
        )
    };
    let mut f = Fabricd::configure(tmp.path(), &lan_tls(&pki.dir));
    f.start();
    // The site's PLC, framed and over HTTP, each with its certificate.
    let mut plc = tls_to(f.tcp, &pki, Some("plc-7"));
    produce(&mut plc, &record("plant.press1", b"92 bar")).unwrap();
    let (status, body) = http_over(
        tls_to(f.http, &pki, Some("plc-7")),
        b"POST /topics/plant.press2 HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nConnection: close\r\n\r\n95 bar",
    );
    assert_eq!(status, 200, "{body}");
    // Without a certificate, with one of another CA, or without TLS: nothing taken.
    let frame = produce::encode_request(&record("plant.press1", b"forged"));
    let answer = |mut s: Box<dyn ReadWrite>| {
        let _ = s.write_all(&frame);
        let mut got = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut got);
        got
    };
    for (who, s) in [
        (
            "no certificate",
            Box::new(tls_to(f.tcp, &pki, None)) as Box<dyn ReadWrite>,
        ),
        (
            "another CA's",
            Box::new(tls_to(f.tcp, &pki, Some("foreign-client"))),
        ),
        ("plain TCP", Box::new(tcp(f.tcp))),
    ] {
        let got = answer(s);
        assert!(
            got.get(4) != Some(&produce::OK),
            "{who}: the producer was answered {got:?}"
        );
    }
    wait_for(
        "the refusals logged",
        std::time::Duration::from_secs(10),
        || {
            let log = f.log.lock().unwrap();
            (log.iter()
                .filter(|l| l.contains("refused a producer on the site network"))
                .count()
                >= 3)
                .then_some(())
        },
    );
    drop(plc);
    f.kill9();
    let got: Vec<(String, String)> = stored(&f, &default_class())
        .iter()
        .map(|s| (producer_of(s), s.record.topic.clone()))
        .collect();
    assert_eq!(
        got,
        [
            ("lan:plc-7".to_owned(), "plant.press1".to_owned()),
            ("lan:plc-7".to_owned(), "plant.press2".to_owned()),
        ]
    );

    // A box whose site has not provisioned the certificate yet: the site-network
    // listeners stay off, said once, and the box's own producers go on.
    let tmp2 = tempfile::tempdir().unwrap();
    let mut g = Fabricd::configure(tmp2.path(), &lan_tls(&tmp2.path().join("absent")));
    g.start();
    assert!(std::net::TcpStream::connect(g.tcp).is_err());
    assert!(std::net::TcpStream::connect(g.http).is_err());
    // Said at start-up, but read from the daemon's output by another thread: waited for.
    wait_for(
        "the line saying the site-network listeners stay off",
        std::time::Duration::from_secs(10),
        || {
            g.log
                .lock()
                .unwrap()
                .iter()
                .any(|l| {
                    l.contains("lan_tls.client_ca")
                        && l.contains("tcp_listen and http_listen stay off until it is provisioned")
                })
                .then_some(())
        },
    );
    produce(
        &mut UnixStream::connect(&g.socket).unwrap(),
        &record("alarms.door", b"open"),
    )
    .unwrap();
}

trait ReadWrite: std::io::Read + Write {}
impl<T: std::io::Read + Write> ReadWrite for T {}

/// Frames that arrive together are queued to the log as one batch: each still gets its
/// own answer, in order, and a frame that breaks the connection stops the batch there.
#[test]
fn pipelined_frames_are_answered_in_order_and_nothing_after_a_broken_one_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let mut f = Fabricd::configure(
        tmp.path(),
        "[[class]]\nname = \"default\"\ntopics = [\"ok.>\"]\n",
    );
    f.start();
    let frames = [
        record("ok.a", b"1"),
        record("ok.a", b"2"),
        record("other.x", b"no class"),
        record("ok.b", b"3"),
        record("bad topic", b"breaks the connection"),
        record("ok.a", b"after the break"),
    ];
    let mut all = Vec::new();
    for r in &frames {
        all.extend(produce::encode_request(r));
    }
    let mut s = UnixStream::connect(&f.socket).unwrap();
    s.write_all(&all).unwrap();
    let statuses: Vec<u8> = std::iter::from_fn(|| read_reply(&mut s).map(|r| r.0)).collect();
    assert_eq!(
        statuses,
        [
            produce::OK,
            produce::OK,
            produce::NO_CLASS,
            produce::OK,
            produce::BAD_REQUEST
        ],
        "one answer per frame up to the broken one, then the connection is closed"
    );
    f.kill9();
    let kept: Vec<Vec<u8>> = read_back(&f, &default_class())
        .into_iter()
        .map(|(_, _, v)| v)
        .collect();
    assert_eq!(kept, [b"1".to_vec(), b"2".to_vec(), b"3".to_vec()]);
}

#[test]
fn unknown_topic_class_is_refused_and_the_connection_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let mut f = Fabricd::configure(
        tmp.path(),
        "[[class]]\nname = \"alarms\"\ntopics = [\"alarms.>\"]\n",
    );
    f.start();
    let mut s = tcp(f.tcp);
    let err = produce(&mut s, &record("telemetry.x", b"1")).unwrap_err();
    assert_eq!(err.0, produce::NO_CLASS);
    assert!(err.1.contains("telemetry.x"), "{}", err.1);
    produce(&mut s, &record("alarms.door", b"open")).unwrap();
}

#[test]
fn full_quota_answers_full_to_producers() {
    let tmp = tempfile::tempdir().unwrap();
    let mut f = Fabricd::configure(
        tmp.path(),
        "quota_bytes = 16384\nsegment_bytes = 4096\nmax_record_bytes = 1024\n",
    );
    f.start();
    let mut s = tcp(f.tcp);
    let mut n = 0;
    let err = loop {
        match produce(&mut s, &record("t", &[1u8; 500])) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
        assert!(n < 100, "quota never reached");
    };
    assert_eq!(err.0, produce::FULL, "{}", err.1);
    let mut req =
        b"POST /topics/t HTTP/1.1\r\nContent-Length: 500\r\nConnection: close\r\n\r\n".to_vec();
    req.extend_from_slice(&[b'a'; 500]);
    let (status, body) = http(f.http, &req);
    assert_eq!(status, 507, "{body}");
    assert_eq!(
        metric(&f, "fabricd_refused_full_total{class=\"default\"}"),
        Some(2)
    );
}

#[test]
fn http_refuses_what_it_cannot_take() {
    let tmp = tempfile::tempdir().unwrap();
    let mut f = Fabricd::configure(tmp.path(), "max_record_bytes = 100");
    f.start();
    let cases: [(&[u8], u16); 6] = [
        (b"GET /topics/t HTTP/1.1\r\n\r\n", 405),
        (b"POST /other HTTP/1.1\r\nContent-Length: 1\r\n\r\nx", 404),
        (b"POST /topics/t HTTP/1.1\r\n\r\n", 411),
        (
            b"POST /topics/t HTTP/1.1\r\nContent-Length: 101\r\n\r\n",
            413,
        ),
        (
            b"POST /topics/a..b HTTP/1.1\r\nContent-Length: 1\r\n\r\nx",
            400,
        ),
        (b"\x00\x01garbage\r\n\r\n", 400),
    ];
    for (req, want) in cases {
        let (status, body) = http(f.http, req);
        assert_eq!(status, want, "{} -> {body}", String::from_utf8_lossy(req));
    }
    // Keep-alive: two requests on one connection.
    let mut s = tcp(f.http);
    s.write_all(b"POST /topics/t HTTP/1.1\r\nContent-Length: 1\r\nFabric-Key: k1\r\nFabric-Header-unit: C\r\n\r\nxPOST /topics/t HTTP/1.1\r\nContent-Length: 1\r\nConnection: close\r\n\r\ny").unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text).unwrap();
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    assert!(f.is_running());
}

#[test]
fn starts_ready_without_a_core_and_stops_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let mut f = Fabricd::configure(tmp.path(), "");
    f.start();
    assert!(f.is_running());
    let status = f.terminate();
    assert!(status.success(), "{status}");
    assert!(f.log_contains("stopped"), "{}", f.log_text());
}
