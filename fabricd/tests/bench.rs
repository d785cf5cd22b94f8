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
