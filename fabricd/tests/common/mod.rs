//! The test harness: the real fabricd binary with a temp config, a framed-protocol
//! client, and (for the uplink tests) a real nats-server with TLS.
#![allow(dead_code)] // each test file uses a part

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod prometheus;
pub mod site_core;
#[path = "../../../tpm/tests/common/swtpm.rs"]
pub mod swtpm;

use fabricd::produce;
use fabricd::record::Record;

pub fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` distinct free ports: all held at once while they are picked (one after another,
/// a port just let go can come back as the next).
pub fn free_ports<const N: usize>() -> [u16; N] {
    free_port_list(N).try_into().unwrap()
}

/// `n` distinct free ports, as [`free_ports`] picks them.
pub fn free_port_list(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Polls `f` until it returns Some, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct Fabricd {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub tcp: SocketAddr,
    pub http: SocketAddr,
    pub metrics: SocketAddr,
    /// Every stderr line of every run of this instance.
    pub log: Arc<Mutex<Vec<String>>>,
    /// The thread copying the running child's stderr into `log`; it ends at the child's EOF.
    reader: Option<std::thread::JoinHandle<()>>,
    /// Environment the daemon starts with besides ours (e.g. the TPM it signs with).
    pub env: Vec<(String, String)>,
    /// The daemon's nice value (0 unless a test asks for less of the CPU).
    pub nice: i32,
}

impl Fabricd {
    /// Writes a config under `dir` (log in `dir/log`) with `extra` TOML appended, for
    /// machine m1 of site s1.
    pub fn configure(dir: &Path, extra: &str) -> Fabricd {
        Fabricd::configure_as(dir, "s1", "m1", extra)
    }

    /// [`Fabricd::configure`] for machine `machine` of site `site`.
    pub fn configure_as(dir: &Path, site: &str, machine: &str, extra: &str) -> Fabricd {
        let [tcp, http, metrics]: [SocketAddr; 3] =
            free_ports().map(|p| format!("127.0.0.1:{p}").parse().unwrap());
        let socket = dir.join("produce.sock");
        let config = dir.join("fabricd.toml");
        let text = format!(
            "site = \"{site}\"\nmachine = \"{machine}\"\nlog_dir = \"{}\"\nunix_socket = \"{}\"\ntcp_listen = \"{tcp}\"\nhttp_listen = \"{http}\"\nmetrics_listen = \"{metrics}\"\n{extra}\n",
            dir.join("log").display(),
            socket.display()
        );
        std::fs::write(&config, text).unwrap();
        Fabricd {
            child: None,
            dir: dir.to_owned(),
            config,
            socket,
            tcp,
            http,
            metrics,
            log: Arc::new(Mutex::new(Vec::new())),
            reader: None,
            env: Vec::new(),
            nice: 0,
        }
    }

    /// Starts the binary and waits for `READY=1` on its NOTIFY_FD.
    pub fn start(&mut self) {
        let (ready_rd, ready_wr) = std::io::pipe().unwrap();
        let fd = ready_wr.as_raw_fd();
        let nice = self.nice;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fabricd"));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--log-level")
            .arg("info")
            .env("NOTIFY_FD", "3")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: dup2 and setpriority are async-signal-safe; the child gets the pipe's
        // write end as fd 3, and its nice value.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 3) < 0
                    || (nice != 0 && libc::setpriority(libc::PRIO_PROCESS, 0, nice) < 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn fabricd");
        drop(ready_wr);
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        self.reader = Some(std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("FABRICD_TEST_VERBOSE").is_some() {
                    eprintln!("fabricd: {line}");
                }
                log.lock().unwrap().push(line);
            }
        }));
        // Read lines until READY=1 or EOF (the child died). The pipe stays open after
        // READY=1 until fabricd says HEALTHY=1 (it reached the core), which may never come.
        let mut got = String::new();
        for line in BufReader::new(ready_rd).lines() {
            let Ok(line) = line else { break };
            if line.trim() == "READY=1" {
                got = line;
                break;
            }
        }
        if !got.contains("READY=1") {
            let status = child.wait().unwrap();
            panic!(
                "fabricd did not become ready ({status}); stderr:\n{}",
                self.log.lock().unwrap().join("\n")
            );
        }
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let status = c.wait().unwrap();
        // The exit does not mean its last lines were read: wait for the reader's EOF so
        // `log` holds everything the process wrote.
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        status
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Whether a line read so far contains `needle`. A line the daemon has just written may
    /// not be read yet: for a line that should be there, use `logged`.
    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// Whether a line containing `needle` is read within 10 s.
    pub fn logged(&self, needle: &str) -> bool {
        let start = Instant::now();
        while !self.log_contains(needle) {
            if start.elapsed() > Duration::from_secs(10) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Fabricd {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn record(topic: &str, value: &[u8]) -> Record {
    Record {
        topic: topic.into(),
        key: None,
        headers: vec![],
        timestamp_ms: 0,
        value: value.to_vec(),
    }
}

/// Reads one reply frame: (status, payload). None when the server closed the stream.
pub fn read_reply(s: &mut impl Read) -> Option<(u8, Vec<u8>)> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let len = u32::from_be_bytes(len) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((body[0], body[1..].to_vec()))
}

/// Sends one record and waits for its reply; Ok(offset) or Err((status, message)).
pub fn produce<S: Read + Write>(s: &mut S, rec: &Record) -> Result<u64, (u8, String)> {
    s.write_all(&produce::encode_request(rec)).unwrap();
    let (status, payload) = read_reply(s).expect("a reply");
    if status == produce::OK {
        Ok(u64::from_be_bytes(payload[..8].try_into().unwrap()))
    } else {
        Err((status, String::from_utf8_lossy(&payload).into_owned()))
    }
}

pub fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// `len` bytes that do not compress (xorshift from `seed`, which must not be 0).
pub fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The value of one metric line (`name{labels}` exactly) from `/metrics`.
pub fn metric(f: &Fabricd, series: &str) -> Option<u64> {
    let (status, body) = http(f.metrics, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, 200, "{body}");
    body.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|v| v.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    })
}

/// One plain HTTP/1.1 request on a fresh connection: (status, body).
pub fn http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    http_over(tcp(addr), request)
}

/// One plain HTTP/1.1 request on the connection `s`, which the server then closes.
pub fn http_over(mut s: impl Read + Write, request: &[u8]) -> (u16, String) {
    s.write_all(request).unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// Test CA, server and client certificates made with the host's `openssl`.
pub struct Pki {
    pub dir: PathBuf,
}

/// Runs openssl in `dir`; its stdout.
pub fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

impl Pki {
    pub fn generate(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("ext.cnf"),
            "[ca]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n\
             [server]\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n\
             [client]\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n\
             [peer]\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        for ca in ["ca", "foreign-ca"] {
            openssl(
                dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN={ca}"),
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            );
        }
        let pki = Pki {
            dir: dir.to_owned(),
        };
        for (name, ca, ext) in [
            ("server", "ca", "server"),
            ("client", "ca", "client"),
            ("foreign-client", "foreign-ca", "client"),
        ] {
            pki.issue(name, &format!("/CN={name}"), ca, ext);
        }
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Issues `<name>.pem` and `<name>.key`: a client certificate with `subject` (openssl's
    /// `/CN=...` form), signed by the test CA.
    pub fn issue_client(&self, name: &str, subject: &str) {
        self.issue(name, subject, "ca", "client");
    }

    /// Issues `<name>.pem` and `<name>.key`: a cluster server's certificate for its
    /// routes, which each end presents to the other (server and client use, 127.0.0.1).
    pub fn issue_peer(&self, name: &str, subject: &str) {
        self.issue(name, subject, "ca", "peer");
    }

    /// Issues `<name>.pem`: a client certificate with `subject` for the public key in
    /// `public_pem` (a key this directory never holds, e.g. one in a TPM).
    pub fn issue_client_for(&self, name: &str, subject: &str, public_pem: &Path) {
        self.issue_for(name, subject, "ca", "client", Some(public_pem));
        std::fs::remove_file(self.path(&format!("{name}.key"))).unwrap();
    }

    /// `<name>.pem` and `<name>.key`, signed by `<ca>.pem` with the `ext` section of
    /// ext.cnf (server, client or peer).
    fn issue(&self, name: &str, subject: &str, ca: &str, ext: &str) {
        self.issue_for(name, subject, ca, ext, None);
    }

    /// `issue`, the certificate naming `public_pem`'s key instead of the new key's.
    fn issue_for(&self, name: &str, subject: &str, ca: &str, ext: &str, public_pem: Option<&Path>) {
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                subject,
            ],
        );
        let (csr, ca_pem, ca_key, out) = (
            format!("{name}.csr"),
            format!("{ca}.pem"),
            format!("{ca}.key"),
            format!("{name}.pem"),
        );
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &out,
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-extensions",
            ext,
        ];
        let public = public_pem.map(|p| p.display().to_string());
        if let Some(public) = &public {
            args.extend(["-force_pubkey", public.as_str()]);
        }
        openssl(&self.dir, &args);
    }

    /// A nats-server `tls` block: this CA's server certificate, client certificates
    /// required and checked against the CA.
    pub fn nats_tls(&self) -> String {
        format!(
            "tls {{\n cert_file: \"{}\"\n key_file: \"{}\"\n ca_file: \"{}\"\n verify: true\n timeout: 5\n}}\n",
            self.path("server.pem").display(),
            self.path("server.key").display(),
            self.path("ca.pem").display()
        )
    }

    /// The `[core]` table for fabricd, with the client certificate `client`. Status
    /// reports are off (these cores have no status bucket).
    pub fn core_toml(&self, url: &str, client: &str) -> String {
        self.core_toml_for(&[url.to_owned()], client)
    }

    /// [`Pki::core_toml`] with status reports every `secs` seconds (the core needs the
    /// status bucket `edgectl setup` makes).
    pub fn core_toml_reporting(&self, url: &str, client: &str, secs: u64) -> String {
        reporting_every(&self.core_toml(url, client), secs)
    }

    /// [`Pki::core_toml`] with every server of `urls` (a cluster's).
    pub fn core_toml_for(&self, urls: &[String], client: &str) -> String {
        let servers: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
        format!(
            "[core]\nservers = [{}]\nprefix = \"edge\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nbackoff_max_ms = 1000\nack_timeout_ms = 10000\nstatus_interval_secs = 0\n",
            servers.join(", "),
            self.path("ca.pem").display(),
            self.path(&format!("{client}.pem")).display(),
            self.path(&format!("{client}.key")).display()
        )
    }
}

/// A `[core]` table of [`Pki::core_toml`]'s with status reports every `secs` seconds.
pub fn reporting_every(core_toml: &str, secs: u64) -> String {
    core_toml.replace(
        "status_interval_secs = 0",
        &format!("status_interval_secs = {secs}"),
    )
}

/// A real nats-server on loopback: JetStream on, TLS with client certificates required.
pub struct Nats {
    pub port: u16,
    pub dir: PathBuf,
    program: PathBuf,
    child: Option<Child>,
}

impl Nats {
    pub fn start(dir: &Path, pki: &Pki) -> Nats {
        Nats::start_with(dir, &pki.nats_tls())
    }

    /// A nats-server whose configuration is `listen`, `jetstream` and then `access` (its
    /// tls and authorization, e.g. `include "..."`, and any other block).
    pub fn start_with(dir: &Path, access: &str) -> Nats {
        Nats::start_program(Path::new("/usr/sbin/nats-server"), dir, "", access)
    }

    /// `program` with `listen`, `jetstream { store_dir ... <jetstream> }` and `rest`.
    pub fn start_program(program: &Path, dir: &Path, jetstream: &str, rest: &str) -> Nats {
        let mut n = Nats {
            port: free_port(),
            dir: dir.to_owned(),
            program: program.to_owned(),
            child: None,
        };
        std::fs::create_dir_all(dir.join("store")).unwrap();
        std::fs::write(
            dir.join("nats.conf"),
            format!(
                "listen: 127.0.0.1:{}\njetstream {{ store_dir: \"{}\" {jetstream} }}\n{rest}\n",
                n.port,
                dir.join("store").display(),
            ),
        )
        .unwrap();
        n.restart();
        n
    }

    /// The running server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Makes nats-server read its configuration again (SIGHUP), as `nats-server --signal
    /// reload` does.
    pub fn reload(&self) {
        let c = self.child.as_ref().expect("running");
        unsafe { libc::kill(c.id() as i32, libc::SIGHUP) };
    }

    /// What nats-server has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("nats.log"))
            .unwrap();
        let child = Command::new(&self.program)
            .arg("-c")
            .arg(self.dir.join("nats.conf"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let port = self.port;
        wait_for("nats-server to listen", Duration::from_secs(20), || {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("nats-server exited ({st}):\n{}", self.log_text());
            }
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
    }

    /// Empties the stopped server's store, as a machine given a new disk comes back.
    pub fn wipe_store(&self) {
        assert!(self.child.is_none(), "the server is running");
        let store = self.dir.join("store");
        std::fs::remove_dir_all(&store).unwrap();
        std::fs::create_dir_all(&store).unwrap();
    }

    /// Kills the server at once (SIGKILL), as a crashed machine would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the core the way an operator does (SIGTERM). Not SIGKILL: that would test
    /// the core's own durability (nats-server's file store syncs lazily, so a killed
    /// core may forget publishes it acked), which no edge can make up for.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The operator's side of the core: connects with the good client certificate.
/// A core as the operator runs it: its own CA and certificates, a TLS nats-server with
/// JetStream, and the `EDGE` stream created, with the client the tests read it through.
pub struct Core {
    pub tmp: tempfile::TempDir,
    pub pki: Pki,
    pub nats: Nats,
    pub rt: tokio::runtime::Runtime,
    pub js: async_nats::jetstream::Context,
}

impl Core {
    pub fn start() -> Core {
        Core::start_with(|_| String::new())
    }

    /// A core whose nats-server configuration also has what `more` writes (after its
    /// `tls` block), given the core's PKI.
    pub fn start_with(more: impl FnOnce(&Pki) -> String) -> Core {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::generate(&tmp.path().join("pki"));
        let nats = Nats::start_with(
            &tmp.path().join("nats"),
            &format!("{}{}", pki.nats_tls(), more(&pki)),
        );
        let rt = core_runtime();
        let js = rt.block_on(async {
            let js = async_nats::jetstream::new(core_client(&pki, &nats.url()).await);
            create_stream(&js).await;
            js
        });
        Core {
            tmp,
            pki,
            nats,
            rt,
            js,
        }
    }
}

impl Core {
    /// `edgectl` as the operator runs it against this core (its URL, CA and the
    /// operator's client certificate); the subcommand follows.
    pub fn edgectl(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_edgectl"));
        c.arg("--server")
            .arg(self.nats.url())
            .arg("--ca")
            .arg(self.pki.path("ca.pem"))
            .arg("--cert")
            .arg(self.pki.path("client.pem"))
            .arg("--key")
            .arg(self.pki.path("client.key"));
        c
    }
}

/// The runtime the tests' own core client (the operator's side) runs on.
pub fn core_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

pub async fn core_client(pki: &Pki, url: &str) -> async_nats::Client {
    let mut tries = 0;
    loop {
        let r = async_nats::ConnectOptions::new()
            .add_root_certificates(pki.path("ca.pem"))
            .add_client_certificate(pki.path("client.pem"), pki.path("client.key"))
            .require_tls(true)
            .connect(url)
            .await;
        match r {
            Ok(c) => return c,
            Err(e) if tries < 50 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("operator cannot connect to {url}: {e}"),
        }
    }
}

/// Creates the core stream the way an operator would (the edge never does).
pub async fn create_stream(js: &async_nats::jetstream::Context) {
    js.create_stream(stream_config("EDGE", "edge.>", 1))
        .await
        .expect("create stream EDGE");
}

/// A stream as `edgectl setup` makes the records stream: file storage, the default
/// duplicate window, direct gets (a box asks what the core holds of its records), kept
/// by `replicas` servers.
pub fn stream_config(
    name: &str,
    subjects: &str,
    replicas: usize,
) -> async_nats::jetstream::stream::Config {
    async_nats::jetstream::stream::Config {
        name: name.into(),
        subjects: vec![subjects.into()],
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(600),
        storage: async_nats::jetstream::stream::StorageType::File,
        allow_direct: true,
        ..Default::default()
    }
}

/// One message as the core holds it.
#[derive(Debug, Clone)]
pub struct AtCore {
    pub subject: String,
    pub msg_id: String,
    pub payload: Vec<u8>,
    /// When the core stored it (unix ms), and when the box's producer made it
    /// (`Fabric-Timestamp`).
    pub stored_ms: i64,
    pub produced_ms: Option<i64>,
}

pub async fn stream_count(js: &async_nats::jetstream::Context) -> u64 {
    stream_count_of(js, "EDGE").await
}

/// How many messages stream `name` holds (0 while it cannot be asked).
pub async fn stream_count_of(js: &async_nats::jetstream::Context, name: &str) -> u64 {
    match js.get_stream(name).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Waits until the stream holds at least `n` messages, then reads them all in order.
pub async fn read_core(
    js: &async_nats::jetstream::Context,
    n: u64,
    timeout: Duration,
) -> Vec<AtCore> {
    read_stream(js, "EDGE", n, timeout).await
}

/// Waits until stream `name` holds at least `n` messages, then reads them all in order.
pub async fn read_stream(
    js: &async_nats::jetstream::Context,
    name: &str,
    n: u64,
    timeout: Duration,
) -> Vec<AtCore> {
    use futures_util::StreamExt;
    let start = Instant::now();
    loop {
        let c = stream_count_of(js, name).await;
        if c >= n {
            break;
        }
        if start.elapsed() > timeout {
            // The caller's check names what is missing.
            eprintln!("core holds {c} of {n} messages after {timeout:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let stragglers (duplicates would show here) arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = stream_count_of(js, name).await;
    // A loaded cluster may answer "JetStream system temporarily unavailable" (503) for a
    // while: asked again for up to a minute.
    let mut tries = 0;
    let consumer = loop {
        let made = match js.get_stream(name).await {
            Ok(stream) => stream
                .create_consumer(async_nats::jetstream::consumer::pull::Config {
                    ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match made {
            Ok(c) => break c,
            Err(e) if tries < 60 => {
                tries += 1;
                eprintln!("reading stream {name}: {e}; asking again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!("reading stream {name}: {e}"),
        }
    };
    let mut out = Vec::with_capacity(total as usize);
    let mut msgs = consumer.messages().await.unwrap();
    while (out.len() as u64) < total {
        let m = tokio::time::timeout(Duration::from_secs(30), msgs.next())
            .await
            .expect("reading the stream stalled")
            .unwrap()
            .unwrap();
        let msg_id = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let stored_ms = m
            .info()
            .map(|i| (i.published.unix_timestamp_nanos() / 1_000_000) as i64)
            .unwrap_or(0);
        let produced_ms = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Fabric-Timestamp"))
            .and_then(|v| v.as_str().parse().ok());
        out.push(AtCore {
            subject: m.subject.to_string(),
            msg_id,
            payload: m.payload.to_vec(),
            stored_ms,
            produced_ms,
        });
    }
    out
}

/// edge-tpm, built beside fabricd (another package's binary is not built for this one's
/// tests by itself).
pub fn edge_tpm() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "-p", "edge-tpm", "--bin", "edge-tpm"])
        .status()
        .expect("run cargo");
    assert!(st.success(), "cargo build -p edge-tpm failed");
    let dir = Path::new(env!("CARGO_BIN_EXE_fabricd")).parent().unwrap();
    dir.join("edge-tpm")
}

/// Runs edge-tpm (`program`) against `tpm`, its event log at `log`, with `input` on its
/// stdin; its stdout.
pub fn tpm_run(
    program: &Path,
    tpm: &swtpm::Swtpm,
    log: &Path,
    args: &[&str],
    input: &[u8],
) -> Vec<u8> {
    let mut child = Command::new(program)
        .args(args)
        .env("EDGE_TPM_TCTI", tcti(tpm))
        .env("EDGE_TPM_EVENTLOG", log)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run edge-tpm");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "edge-tpm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The TCTI edge-tpm reaches `tpm` through (`EDGE_TPM_TCTI`).
pub fn tcti(tpm: &swtpm::Swtpm) -> String {
    format!("swtpm:host=127.0.0.1,port={}", tpm.port)
}

/// A TCP proxy between fabricd and the core whose link the test can cut: every
/// connection closed, new ones closed at once, until it is restored.
pub struct Proxy {
    pub port: u16,
    cut: Arc<std::sync::atomic::AtomicBool>,
    /// The open connections (both ends), by number: a cut shuts them down; one that
    /// ends by itself leaves (a thousand sites reconnecting would run out of descriptors).
    conns: Arc<Mutex<std::collections::HashMap<u64, [TcpStream; 2]>>>,
}

impl Proxy {
    pub fn start(target: u16) -> Proxy {
        Proxy::start_to(vec![target])
    }

    /// A proxy to the first of `targets` that answers, taken in turn from the one after
    /// the last used (a cluster's servers: a killed one is skipped).
    pub fn start_to(targets: Vec<u16>) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns: Arc<Mutex<std::collections::HashMap<u64, [TcpStream; 2]>>> = Default::default();
        let (c2, k2) = (cut.clone(), conns.clone());
        std::thread::spawn(move || {
            let mut next = 0;
            let mut id = 0u64;
            for down in listener.incoming() {
                let Ok(down) = down else { break };
                if c2.load(Ordering::Relaxed) {
                    drop(down);
                    continue;
                }
                let up = (0..targets.len()).find_map(|k| {
                    TcpStream::connect(("127.0.0.1", targets[(next + k) % targets.len()])).ok()
                });
                next += 1;
                let Some(up) = up else { continue };
                let (Ok(d), Ok(u), Ok(d2), Ok(u2)) = (
                    down.try_clone(),
                    up.try_clone(),
                    down.try_clone(),
                    up.try_clone(),
                ) else {
                    continue;
                };
                id += 1;
                k2.lock().unwrap().insert(id, [d, u]);
                for (mut a, mut b) in [(d2, u2), (up, down)] {
                    let k3 = k2.clone();
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut a, &mut b);
                        let _ = b.shutdown(std::net::Shutdown::Both);
                        k3.lock().unwrap().remove(&id);
                    });
                }
            }
        });
        Proxy { port, cut, conns }
    }

    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::Relaxed);
        if cut {
            for c in self.conns.lock().unwrap().drain().flat_map(|(_, c)| c) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}
