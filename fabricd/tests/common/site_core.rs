//! A core as an operator runs it: nats-server with the access configuration `edgectl
//! nats-config` writes, set up by `edgectl setup`, and the operator's edgectl.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;

use super::*;

/// A core whose access is written by `edgectl nats-config` for `sites`, with the
/// certificates of the operator (`operator`), of each site's boxes (`site-<site>`) and of
/// a stranger the CA signed but no user names (`stranger`), and set up by `edgectl setup`.
pub struct Core {
    pub tmp: tempfile::TempDir,
    pub pki: Pki,
    /// The first (or only) server.
    pub nats: Nats,
    /// A cluster's other servers (none for a single server).
    pub peers: Vec<Nats>,
    /// A cluster's route, profiling and monitoring ports, by server (empty for one
    /// server).
    pub routes: Vec<u16>,
    pub prof_ports: Vec<u16>,
    pub monitor_ports: Vec<u16>,
    pub rt: tokio::runtime::Runtime,
}

impl Core {
    pub fn start(sites: &[&str]) -> Core {
        Core::start_cluster(sites, 1)
    }

    /// `nodes` servers; more than one form one JetStream cluster (`edge-core`, each
    /// server its own store, routes on loopback with TLS both ways: each server presents
    /// its own certificate of the core's CA and requires the other's; client URLs not
    /// advertised so that a client reaches only the servers it is given; the monitoring
    /// and Go's profiling endpoints on loopback, `monitor_ports` and `prof_ports`, for what
    /// each server holds), set up by
    /// `edgectl setup` with its default replicas (3 in a cluster).
    pub fn start_cluster(sites: &[&str], nodes: usize) -> Core {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::generate(&tmp.path().join("pki"));
        pki.issue_client("operator", "/CN=edge-operator");
        pki.issue_client("stranger", "/CN=site-elsewhere");
        for site in sites {
            pki.issue_client(&format!("site-{site}"), &format!("/CN=site-{site}"));
        }
        let mut ports = free_port_list(3 * nodes);
        let monitor_ports = ports.split_off(2 * nodes);
        let prof_ports = ports.split_off(nodes);
        let routes = ports;
        let mut servers = Vec::new();
        for (i, port) in routes.iter().enumerate() {
            let nats_dir = match i {
                0 => tmp.path().join("nats"),
                i => tmp.path().join(format!("nats{i}")),
            };
            write_access(&pki, &nats_dir, sites);
            // nats-server resolves an include relative to the including file.
            let mut conf = "include \"access.conf\"\n".to_owned();
            if nodes > 1 {
                let others: Vec<String> = routes
                    .iter()
                    .filter(|p| *p != port)
                    .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                    .collect();
                pki.issue_peer(&format!("n{i}"), &format!("/CN=n{i}"));
                conf.push_str(&format!(
                    "server_name: n{i}\nprof_port: {}\nhttp: \"127.0.0.1:{}\"\ncluster {{\n name: edge-core\n listen: 127.0.0.1:{port}\n no_advertise: true\n routes: [{}]\n tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 5\n }}\n}}\n",
                    prof_ports[i],
                    monitor_ports[i],
                    others.join(", "),
                    pki.path(&format!("n{i}.pem")).display(),
                    pki.path(&format!("n{i}.key")).display(),
                    pki.path("ca.pem").display(),
                ));
            }
            servers.push(Nats::start_with(&nats_dir, &conf));
        }
        let nats = servers.remove(0);
        let core = Core {
            tmp,
            pki,
            nats,
            peers: servers,
            routes: if nodes > 1 { routes } else { Vec::new() },
            prof_ports: if nodes > 1 { prof_ports } else { Vec::new() },
            monitor_ports: if nodes > 1 { monitor_ports } else { Vec::new() },
            rt: core_runtime(),
        };
        // A cluster answers JetStream requests once it has elected its meta leader.
        let mut tries = 0;
        loop {
            let (ok, out, err) = core.edgectl_run(&["setup"]);
            if ok {
                break;
            }
            tries += 1;
            assert!(tries < 60, "edgectl setup: {err}{out}");
            std::thread::sleep(Duration::from_millis(500));
        }
        core
    }

    /// The body of `GET path` from a server's HTTP endpoint on `port` (HTTP/1.0, so
    /// that Go's server answers unchunked).
    pub fn server_get(port: u16, path: &str) -> String {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let (status, body) = http(addr, format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes());
        assert_eq!(status, 200, "GET {path} on port {port}: {body}");
        body
    }

    /// How many messages cluster server `i`'s own replica of `stream` holds (its
    /// monitoring endpoint's `/jsz`), if it holds one.
    pub fn replica_messages(&self, i: usize, stream: &str) -> Option<u64> {
        let body = Core::server_get(self.monitor_ports[i], "/jsz?accounts=true&streams=true");
        let jsz: serde_json::Value = serde_json::from_str(&body).ok()?;
        jsz["account_details"]
            .as_array()?
            .iter()
            .filter_map(|a| a["stream_detail"].as_array())
            .flatten()
            .find(|st| st["name"] == stream)?["state"]["messages"]
            .as_u64()
    }

