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

/// One ingest pass: records/s, and how fabricd wrote them (framed bytes, fsyncs).
#[derive(Clone, Copy)]
struct Ingest {
    rate: f64,
    bytes: u64,
    syncs: u64,
}

/// 4 producers over the unix socket, 256 requests in flight each.
fn ingest(value_size: usize, total: u64) -> Ingest {
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
    let class = |name: &str| metric(&f, &format!("{name}{{class=\"default\"}}")).unwrap();
    Ingest {
        rate: total as f64 / secs,
        bytes: class("fabricd_bytes_in_total"),
        syncs: class("fabricd_log_syncs_total"),
    }
}

/// The disk's own limit at fabricd's cadence: the same bytes appended to one file in
/// the same file system, in as many writes as fabricd made group commits, each followed
/// by fdatasync. Returns seconds.
fn disk_limit(bytes: u64, syncs: u64) -> f64 {
    let tmp = tempfile::tempdir().unwrap();
    let mut file = std::fs::File::create(tmp.path().join("plain.log")).unwrap();
    let group = vec![b'x'; bytes.div_ceil(syncs.max(1)) as usize];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(group.len() as u64) as usize;
        file.write_all(&group[..n]).unwrap();
        file.sync_data().unwrap();
        left -= n as u64;
    }
    start.elapsed().as_secs_f64()
}

/// The leaf node's nats-server, which `cargo xtask bench fabric` builds.
fn leaf_program() -> std::path::PathBuf {
    std::env::var_os("FABRIC_BENCH_LEAF_NATS_SERVER")
        .map(Into::into)
        .expect(
            "FABRIC_BENCH_LEAF_NATS_SERVER names the leaf node's nats-server \
             (cargo xtask bench fabric builds it)",
        )
}

/// The peer an edge user would run instead of fabricd: a nats-server leaf node with
/// JetStream in its own domain, each publish synced before its ack, its stream `LEAF`
/// taking `leaf.>`; `hub` is the core's leaf-node port, with the core's PKI.
fn leaf_node(dir: &std::path::Path, hub: Option<(u16, &Pki)>) -> Nats {
    let remote = hub.map_or(String::new(), |(port, pki)| {
        format!(
            "leafnodes {{\n remotes: [ {{\n url: \"tls://127.0.0.1:{port}\"\n tls {{\n cert_file: \"{}\"\n key_file: \"{}\"\n ca_file: \"{}\"\n }}\n }} ]\n}}\n",
            pki.path("client.pem").display(),
            pki.path("client.key").display(),
            pki.path("ca.pem").display()
        )
    });
    let nats = Nats::start_program(
        &leaf_program(),
        dir,
        "\n domain: edge\n sync_interval: always\n",
        &format!("server_name: edge-leaf\n{remote}"),
    );
    let url = leaf_url(&nats);
    core_runtime().block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "LEAF".into(),
            subjects: vec!["leaf.>".into()],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .expect("create the leaf's stream LEAF");
    });
    nats
}

fn leaf_url(leaf: &Nats) -> String {
    format!("nats://127.0.0.1:{}", leaf.port)
}

/// Producer `p` publishes records `from..to` to the leaf's stream the way the fabricd
/// producers send them: 256, then every ack, then `pace` (or until `stop`); returns the
/// next sequence number.
async fn leaf_produce(
    url: String,
    p: u32,
    (from, to): (u64, u64),
    size: usize,
    pace: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> u64 {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let subject = format!("leaf.p{p}");
    let mut acks = Vec::with_capacity(256);
    let mut seq = from;
    while seq < to && !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let n = 256.min(to - seq);
        for i in seq..seq + n {
            let value = bytes::Bytes::from(seq_value(p, i, size));
            acks.push(js.publish(subject.clone(), value).await.unwrap());
        }
        for a in acks.drain(..) {
            a.await.unwrap();
        }
        seq += n;
        tokio::time::sleep(pace).await;
    }
    seq
}

