//! Many sites against a core that is a cluster (issue #15, docs/fleet.md): three real
//! nats-server processes in one JetStream cluster (each its own store; TLS with client
//! certificates and one user per site, as `edgectl nats-config` writes it), set up by
//! `edgectl setup` with three replicas, and 50 sites, each a real fabricd process with its
//! own durable log, certificate and subjects, producing 200-byte records at a steady rate.
//! Meanwhile one server is killed (SIGKILL) and started again, and, at another time, a
//! third of the sites lose their link to the core for 15 s. Every record a site's fabricd
//! acknowledged is at the core exactly once, and a site still cannot write as another.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::site_core::Core;
use common::*;

const SITES: usize = 50;
/// Records per second per site.
const RATE: u64 = 5;
const RECORD_BYTES: usize = 200;
const RUN: Duration = Duration::from_secs(40);
const PRODUCERS: usize = 5;

/// A TCP relay from a loopback port to the first of `upstream` that answers, which the
/// test can cut (every connection closed, new ones closed at once) and restore: a site's
/// link to the core.
struct Relay {
    port: u16,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(upstream: Vec<u16>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, o) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            let mut next = 0;
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                // The next server that answers, round the list: a killed one is skipped.
                let up = (0..upstream.len()).find_map(|k| {
                    let p = upstream[(next + k) % upstream.len()];
                    TcpStream::connect(("127.0.0.1", p)).ok()
                });
                next += 1;
                let Some(up) = up else { continue };
                for (from, to) in [(&conn, &up), (&up, &conn)] {
                    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 << 10];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
                o.lock().unwrap().extend([conn, up]);
            }
        });
        Relay { port, cut, open }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
        if cut {
            for s in self.open.lock().unwrap().drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

/// Record `seq` of `site`: its name and number, then filler to `RECORD_BYTES`.
fn payload(site: &str, seq: u64) -> Vec<u8> {
    let mut p = format!("{site} {seq:08} ").into_bytes();
    p.resize(RECORD_BYTES, b'.');
    p
}

#[test]
fn fifty_sites_lose_and_duplicate_nothing_through_a_core_server_kill_and_a_partition() {
    let names: Vec<String> = (0..SITES).map(|i| format!("s{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let begun = Instant::now();
    let mut core = Core::start_cluster(&refs, 3);
    let out = core.edgectl(&["setup"]);
    assert!(
        out.contains("cluster edge-core") && out.contains("stream EDGE ready (3 replica(s))"),
        "{out}"
    );
    let urls = core.urls();
    let ports: Vec<u16> = urls.iter().map(|u| port_of(u)).collect();
    // The first third of the sites reach the core through relays the test cuts.
    let partitioned = SITES / 3;
    let relays: Vec<Relay> = (0..partitioned)
        .map(|_| Relay::start(ports.clone()))
        .collect();
    let mut boxes = Vec::new();
    for (i, site) in names.iter().enumerate() {
        let dir = core.tmp.path().join(format!("edge-{site}"));
        std::fs::create_dir_all(&dir).unwrap();
        let servers = match relays.get(i) {
            Some(r) => vec![format!("tls://127.0.0.1:{}", r.port)],
            None => urls.clone(),
        };
        let mut f = Fabricd::configure_as(
            &dir,
            site,
            "m1",
            &core.pki.core_toml_for(&servers, &format!("site-{site}")),
        );
        f.start();
        boxes.push(f);
    }
    eprintln!(
        "{SITES} sites on a three-server cluster after {:?}",
        begun.elapsed()
    );
    let t0 = Instant::now();

    // Each producer thread sends for its share of the sites, one record per site per
    // turn, RATE turns a second; it counts what each fabricd acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let mine: Vec<(usize, String, std::net::SocketAddr)> = names
                .iter()
                .enumerate()
                .filter(|(i, _)| i % PRODUCERS == p)
                .map(|(i, s)| (i, s.clone(), boxes[i].tcp))
                .collect();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut conns: Vec<TcpStream> = mine.iter().map(|m| tcp(m.2)).collect();
                let mut acked = vec![0u64; mine.len()];
                let started = Instant::now();
                let mut turn = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    for (k, (_, site, _)) in mine.iter().enumerate() {
                        let rec = record("telemetry", &payload(site, acked[k]));
                        match produce(&mut conns[k], &rec) {
                            Ok(_) => acked[k] += 1,
                            Err(e) => panic!("{site}: fabricd refused a record: {e:?}"),
                        }
                    }
                    turn += 1;
                    let due = Duration::from_millis(turn * 1000 / RATE);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                mine.into_iter()
                    .zip(acked)
                    .map(|((i, _, _), n)| (i, n))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let at = |s: u64| {
        if let Some(wait) = Duration::from_secs(s).checked_sub(t0.elapsed()) {
            std::thread::sleep(wait);
        }
    };
    at(8);
    eprintln!("killing server n2 (SIGKILL)");
    core.peers[1].kill9();
    at(16);
    eprintln!("starting server n2 again");
    core.peers[1].restart();
    at(20);
    eprintln!("cutting the links of {partitioned} sites for 15 s");
    for r in &relays {
        r.set_cut(true);
    }
    at(35);
    for r in &relays {
        r.set_cut(false);
    }
    let healed = Instant::now();
    at(RUN.as_secs());
    stop.store(true, Ordering::SeqCst);
    let mut acked = vec![0u64; SITES];
    for p in producers {
        for (i, n) in p.join().unwrap() {
            acked[i] = n;
        }
    }
    let total: u64 = acked.iter().sum();
    eprintln!(
        "{total} records acknowledged by {SITES} sites in {:?} ({:.0} records/s)",
        RUN,
        total as f64 / RUN.as_secs_f64()
    );

    let op = core.operator();
    let held = core
        .rt
        .block_on(read_stream(&op.js, "EDGE", total, Duration::from_secs(120)));
    eprintln!(
        "the core holds {} records, {:?} after the links healed",
        held.len(),
        healed.elapsed()
    );
    let mut per_site: Vec<Vec<u64>> = vec![Vec::new(); SITES];
    let mut ids = std::collections::HashSet::new();
    for m in &held {
        assert!(
            ids.insert(m.msg_id.clone()),
            "message id {} twice at the core",
            m.msg_id
        );
        let site = m.subject.split('.').nth(1).unwrap_or("");
        let i = names
            .iter()
            .position(|n| n == site)
            .unwrap_or_else(|| panic!("a record on {} is of no site", m.subject));
        let text = String::from_utf8_lossy(&m.payload);
        let mut words = text.split(' ');
        assert_eq!(words.next(), Some(site), "{} holds {text:?}", m.subject);
        per_site[i].push(words.next().unwrap().parse().unwrap());
    }
    let mut short = Vec::new();
    for (i, seqs) in per_site.iter_mut().enumerate() {
        seqs.sort_unstable();
        let want: Vec<u64> = (0..acked[i]).collect();
        if *seqs != want {
            let mut distinct = seqs.clone();
            distinct.dedup();
            let missing: Vec<u64> = want
                .iter()
                .filter(|s| distinct.binary_search(s).is_err())
                .copied()
                .collect();
            short.push(format!(
                "site {}: {} acknowledged, the core holds {} ({} distinct), missing {:?}",
                names[i],
                acked[i],
                seqs.len(),
                distinct.len(),
                missing
            ));
        }
    }
    if let Some(first) = short.first() {
        let site = first.split(' ').nth(1).unwrap_or("").trim_end_matches(':');
        let i = names.iter().position(|n| n == site).unwrap_or(0);
        let log = boxes[i].log_text();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "{}\nfabricd of {site}, last lines:\n{}",
            short.join("\n"),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    // Per-site authorization holds on the cluster: site s00 cannot write as s01.
    let s00 = core.connect("site-s00", "_INBOX_s00").unwrap();
    core.rt.block_on(async {
        s00.client
            .publish("edge.s01.m1.telemetry", "forged".into())
            .await
            .unwrap();
        s00.client.flush().await.unwrap();
    });
    s00.refused("Publish", "edge.s01.m1.telemetry");
    for f in &mut boxes {
        assert!(f.is_running(), "a site's fabricd exited:\n{}", f.log_text());
    }
}
