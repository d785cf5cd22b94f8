//! Ingest throughput of the real daemon (ignored by default; a measurement, not a check):
//! `cargo test --release -p fabricd --test bench -- --ignored --nocapture`.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;
use fabricd::produce;

/// 4 producers over the unix socket, 256 requests in flight each; returns records/s.
fn ingest(value_size: usize, total: u64) -> f64 {
    let tmp = tempfile::tempdir().unwrap();
    let mut f = Fabricd::configure(
        tmp.path(),
        "quota_bytes = 4294967296\nsegment_bytes = 67108864\n",
    );
    f.start();
    let per = total / 4;
    let start = Instant::now();
    let handles: Vec<_> = (0..4)
        .map(|p| {
            let socket = f.socket.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&socket).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let frame = produce::encode_request(&record(
                    &format!("bench.p{p}"),
                    &vec![b'x'; value_size],
                ));
                let batch: Vec<u8> = frame
                    .iter()
                    .copied()
                    .cycle()
                    .take(frame.len() * 256)
                    .collect();
                let mut reader = std::io::BufReader::with_capacity(1 << 16, s.try_clone().unwrap());
                let mut sent = 0;
                while sent < per {
                    s.write_all(&batch).unwrap();
                    for _ in 0..256 {
                        let (status, _) = read_reply(&mut reader).unwrap();
                        assert_eq!(status, produce::OK);
                    }
                    sent += 256;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    total as f64 / secs
}

/// Records/s from 4 producers through fabricd to the core (every record counted at the
/// core), and the same number of records published straight to JetStream by one
/// async-nats client with the same window.
fn e2e_and_direct(value_size: usize, total: u64) -> (f64, f64) {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&tmp.path().join("pki"));
    let nats = Nats::start(&tmp.path().join("nats"), &pki);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let js = rt.block_on(async {
        let js = async_nats::jetstream::new(core_client(&pki, &nats.url()).await);
        create_stream(&js).await;
        js
    });
    // Direct first, on its own subjects, then purge so that counting e2e starts at 0.
    let direct = rt.block_on(async {
        let start = Instant::now();
        let mut acks = std::collections::VecDeque::new();
        let value = bytes::Bytes::from(vec![b'x'; value_size]);
        for i in 0..total {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("direct/{i}").as_str());
            acks.push_back(
                js.publish_with_headers(format!("edge.direct.p{}", i % 4), h, value.clone())
                    .await
                    .unwrap(),
            );
            if acks.len() >= 512 {
                acks.pop_front().unwrap().await.unwrap();
            }
        }
        for a in acks {
            a.await.unwrap();
        }
        total as f64 / start.elapsed().as_secs_f64()
    });
    rt.block_on(async { js.get_stream("EDGE").await.unwrap().purge().await.unwrap() });
    let dir = tmp.path().join("edge");
    std::fs::create_dir_all(&dir).unwrap();
    let mut f = Fabricd::configure(
        &dir,
        &format!(
            "quota_bytes = 4294967296\n{}",
            pki.core_toml(&nats.url(), "client")
        ),
    );
    f.start();
    let start = Instant::now();
    let per = total / 4;
    let handles: Vec<_> = (0..4)
        .map(|p| {
            let socket = f.socket.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&socket).unwrap();
                let frame = produce::encode_request(&record(
                    &format!("bench.p{p}"),
                    &vec![b'x'; value_size],
                ));
                let batch: Vec<u8> = frame
                    .iter()
                    .copied()
                    .cycle()
                    .take(frame.len() * 256)
                    .collect();
                let mut reader = std::io::BufReader::with_capacity(1 << 16, s.try_clone().unwrap());
                let mut sent = 0;
                while sent < per {
                    s.write_all(&batch).unwrap();
                    for _ in 0..256 {
                        assert_eq!(read_reply(&mut reader).unwrap().0, produce::OK);
                    }
                    sent += 256;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    rt.block_on(async {
        while stream_count(&js).await < total {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let e2e = total as f64 / start.elapsed().as_secs_f64();
    (e2e, direct)
}

#[test]
#[ignore]
fn end_to_end_against_direct() {
    let (e2e, direct) = e2e_and_direct(100, 262_144);
    eprintln!(
        "100 B values: e2e {e2e:.0} records/s, direct {direct:.0} records/s, e2e/direct {:.2}",
        e2e / direct
    );
}

#[test]
#[ignore]
fn ingest_rates() {
    let r1k = ingest(1024, 262_144);
    eprintln!(
        "ingest 1 KiB values: {:.0} records/s = {:.1} MiB/s (values)",
        r1k,
        r1k * 1024.0 / (1 << 20) as f64
    );
    let r100 = ingest(100, 1_048_576);
    eprintln!("ingest 100 B values: {:.0} records/s", r100);
}
