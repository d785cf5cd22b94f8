//! Ingest throughput of the real daemon (ignored by default; a measurement, not a check):
//! `cargo test --release -p fabricd --test bench -- --ignored --nocapture`.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;
use fabricd::produce;

/// 4 producers over the unix socket, each sending `per` records of `value_size` bytes
/// with 256 requests in flight, every one acked OK; returns when all are acked.
fn produce_pipelined(f: &Fabricd, value_size: usize, per: u64) {
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
}

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
    produce_pipelined(&f, value_size, per);
    let secs = start.elapsed().as_secs_f64();
    total as f64 / secs
}

fn seq_record(p: u32, seq: u64, size: usize) -> Vec<u8> {
    produce::encode_request(&record(&format!("bench.p{p}"), &seq_value(p, seq, size)))
}

/// Producer `p` sends records `from..to` over the unix socket, 256 in flight, sleeping
/// `pace` after each 256 (or until `stop`); returns the next sequence number.
fn produce_seq(
    socket: &std::path::Path,
    p: u32,
    from: u64,
    to: u64,
    size: usize,
    pace: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> u64 {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut reader = std::io::BufReader::with_capacity(1 << 16, s.try_clone().unwrap());
    let mut seq = from;
    while seq < to && !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let n = 256.min(to - seq);
        let batch: Vec<u8> = (seq..seq + n)
            .flat_map(|i| seq_record(p, i, size))
            .collect();
        s.write_all(&batch).unwrap();
        for _ in 0..n {
            assert_eq!(read_reply(&mut reader).unwrap().0, produce::OK);
        }
        seq += n;
        std::thread::sleep(pace);
    }
    seq
}