/// One leaf producer per entry of `from` (producer p from `from[p]`), each until `to`
/// or `stop`, on `rt`.
fn leaf_producers(
    rt: &tokio::runtime::Runtime,
    leaf: &Nats,
    from: &[u64],
    to: u64,
    (size, pace): (usize, Duration),
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    from.iter()
        .enumerate()
        .map(|(p, &from)| {
            rt.spawn(leaf_produce(
                leaf_url(leaf),
                p as u32,
                (from, to),
                size,
                pace,
                stop.clone(),
            ))
        })
        .collect()
}

/// Waits for every producer; the sequence number each stopped at.
fn join_all(rt: &tokio::runtime::Runtime, handles: Vec<tokio::task::JoinHandle<u64>>) -> Vec<u64> {
    rt.block_on(async {
        let mut ends = Vec::new();
        for h in handles {
            ends.push(h.await.unwrap());
        }
        ends
    })
}

/// Records/s of 4 leaf producers of `value_size` bytes into a fresh leaf node alone.
fn leaf_ingest(rt: &tokio::runtime::Runtime, value_size: usize, total: u64) -> f64 {
    let tmp = tempfile::tempdir().unwrap();
    let leaf = leaf_node(tmp.path(), None);
    let never = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let start = Instant::now();
    let handles = leaf_producers(
        rt,
        &leaf,
        &[0; 4],
        total / 4,
        (value_size, Duration::ZERO),
        &never,
    );
    join_all(rt, handles);
    total as f64 / start.elapsed().as_secs_f64()
}