    /// The bytes cluster server `i`'s Go heap holds after a collection (`HeapAlloc` of
    /// its profiling endpoint): what the server keeps, without the garbage RSS counts.
    pub fn heap_bytes(&self, i: usize) -> u64 {
        let body = Core::server_get(self.prof_ports[i], "/debug/pprof/heap?gc=1&debug=1");
        body.lines()
            .find_map(|l| l.strip_prefix("# HeapAlloc = "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no HeapAlloc in server n{i}'s heap profile"))
    }

    /// Every server's URL.
    pub fn urls(&self) -> Vec<String> {
        std::iter::once(&self.nats)
            .chain(&self.peers)
            .map(Nats::url)
            .collect()
    }

    pub fn url(&self) -> String {
        self.nats.url()
    }

    /// Runs edgectl as the operator: whether it succeeded, its stdout and its stderr;
    /// panics when it takes more than 120 s (edgectl's own --timeout is per request).
    pub fn edgectl_run(&self, args: &[&str]) -> (bool, String, String) {
        let (stdout, stderr) = (self.tmp.path().join("out"), self.tmp.path().join("err"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_edgectl"))
            .arg("--server")
            .arg(self.url())
            .arg("--ca")
            .arg(self.pki.path("ca.pem"))
            .arg("--cert")
            .arg(self.pki.path("operator.pem"))
            .arg("--key")
            .arg(self.pki.path("operator.key"))
            .args(args)
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("run edgectl");
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "edgectl {args:?} did not finish in 120 s: {}{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default(),
                    std::fs::read_to_string(&stdout).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (
            status.success(),
            std::fs::read_to_string(&stdout).unwrap(),
            std::fs::read_to_string(&stderr).unwrap(),
        )
    }

    /// `edgectl_run`, which must succeed: its stdout.
    pub fn edgectl(&self, args: &[&str]) -> String {
        let (ok, stdout, stderr) = self.edgectl_run(args);
        assert!(ok, "edgectl {args:?}: {stderr}{stdout}");
        stdout
    }

    /// A client holding certificate `cert`, with replies on `inbox`, and the events it
    /// gets (the server's errors among them).
    pub fn connect(&self, cert: &str, inbox: &str) -> Result<Client, String> {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let opts = async_nats::ConnectOptions::new()
            .add_root_certificates(self.pki.path("ca.pem"))
            .add_client_certificate(
                self.pki.path(&format!("{cert}.pem")),
                self.pki.path(&format!("{cert}.key")),
            )
            .require_tls(true)
            .custom_inbox_prefix(inbox)
            .max_reconnects(Some(1))
            .event_callback(move |event| {
                let sink = sink.clone();
                async move { sink.lock().unwrap().push(event.to_string()) }
            });
        let client = self
            .rt
            .block_on(opts.connect(self.url()))
            .map_err(|e| e.to_string())?;
        // Short: a refused request is not answered and waits this long.
        let js = self.rt.block_on(async {
            async_nats::jetstream::ContextBuilder::new()
                .timeout(Duration::from_millis(500))
                .build(client.clone())
        });
        Ok(Client { client, js, events })
    }

    pub fn operator(&self) -> Client {
        self.connect("operator", "_INBOX").unwrap()
    }

    /// Subjects of the records stream matching `filter`, with their message counts.
    pub fn subjects(&self, filter: &str) -> Vec<(String, usize)> {
        let js = self.operator().js;
        self.rt.block_on(async {
            let stream = js.get_stream("EDGE").await.unwrap();
            let mut subjects = stream.info_with_subjects(filter).await.unwrap();
            let mut out = Vec::new();
            while let Some(s) = subjects.next().await {
                out.push(s.unwrap());
            }
            out.sort();
            out
        })
    }
}

pub fn write_access(pki: &Pki, nats_dir: &Path, sites: &[&str]) {
    std::fs::create_dir_all(nats_dir).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgectl"));
    cmd.arg("nats-config");
    for site in sites {
        cmd.args(["--site", site]);
    }
    let out = cmd
        .arg("--tls-cert")
        .arg(pki.path("server.pem"))
        .arg("--tls-key")
        .arg(pki.path("server.key"))
        .arg("--tls-ca")
        .arg(pki.path("ca.pem"))
        .arg("--out")
        .arg(nats_dir.join("access.conf"))
        .output()
        .expect("run edgectl nats-config");
    assert!(
        out.status.success(),
        "edgectl nats-config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Client {
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub events: Arc<Mutex<Vec<String>>>,
}

impl Client {
    /// Waits for the server to report a permissions violation naming `subject`.
    pub fn refused(&self, what: &str, subject: &str) {
        let needle = format!("Permissions Violation for {what} to \"{subject}\"");
        wait_for(&needle, Duration::from_secs(5), || {
            self.events
                .lock()
                .unwrap()
                .iter()
                .any(|e| e.contains(&needle))
                .then_some(())
        });
    }
}
