//! The uplink against a real nats-server with TLS and client certificates: every acked
//! record reaches the core exactly once and in order per topic, through core restarts,
//! link cuts and kill -9 of fabricd; a foreign client certificate is refused.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use fabricd::produce;

const SLOW: Duration = Duration::from_secs(120);

/// (producer, sequence number) of an acked record, and the offset it was acked with.
type Acked = Arc<Mutex<HashMap<(u32, u64), u64>>>;

fn payload(producer: u32, seq: u64, size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size.max(12));
    v.extend_from_slice(&producer.to_be_bytes());
    v.extend_from_slice(&seq.to_be_bytes());
    v.resize(size.max(12), b'.');
    v
}

/// Produces `count` records on `p<producer>.data` over the unix socket, pipelined
/// `chunk` at a time (`pace` between chunks), recording each ack. Stops early (without
/// panicking) when the daemon goes away or `stop` is set; reconnects when `retry` is set.
#[allow(clippy::too_many_arguments)]
fn producer(
    socket: &Path,
    producer: u32,
    count: u64,
    chunk: u64,
    acked: Acked,
    stop: Arc<AtomicBool>,
    retry: bool,
    pace: Duration,
) -> u64 {
    let topic = format!("p{producer}.data");
    let mut seq = 0u64;
    while seq < count && !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = UnixStream::connect(socket) else {
            if !retry {
                return seq;
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        while seq < count && !stop.load(Ordering::Relaxed) {
            let n = chunk.min(count - seq);
            let mut buf = Vec::new();
            for i in 0..n {
                buf.extend(produce::encode_request(&record(
                    &topic,
                    &payload(producer, seq + i, 24),
                )));
            }
            if s.write_all(&buf).is_err() {
                break;
            }
            let mut ok = 0;
            for i in 0..n {
                match read_reply(&mut s) {
                    Some((produce::OK, off)) => {
                        let off = u64::from_be_bytes(off[..8].try_into().unwrap());
                        acked.lock().unwrap().insert((producer, seq + i), off);
                        ok += 1;
                    }
                    Some((status, msg)) => panic!(
                        "producer {producer}: status {status}: {}",
                        String::from_utf8_lossy(&msg)
                    ),
                    None => break,
                }
            }
            // Unacked records of a broken connection are sent again and get new
            // offsets; the first copy may have been durable all the same (the producer
            // never learned), so the core may hold both: `check` counts acked offsets.
            seq += ok;
            if ok < n {
                break;
            }
            std::thread::sleep(pace);
        }
        if !retry {
            break;
        }
    }
    seq
}

/// Exactly once and in order: no message id twice, every acked offset at the core once
/// with its record, and per topic the acked records in producing order. (Copies of a
/// record the producer resent after losing its ack carry other offsets; they are the
/// producer's retries, not the fabric's duplicates.)
fn check(at_core: &[AtCore], acked: &HashMap<(u32, u64), u64>) {
    let mut ids = HashSet::new();
    for m in at_core {
        assert!(m.msg_id.starts_with("s1/m1/"), "message id {}", m.msg_id);
        assert!(
            ids.insert(m.msg_id.clone()),
            "message id {} is at the core twice",
            m.msg_id
        );
    }
    let by_offset: HashMap<u64, (u32, u64)> = acked.iter().map(|(k, o)| (*o, *k)).collect();
    let mut found = 0usize;
    let mut last: HashMap<String, u64> = HashMap::new();
    for m in at_core {
        let p = u32::from_be_bytes(m.payload[..4].try_into().unwrap());
        let seq = u64::from_be_bytes(m.payload[4..12].try_into().unwrap());
        assert_eq!(m.subject, format!("edge.s1.m1.p{p}.data"));
        let offset = offset_of(&m.msg_id);
        if let Some(&(ap, aseq)) = by_offset.get(&offset) {
            assert_eq!(
                (ap, aseq),
                (p, seq),
                "offset {offset} carries another record"
            );
            found += 1;
            if let Some(prev) = last.get(&m.subject) {
                assert!(seq > *prev, "{}: {seq} after {prev}", m.subject);
            }
            last.insert(m.subject.clone(), seq);
        }
    }
    if found != acked.len() {
        let at: HashSet<u64> = ids.iter().map(|id| offset_of(id)).collect();
        let missing: Vec<_> = by_offset
            .keys()
            .filter(|o| !at.contains(o))
            .take(5)
            .collect();
        panic!(
            "{} of {} acked records missing at the core, e.g. offsets {missing:?}",
            acked.len() - found,
            acked.len()
        );
    }
}

/// The offset a message id names (`s1/m1/<offset>.<crc>`).
fn offset_of(msg_id: &str) -> u64 {
    match fabricd::uplink::parse_message_id(msg_id) {
        Some(("s1/m1/", offset, Some(_))) => offset,
        _ => panic!("message id {msg_id} is not s1/m1/<offset>.<crc>"),
    }
}

fn fabricd_for(s: &Core, url: &str, name: &str, extra: &str) -> Fabricd {
    let dir = s.tmp.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    Fabricd::configure(
        &dir,
        &format!("{extra}\n{}", s.pki.core_toml(url, "client")),
    )
}

fn run_producers(
    socket: &Path,
    producers: u32,
    count: u64,
    acked: &Acked,
    stop: &Arc<AtomicBool>,
    retry: bool,
    pace: Duration,
) -> Vec<std::thread::JoinHandle<u64>> {
    (0..producers)
        .map(|p| {
            let (socket, acked, stop) = (socket.to_owned(), acked.clone(), stop.clone());
            std::thread::spawn(move || producer(&socket, p, count, 256, acked, stop, retry, pace))
        })
        .collect()
}

/// Two producers until `stop`, paced (about 25 000 records/s each at most) so that the
/// backlog an outage, a cut or a kill leaves is one the debug-build uplink delivers in
/// seconds within `SLOW`: unpaced, fabricd took 4.5 million records in one run of the
/// cut test. `reconnect`: they connect again when fabricd goes away.
fn paced_producers(
    socket: &Path,
    acked: &Acked,
    stop: &Arc<AtomicBool>,
    reconnect: bool,
) -> Vec<std::thread::JoinHandle<u64>> {
    run_producers(
        socket,
        2,
        u64::MAX,
        acked,
        stop,
        reconnect,
        Duration::from_millis(10),
    )
}

#[test]
fn records_from_four_producers_arrive_exactly_once_in_order() {
    let per: u64 = std::env::var("FABRICD_TEST_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
        / 4;
    let s = Core::start();
    let mut f = fabricd_for(&s, &s.nats.url(), "edge", "");
    f.start();
    let acked: Acked = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    for h in run_producers(&f.socket, 4, per, &acked, &stop, false, Duration::ZERO) {
        assert_eq!(h.join().unwrap(), per);
    }
    let ingest = start.elapsed();
    let at_core = s.rt.block_on(read_core(&s.js, 4 * per, SLOW));
    eprintln!(
        "{} records: ingest {ingest:?}, at the core after {:?}",
        4 * per,
        start.elapsed()
    );
    check(&at_core, &acked.lock().unwrap());
    assert_eq!(at_core.len() as u64, 4 * per);
    // The status agrees: everything out, nothing behind.
    wait_for("lag 0 in /metrics", Duration::from_secs(10), || {
        (metric(&f, "fabricd_lag_records{class=\"default\"}") == Some(0)).then_some(())
    });
    assert_eq!(
        metric(&f, "fabricd_records_in_total{class=\"default\"}"),
        Some(4 * per)
    );
    assert!(metric(&f, "fabricd_records_out_total").unwrap() >= 4 * per);
    assert_eq!(metric(&f, "fabricd_uplink_connected"), Some(1));
}

#[test]
fn core_stopped_mid_stream_then_restarted_loses_and_duplicates_nothing() {
    let mut s = Core::start();
    let mut f = fabricd_for(&s, &s.nats.url(), "edge", "");
    f.start();
    let acked: Acked = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let producers = paced_producers(&f.socket, &acked, &stop, false);
    s.rt.block_on(async {
        while stream_count(&s.js).await < 5_000 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    s.nats.stop();
    // Producers keep going while the core is away: the edge log takes it.
    let during = acked.lock().unwrap().len();
    let down: u64 = std::env::var("FABRICD_CORE_DOWN_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    std::thread::sleep(Duration::from_secs(down));
    assert!(
        acked.lock().unwrap().len() > during,
        "producers are acked while the core is down"
    );
    assert_eq!(metric(&f, "fabricd_uplink_connected"), Some(0));
    assert!(metric(&f, "fabricd_lag_records{class=\"default\"}").unwrap() > 0);
    s.nats.restart();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    for h in producers {
        h.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let js = s
        .rt
        .block_on(async { async_nats::jetstream::new(core_client(&s.pki, &s.nats.url()).await) });
    let at_core = s.rt.block_on(read_core(&js, acked.len() as u64, SLOW));
    if at_core.len() != acked.len() {
        eprintln!(
            "lag {:?}\n{}",
            metric(&f, "fabricd_lag_records{class=\"default\"}"),
            f.log_text()
        );
    }
    check(&at_core, &acked);
    assert_eq!(at_core.len(), acked.len());
    assert!(
        f.log_contains("connection to the core lost")
            || f.log_contains("cannot connect to the core"),
        "{}",
        f.log_text()
    );
}

/// Two producers through fabricd, whose link to the core a proxy cuts `rounds` times
/// (each after another 3,000 records reached the core) for `cut`; then every acked record
/// must be at the core once, in order. Returns the fabricd, for its log.
fn through_cuts(s: &Core, rounds: u64, cut: Duration) -> Fabricd {
    let proxy = Proxy::start(s.nats.port);
    let mut f = fabricd_for(s, &format!("tls://127.0.0.1:{}", proxy.port), "edge", "");
    // The box knows the stream's duplicate window, as the operator configures it: its
    // config ends with the [core] table.
    let window = s.rt.block_on(async {
        let mut stream = s.js.get_stream("EDGE").await.unwrap();
        stream.info().await.unwrap().config.duplicate_window
    });
    let mut config = std::fs::OpenOptions::new()
        .append(true)
        .open(&f.config)
        .unwrap();
    writeln!(config, "dupe_window_secs = {}", window.as_secs().max(1)).unwrap();
    f.start();
    let acked: Acked = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let producers = paced_producers(&f.socket, &acked, &stop, false);
    for round in 0..rounds {
        let target = 3_000 * (round + 1);
        s.rt.block_on(async {
            while stream_count(&s.js).await < target {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        proxy.set_cut(true);
        std::thread::sleep(cut);
        proxy.set_cut(false);
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    for h in producers {
        h.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let at_core = s.rt.block_on(read_core(&s.js, acked.len() as u64, SLOW));
    check(&at_core, &acked);
    assert_eq!(at_core.len(), acked.len());
    f
}

#[test]
fn link_cut_by_a_proxy_loses_and_duplicates_nothing() {
    through_cuts(&Core::start(), 3, Duration::from_secs(2));
}

/// Exactly once past the core's duplicate window: the window is 2 s, and the link is cut
/// mid-stream (so the core holds records whose acks never reached the box) for 5 s,
/// twice. A box that resent from its last ack would have those records stored twice, the
/// window having forgotten them; it must resume after what the core already holds.
#[test]
fn a_partition_longer_than_the_duplicate_window_duplicates_nothing() {
    let s = Core::start();
    s.rt.block_on(async {
        let mut stream = s.js.get_stream("EDGE").await.unwrap();
        let mut config = stream.info().await.unwrap().config.clone();
        config.duplicate_window = Duration::from_secs(2);
        s.js.update_stream(config)
            .await
            .expect("a 2 s duplicate window");
    });
    let f = through_cuts(&s, 2, Duration::from_secs(5));
    assert!(
        f.log_contains("the core already holds records whose acks were lost"),
        "no session resumed after records the core held:\n{}",
        f.log_text()
    );
}

#[test]
fn kill_9_of_fabricd_at_random_moments_loses_and_duplicates_no_acked_record() {
    let trials: u32 = std::env::var("FABRICD_KILL_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let s = Core::start();
    let mut f = fabricd_for(&s, &s.nats.url(), "edge", "");
    let acked: Acked = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    f.start();
    let producers = paced_producers(&f.socket, &acked, &stop, true);
    // A fixed-seed xorshift: random moments, reproducible runs.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for _ in 0..trials {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::thread::sleep(Duration::from_millis(100 + x % 700));
        f.kill9();
        f.start();
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for h in producers {
        h.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 1000, "only {} records acked", acked.len());
    let at_core = s.rt.block_on(read_core(&s.js, acked.len() as u64, SLOW));
    check(&at_core, &acked);
}

#[test]
fn foreign_client_certificate_is_refused_and_the_edge_says_why() {
    let s = Core::start();
    let dir = s.tmp.path().join("edge");
    std::fs::create_dir_all(&dir).unwrap();
    let mut f = Fabricd::configure(&dir, &s.pki.core_toml(&s.nats.url(), "foreign-client"));
    f.start();
    let mut t = tcp(f.tcp);
    produce(&mut t, &record("p0.data", &payload(0, 0, 12))).unwrap();
    wait_for(
        "fabricd to report the refusal",
        Duration::from_secs(30),
        || f.log_contains("cannot connect to the core").then_some(()),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        s.rt.block_on(stream_count(&s.js)),
        0,
        "nothing reaches the core"
    );
    let text = f.log_text();
    let line = text
        .lines()
        .find(|l| l.contains("cannot connect to the core"))
        .unwrap();
    eprintln!("fabricd says: {line}");
    assert!(f.is_running(), "the daemon stays up");
}

/// A box whose data partition is restored from a backup: its log numbers new records
/// from where the backup ended, at offsets where the core already holds the records of
/// the life the restore undid. Every record of every life reaches the core once (before
/// record ids named the record's CRC, the core dropped the new ones as resends, and the
/// box skipped them as held), and the box says what it found, in its log, its metrics
/// and its status report.
#[test]
fn a_log_restored_from_a_backup_loses_and_duplicates_nothing() {
    let s = Core::start();
    let mut f = reporting_box(&s);
    let log_dir = f.dir.join("log");
    let backup = s.tmp.path().join("backup");
    let count = |s: &Core| s.rt.block_on(stream_count(&s.js));
    // One life: 100 records of its own, all at the core before it ends.
    let live = |f: &mut Fabricd, life: u32, end: &dyn Fn(&mut Fabricd)| {
        f.start();
        let before = count(&s);
        let mut t = tcp(f.tcp);
        for seq in 0..100 {
            produce(&mut t, &record("p0.data", &payload(life, seq, 24))).unwrap();
        }
        let reached = wait_until(Duration::from_secs(30), || count(&s) >= before + 100);
        // The acks persisted, as on a box that ran a while after them.
        std::thread::sleep(Duration::from_millis(500));
        end(f);
        f.terminate();
        assert!(
            reached,
            "life {life}: {} of its 100 records reached the core; fabricd:\n{}",
            count(&s) - before,
            f.log_text()
        );
    };
    live(&mut f, 0, &|_| {});
    copy_dir(&log_dir, &backup);
    live(&mut f, 1, &|_| {});
    std::fs::remove_dir_all(&log_dir).unwrap();
    copy_dir(&backup, &log_dir);
    live(&mut f, 2, &|f| {
        assert_eq!(metric(f, "fabricd_uplink_log_diverged_total"), Some(1));
        let shown = f.dir.join("status.txt");
        let ok = wait_until(Duration::from_secs(10), || {
            let out = s.edgectl().arg("status").output().unwrap();
            std::fs::write(&shown, &out.stdout).unwrap();
            String::from_utf8_lossy(&out.stdout).contains("s1.m1: LOG RESTORED? class default")
        });
        assert!(
            ok,
            "edgectl status:\n{}",
            std::fs::read_to_string(&shown).unwrap()
        );
    });
    let said = f
        .log_text()
        .lines()
        .find(|l| l.contains("the log was restored from a backup"))
        .map(str::to_owned);
    eprintln!("fabricd said: {said:?}");
    assert!(said.is_some_and(|l| l.contains("ERROR") && l.contains("s1/m1/199.")));
    let at_core = s.rt.block_on(read_core(&s.js, 300, SLOW));
    let mut seen = HashSet::new();
    let mut ids = HashSet::new();
    for m in &at_core {
        let life = u32::from_be_bytes(m.payload[..4].try_into().unwrap());
        let seq = u64::from_be_bytes(m.payload[4..12].try_into().unwrap());
        assert!(seen.insert((life, seq)), "life {life}'s record {seq} twice");
        assert!(ids.insert(m.msg_id.clone()), "{} twice", m.msg_id);
        offset_of(&m.msg_id);
    }
    assert_eq!(seen.len(), 300, "records at the core: {}", at_core.len());
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// What a backup tool does to the box's log directory (files and directories only).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Debian's libfaketime (package faketime), which moves the wall clock a process reads.
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// A box whose clock is a day ahead of the core's (a wrong time set by hand, a failing
/// RTC): its records reach the core once each, stamped with its own time, and the core
/// says how far off its clock is. A box days behind cannot connect, keeps its records
/// and says why.
#[test]
fn a_box_whose_clock_is_days_off_loses_nothing_and_it_is_said() {
    assert!(
        Path::new(FAKETIME).exists(),
        "{FAKETIME} missing: apt-get install faketime (cargo xtask test installs it)"
    );
    let s = Core::start();
    let mut f = reporting_box(&s);

    // The certificates are valid for two days from now, so a day ahead still connects.
    clock_off(&mut f, "+1d");
    f.start();
    let mut t = tcp(f.tcp);
    for seq in 0..100 {
        produce(&mut t, &record("p0.data", &payload(0, seq, 24))).unwrap();
    }
    let at_core = s.rt.block_on(read_core(&s.js, 100, SLOW));
    let seqs: HashSet<u64> = at_core
        .iter()
        .map(|m| u64::from_be_bytes(m.payload[4..12].try_into().unwrap()))
        .collect();
    assert_eq!(seqs.len(), 100, "each record once");
    for m in &at_core {
        let ahead = m.produced_ms.unwrap() - m.stored_ms;
        assert!(
            (86_300_000..86_500_000).contains(&ahead),
            "the record is stamped {ahead} ms after the core stored it"
        );
    }
    let shown = f.dir.join("status.txt");
    let said = wait_until(Duration::from_secs(10), || {
        let out = s.edgectl().arg("status").output().unwrap();
        std::fs::write(&shown, &out.stdout).unwrap();
        // A day less the report's way to the core.
        let text = String::from_utf8_lossy(&out.stdout);
        text.contains("s1.m1: CLOCK OFF: its clock is ")
            && text.contains("ahead of the core's (+86")
    });
    let text = std::fs::read_to_string(&shown).unwrap();
    eprintln!("{text}");
    assert!(said, "edgectl status:\n{text}");

    // A box three days behind cannot connect at all: its certificate is not valid yet by
    // its clock (nor the core's). It keeps its records and says why.
    let dir = s.tmp.path().join("behind");
    std::fs::create_dir_all(&dir).unwrap();
    let mut b = Fabricd::configure_as(&dir, "s1", "m2", &s.pki.core_toml(&s.nats.url(), "client"));
    clock_off(&mut b, "-3d");
    b.start();
    let mut t = tcp(b.tcp);
    for seq in 0..10 {
        produce(&mut t, &record("p0.data", &payload(1, seq, 24))).unwrap();
    }
    assert!(b.logged("is the box's clock right?"), "{}", b.log_text());
    assert_eq!(
        metric(&b, "fabricd_lag_records{class=\"default\"}"),
        Some(10)
    );
    assert_eq!(s.rt.block_on(stream_count(&s.js)), 100);
}

/// Box m1 of site s1 that puts a status report every second, on a core `edgectl setup`
/// made (the status bucket among what it makes).
fn reporting_box(s: &Core) -> Fabricd {
    let setup = s.edgectl().arg("setup").output().unwrap();
    assert!(setup.status.success(), "{setup:?}");
    let dir = s.tmp.path().join("edge");
    std::fs::create_dir_all(&dir).unwrap();
    Fabricd::configure(&dir, &s.pki.core_toml_reporting(&s.nats.url(), "client", 1))
}

/// The box's wall clock moved `by` (libfaketime's `+1d`, `-3d`), its monotonic clock not.
fn clock_off(f: &mut Fabricd, by: &str) {
    for (k, v) in [
        ("LD_PRELOAD", FAKETIME),
        ("FAKETIME", by),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ] {
        f.env.push((k.into(), v.into()));
    }
}