/// Records counted at the core that were lost (producer `p` wrote `0..ends[p]`) and
/// duplicated (a (producer, sequence) or a message id seen twice).
fn lost_and_duplicated(at_core: &[AtCore], ends: &[u64]) -> (usize, u64) {
    let mut seen = std::collections::HashSet::new();
    let mut ids = std::collections::HashSet::new();
    let mut duplicated = 0u64;
    for m in at_core {
        let p = u32::from_be_bytes(m.payload[..4].try_into().unwrap());
        let seq = u64::from_be_bytes(m.payload[4..12].try_into().unwrap());
        if !seen.insert((p, seq)) || (!m.msg_id.is_empty() && !ids.insert(m.msg_id.clone())) {
            duplicated += 1;
        }
    }
    let lost = ends
        .iter()
        .enumerate()
        .flat_map(|(p, &end)| (0..end).map(move |s| (p as u32, s)))
        .filter(|k| !seen.contains(k))
        .count();
    (lost, duplicated)
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
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

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time of the threads of `pid` alive now, in nanoseconds (schedstat's first field).
fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

/// An exposition shaped like a daemon's: `families` gauges of `per` labelled samples each.
fn exposition(daemon: &str, families: usize, per: usize) -> String {
    let mut out = String::new();
    for f in 0..families {
        let name = format!("{daemon}_family_{f}_bytes");
        out.push_str(&format!(
            "# HELP {name} A figure of {daemon}'s, one per thing it watches.\n# TYPE {name} gauge\n"
        ));
        for i in 0..per {
            out.push_str(&format!(
                "{name}{{service=\"service-{i}\",state=\"running\"}} {}\n",
                1_000_000 + 37 * (f * per + i)
            ));
        }
    }
    out.push_str("# EOF\n");
    out
}

/// What shipping the box's metrics costs it: fabricd scraping its own endpoint and three
/// exposition files shaped like init's, storaged's and noded's (60, 40 and 60 samples)
/// once a second for `secs`, against the same fabricd without `[scrape]` for as long,
/// in the same run. (CPU ns per round of scrapes, acked wire bytes per round, rounds.)
fn metrics_cost(dir: &std::path::Path, core_toml: &str, secs: u64) -> (f64, f64, u64) {
    let files = [("init", 10, 6), ("storaged", 8, 5), ("noded", 10, 6)];
    let write_files = || {
        for (job, families, per) in files {
            std::fs::write(
                dir.join(format!("{job}.prom")),
                exposition(job, families, per),
            )
            .unwrap();
        }
    };
    let measure = |scrape: bool| -> (u64, u64, u64) {
        let run_dir = dir.join(if scrape { "scraping" } else { "baseline" });
        std::fs::create_dir_all(&run_dir).unwrap();
        let mut f = Fabricd::configure(&run_dir, core_toml);
        if scrape {
            let targets: Vec<String> = files
                .iter()
                .map(|(job, _, _)| {
                    format!("{job} = \"{}\"", dir.join(format!("{job}.prom")).display())
                })
                .collect();
            let table = format!(
                "[scrape]\ninterval_secs = 1\ntargets = {{ fabricd = \"{}\" }}\nfiles = {{ {} }}\n",
                f.metrics,
                targets.join(", ")
            );
            // [scrape] is a table: after the core's tables it would belong to them.
            let config = std::fs::read_to_string(&f.config).unwrap();
            let (head, tail) = config.split_at(config.find("[core]").unwrap_or(config.len()));
            std::fs::write(&f.config, format!("{head}{table}{tail}")).unwrap();
        }
        write_files();
        f.start();
        let pid = f.child.as_ref().unwrap().id();
        // Connected, and past its start.
        std::thread::sleep(Duration::from_secs(3));
        let rounds = || metric(&f, "fabricd_scrapes_total{target=\"fabricd\"}").unwrap_or(0);
        let wire = || metric(&f, "fabricd_uplink_wire_bytes_total").unwrap_or(0);
        let (cpu0, rounds0, wire0) = (cpu_ns(pid), rounds(), wire());
        for i in 0..secs {
            std::thread::sleep(Duration::from_secs(1));
            if i % 10 == 9 {
                write_files();
            }
        }
        // The last round's records acked.
        std::thread::sleep(Duration::from_millis(500));
        // schedstat is summed over the threads alive at each reading: one that exited in
        // between takes its time with it, so the difference cannot go below zero.
        let out = (
            cpu_ns(pid).saturating_sub(cpu0),
            rounds() - rounds0,
            wire() - wire0,
        );
        if scrape {
            let failed = metric(&f, "fabricd_scrape_failures_total{target=\"init\"}");
            assert_eq!(
                failed,
                Some(0),
                "the bench's scrapes failed: {}",
                f.log_text()
            );
        }
        f.terminate();
        out
    };
    let (base_cpu, _, base_wire) = measure(false);
    let (cpu, rounds, wire) = measure(true);
    assert!(rounds > 0, "no scrape was made");
    eprintln!(
        "metrics: {rounds} rounds of 4 scrapes in {secs} s: fabricd used {:.1} ms of CPU ({:.1} ms without [scrape]), the core acked {wire} wire bytes ({base_wire} without)",
        cpu as f64 / 1e6,
        base_cpu as f64 / 1e6
    );
    (
        cpu.saturating_sub(base_cpu) as f64 / rounds as f64,
        wire.saturating_sub(base_wire) as f64 / rounds as f64,
        rounds,
    )
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
    let mib = |records_s: f64| records_s * 1024.0 / (1 << 20) as f64;
    let mut runs: Vec<Ingest> = (0..passes)
        .map(|i| {
            let r = ingest(1024, total);
            eprintln!(
                "durable ingest, 1 KiB values, 4 producers, pass {}: {:.0} records/s = {:.1} MiB/s, {} fsyncs ({:.0} records each)",
                i + 1,
                r.rate,
                mib(r.rate),
                r.syncs,
                total as f64 / r.syncs as f64
            );
            r
        })
        .collect();
    runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let at_median = runs[runs.len() / 2];
    let r1k = at_median.rate;
    let mib_1k = mib(r1k);
    eprintln!(
        "durable ingest, 1 KiB values, median of {passes}: {r1k:.0} records/s = {mib_1k:.1} MiB/s"
    );
    let r100 = edge_common::median((0..passes).map(|i| {
        let r = ingest(100, 4 * total).rate;
        eprintln!(
            "durable ingest, 100 B values, 4 producers, pass {}: {r:.0} records/s",
            i + 1
        );
        r
    }));
    eprintln!("durable ingest, 100 B values, median of {passes}: {r100:.0} records/s");

    // The disk's limit: the median pass's bytes, in as many fsynced writes.
    let disk_mib_1k = edge_common::median((0..passes).map(|i| {
        let secs = disk_limit(at_median.bytes, at_median.syncs);
        let m = mib(total as f64 / secs);
        eprintln!(
            "the disk's limit, a plain writer, {} bytes in {} fsynced writes, pass {}: {m:.1} MiB/s of 1 KiB values",
            at_median.bytes,
            at_median.syncs,
            i + 1
        );
        m
    }));
    eprintln!(
        "the disk's limit, median of {passes}: {disk_mib_1k:.1} MiB/s; fabricd {:.2} x",
        mib_1k / disk_mib_1k
    );

    // The peer's ingest: the same producers' shape into a leaf node alone.
    let prt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let leaf_r1k = edge_common::median((0..passes).map(|i| {
        let r = leaf_ingest(&prt, 1024, total);
        eprintln!(
            "leaf node ingest, 1 KiB values, 4 producers, pass {}: {r:.0} records/s = {:.1} MiB/s",
            i + 1,
            mib(r)
        );
        r
    }));
    eprintln!(
        "leaf node ingest, 1 KiB values, median of {passes}: {leaf_r1k:.0} records/s = {:.1} MiB/s; fabricd {:.2} x",
        mib(leaf_r1k),
        r1k / leaf_r1k
    );

    let leafnode_port = free_port();
    let Core {
        tmp,
        pki,
        mut nats,
        rt,
        js,
    } = Core::start_with(|pki| {
        format!(
            "leafnodes {{\n listen: 127.0.0.1:{leafnode_port}\n {}}}\n",
            pki.nats_tls()
        )
    });

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
    let ends4 = [ends[0], ends[1], per, per];
    let (lost, duplicated) = lost_and_duplicated(&at_core, &ends4);
    let rss_kib = rss_of(f.child.as_ref().unwrap().id());
    eprintln!(
        "at the core: {} records, lost {lost}, duplicated {duplicated}; fabricd RSS {rss_kib} KiB",
        at_core.len()
    );
    drop(f);

    // The peer end to end and after the same outage: producers -> leaf node -> the
    // core's stream LEAF_MIRROR, which sources the leaf's stream across the leaf link.
    let leaf = leaf_node(&tmp.path().join("leaf"), Some((leafnode_port, &pki)));
    rt.block_on(async {
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "LEAF_MIRROR".into(),
            storage: async_nats::jetstream::stream::StorageType::File,
            sources: Some(vec![async_nats::jetstream::stream::Source {
                name: "LEAF".into(),
                external: Some(async_nats::jetstream::stream::External {
                    api_prefix: "$JS.edge.API".into(),
                    delivery_prefix: None,
                }),
                ..Default::default()
            }]),
            ..Default::default()
        })
        .await
        .expect("create the core's stream LEAF_MIRROR");
    });
    let mirrored =
        |js: &async_nats::jetstream::Context| rt.block_on(stream_count_of(js, "LEAF_MIRROR"));
    let start = Instant::now();
    let handles = leaf_producers(&prt, &leaf, &[0; 4], per, (100, Duration::ZERO), &never);
    join_all(&prt, handles);
    wait_for(
        "the core to hold the leaf's records",
        Duration::from_secs(600),
        || (mirrored(&js) >= 4 * per).then_some(()),
    );
    let leaf_e2e = (4 * per) as f64 / start.elapsed().as_secs_f64();
    eprintln!(
        "leaf node end to end (producers -> leaf -> core, 100 B): {leaf_e2e:.0} records/s; fabricd {:.2} x",
        e2e / leaf_e2e
    );
    nats.stop();
    let stop = Arc::new(AtomicBool::new(false));
    let handles = leaf_producers(
        &prt,
        &leaf,
        &[per, per],
        u64::MAX,
        (100, Duration::from_millis(25)),
        &stop,
    );
    std::thread::sleep(partition);
    stop.store(true, Ordering::Relaxed);
    let leaf_ends = join_all(&prt, handles);
    let leaf_backlog: u64 = leaf_ends.iter().map(|e| e - per).sum();
    let leaf_produced = 4 * per + leaf_backlog;
    nats.restart();
    let start = Instant::now();
    let js =
        rt.block_on(async { async_nats::jetstream::new(core_client(&pki, &nats.url()).await) });
    wait_for("the leaf's catch-up", Duration::from_secs(600), || {
        (mirrored(&js) >= leaf_produced).then_some(())
    });
    let leaf_catchup = leaf_backlog as f64 / start.elapsed().as_secs_f64();
    eprintln!(
        "leaf node catch-up after the core came back: {leaf_catchup:.0} records/s ({leaf_backlog} in {:.1} s); fabricd {:.2} x",
        start.elapsed().as_secs_f64(),
        catchup / leaf_catchup
    );
    let at_core = rt.block_on(read_stream(
        &js,
        "LEAF_MIRROR",
        leaf_produced,
        Duration::from_secs(60),
    ));
    let (leaf_lost, leaf_duplicated) =
        lost_and_duplicated(&at_core, &[leaf_ends[0], leaf_ends[1], per, per]);
    let leaf_rss_kib = rss_of(leaf.pid().unwrap());
    eprintln!(
        "at the core from the leaf: {} records, lost {leaf_lost}, duplicated {leaf_duplicated}; leaf nats-server RSS {leaf_rss_kib} KiB",
        at_core.len()
    );
    // What the box's metrics cost it at the image's interval (15 s).
    let (scrape_ns, scrape_wire, _) = metrics_cost(
        &tmp.path().join("metrics"),
        &pki.core_toml(&nats.url(), "client"),
        env_or("FABRIC_BENCH_METRICS_SECS", 30),
    );
    let metrics_overhead_pct = scrape_ns / 15e9 * 100.0;
    let metrics_mb_day = scrape_wire * (86_400.0 / 15.0) / 1e6;
    eprintln!(
        "metrics: {:.2} ms of CPU and {scrape_wire:.0} wire bytes per round of scrapes; at one round per 15 s: {metrics_overhead_pct:.3} % of one core, {metrics_mb_day:.2} MB a day to the core",
        scrape_ns / 1e6
    );
    println!(
        "{{\"bench\":\"fabric\",\"metrics_overhead_pct\":{metrics_overhead_pct:.4},\"metrics_mb_day\":{metrics_mb_day:.2},\"metrics_round_cpu_ms\":{:.3},\"ingest_mib_s_1k\":{mib_1k:.1},\"ingest_msgs_s_100b\":{r100:.0},\"e2e_msgs_s\":{e2e:.0},\"direct_msgs_s\":{direct:.0},\"e2e_vs_direct\":{:.3},\"catchup_msgs_s\":{catchup:.0},\"lost\":{lost},\"duplicated\":{duplicated},\"rss_kib\":{rss_kib},\
\"ingest_vs_leaf_1k\":{:.3},\"ingest_vs_disk_1k\":{:.3},\"e2e_vs_leaf\":{:.3},\"catchup_vs_leaf\":{:.3},\
\"leaf_ingest_mib_s_1k\":{:.1},\"leaf_e2e_msgs_s\":{leaf_e2e:.0},\"leaf_catchup_msgs_s\":{leaf_catchup:.0},\"leaf_lost\":{leaf_lost},\"leaf_duplicated\":{leaf_duplicated},\"leaf_rss_kib\":{leaf_rss_kib},\
\"disk_mib_s_1k\":{disk_mib_1k:.1},\"disk_fsyncs\":{}}}",
        scrape_ns / 1e6,
        e2e / direct,
        r1k / leaf_r1k,
        mib_1k / disk_mib_1k,
        e2e / leaf_e2e,
        catchup / leaf_catchup,
        mib(leaf_r1k),
        at_median.syncs,
    );
}

fn seq_value(p: u32, seq: u64, size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size.max(12));
    v.extend_from_slice(&p.to_be_bytes());
    v.extend_from_slice(&seq.to_be_bytes());
    v.resize(size.max(12), b'x');
    v
}