fn median(figures: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = figures.collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `cargo xtask bench fabric` runs this in a release build. Prints figures, then one
/// JSON line last.
#[test]
#[ignore]
fn fabric_bench() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let partition = Duration::from_secs(env_or("FABRIC_BENCH_PARTITION_SECS", 60));
    let total = env_or("FABRIC_BENCH_RECORDS", 262_144);

    // Ingest is short (1-3 s a pass) and this machine's disk and memory speed swing
    // from run to run, so each size is measured in `passes` passes, each against a
    // fresh daemon and log, and the median is the figure.
    let passes = env_or("FABRIC_BENCH_INGEST_PASSES", 3).max(1) as usize;
    let r1k = median((0..passes).map(|i| {
        let r = ingest(1024, total);
        let mib = r * 1024.0 / (1 << 20) as f64;
        eprintln!(
            "durable ingest, 1 KiB values, 4 producers, pass {}: {r:.0} records/s = {mib:.1} MiB/s",
            i + 1
        );
        r
    }));
    let mib_1k = r1k * 1024.0 / (1 << 20) as f64;
    eprintln!(
        "durable ingest, 1 KiB values, median of {passes}: {r1k:.0} records/s = {mib_1k:.1} MiB/s"
    );
    let r100 = median((0..passes).map(|i| {
        let r = ingest(100, 4 * total);
        eprintln!(
            "durable ingest, 100 B values, 4 producers, pass {}: {r:.0} records/s",
            i + 1
        );
        r
    }));
    eprintln!("durable ingest, 100 B values, median of {passes}: {r100:.0} records/s");

    let Core {
        tmp,
        pki,
        mut nats,
        rt,
        js,
    } = Core::start();

    // Direct: the same client library and window straight to JetStream, same payloads.
    let direct = rt.block_on(async {
        let start = Instant::now();
        let mut acks = std::collections::VecDeque::new();
        for i in 0..total {
            let value = bytes::Bytes::from(seq_value((i % 4) as u32, i / 4, 100));
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("direct/{i}").as_str());
            acks.push_back(
                js.publish_with_headers(format!("edge.direct.p{}", i % 4), h, value)
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
    eprintln!("direct to JetStream (async-nats, window 512, 100 B): {direct:.0} records/s");

    // End to end: 4 producers -> fabricd -> core, counted at the core.
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
    let never = Arc::new(AtomicBool::new(false));
    let per = total / 4;
    let start = Instant::now();
    let handles: Vec<_> = (0..4)
        .map(|p| {
            let (socket, never) = (f.socket.clone(), never.clone());
            std::thread::spawn(move || produce_seq(&socket, p, 0, per, 100, Duration::ZERO, &never))
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    rt.block_on(async {
        while stream_count(&js).await < 4 * per {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let e2e = (4 * per) as f64 / start.elapsed().as_secs_f64();
    eprintln!(
        "end to end (producers -> fabricd -> core, 100 B): {e2e:.0} records/s = {:.2} x direct",
        e2e / direct
    );

    // Partition: the core stopped while 2 producers keep writing, then the drain.
    nats.stop();
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..2)
        .map(|p| {
            let (socket, stop) = (f.socket.clone(), stop.clone());
            std::thread::spawn(move || {
                produce_seq(
                    &socket,
                    p,
                    per,
                    u64::MAX,
                    100,
                    Duration::from_millis(25),
                    &stop,
                )
            })
        })
        .collect();
    std::thread::sleep(partition);
    stop.store(true, Ordering::Relaxed);
    let ends: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let produced: u64 = 4 * per + ends.iter().map(|e| e - per).sum::<u64>();
    let backlog = produced - 4 * per;
    eprintln!(
        "core stopped for {partition:?}: {backlog} records taken meanwhile, lag {:?}",
        metric(&f, "fabricd_lag_records{class=\"default\"}")
    );
    nats.restart();
    let start = Instant::now();
    let js =
        rt.block_on(async { async_nats::jetstream::new(core_client(&pki, &nats.url()).await) });
    rt.block_on(async {
        while stream_count(&js).await < produced {
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "catch-up stalled"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let catchup = backlog as f64 / start.elapsed().as_secs_f64();
    eprintln!(
        "catch-up after the core came back: {catchup:.0} records/s ({backlog} in {:.1} s)",
        start.elapsed().as_secs_f64()
    );

    // Count at the core: every (producer, sequence) and message id exactly once.
    let at_core = rt.block_on(read_core(&js, produced, Duration::from_secs(60)));
    let mut seen = std::collections::HashSet::new();
    let mut ids = std::collections::HashSet::new();
    let mut duplicated = 0u64;
    for m in &at_core {
        let p = u32::from_be_bytes(m.payload[..4].try_into().unwrap());
        let seq = u64::from_be_bytes(m.payload[4..12].try_into().unwrap());
        if !seen.insert((p, seq)) || !ids.insert(m.msg_id.clone()) {
            duplicated += 1;
        }
    }
    let expected = |p: u32, seq: u64| seq < per || (p < 2 && seq < ends[p as usize]);
    let lost = (0..4u32)
        .flat_map(|p| (0..ends.get(p as usize).copied().unwrap_or(per)).map(move |s| (p, s)))
        .filter(|&(p, s)| expected(p, s) && !seen.contains(&(p, s)))
        .count();
    let rss_kib =
        std::fs::read_to_string(format!("/proc/{}/status", f.child.as_ref().unwrap().id()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap();
    eprintln!(
        "at the core: {} records, lost {lost}, duplicated {duplicated}; fabricd RSS {rss_kib} KiB",
        at_core.len()
    );
    println!(
        "{{\"bench\":\"fabric\",\"ingest_mib_s_1k\":{mib_1k:.1},\"ingest_msgs_s_100b\":{r100:.0},\"e2e_msgs_s\":{e2e:.0},\"direct_msgs_s\":{direct:.0},\"e2e_vs_direct\":{:.3},\"catchup_msgs_s\":{catchup:.0},\"lost\":{lost},\"duplicated\":{duplicated},\"rss_kib\":{rss_kib}}}",
        e2e / direct
    );
}

fn seq_value(p: u32, seq: u64, size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size.max(12));
    v.extend_from_slice(&p.to_be_bytes());
    v.extend_from_slice(&seq.to_be_bytes());
    v.resize(size.max(12), b'x');
    v
}
