//! A core for the system tests: a real nats-server on loopback with JetStream and
//! client certificates (made with openssl), the operator's `edgectl` against it, and a
//! link to it the guest dials through a user-net forward, which a test can cut.

use anyhow::{bail, Context, Result};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The manifest signing key the image under test trusts: the operator's key that
/// `cargo xtask image` signed the image's allowlist with and whose public half it ships.
pub fn operator_key() -> Result<PathBuf> {
    let dir = match std::env::var_os("EDGEOS_KEY_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
            .join(".config/edgeos/keys"),
    };
    let key = dir.join("manifest.key");
    if !key.is_file() {
        bail!(
            "{} does not exist: the operator key the image was built with is needed to \
             publish to it (set EDGEOS_KEY_DIR as for `cargo xtask image`)",
            key.display()
        );
    }
    Ok(key)
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// CA, the core's server certificate (valid for 127.0.0.1 and for 10.0.2.100, the
/// address the guest dials), the operator's certificate, site0's enrollment certificate
/// and a site0 box certificate given by hand (`site.pem`, for a box not enrolled through
/// its TPM), the box's site-network server certificate (`lan-server`) and a site
/// machine's client certificate (`plc`, CN plc-7), made with openssl.
pub fn make_pki(dir: &Path) -> Result<()> {
    std::fs::write(
        dir.join("ext.cnf"),
        "[server]\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:10.0.2.100\n\
         [client]\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=clientAuth\n",
    )?;
    make_ca(dir, "test core CA")?;
    for (name, subject, ext) in [
        ("server", "server", "server"),
        ("operator", "edge-operator", "client"),
        ("enroll", "enroll-site0", "client"),
        ("site", "site-site0", "client"),
        // The box's TLS on its site-network listener, and a machine of the site network.
        ("lan-server", "edge0 site network", "server"),
        ("plc", "plc-7", "client"),
    ] {
        issue(dir, name, &format!("/CN={subject}"), ext)?;
    }
    // The operator's escrow key pair, for the boxes' recovery keys.
    run(Command::new("openssl")
        .current_dir(dir)
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .args(["-out", "escrow.key"]))?;
    run(Command::new("openssl").current_dir(dir).args([
        "pkey",
        "-in",
        "escrow.key",
        "-pubout",
        "-out",
        "escrow.pub",
    ]))?;
    Ok(())
}

const EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// `ca.pem` and `ca.key` in `dir`: a CA for two days.
pub fn make_ca(dir: &Path, cn: &str) -> Result<()> {
    run(Command::new("openssl")
        .current_dir(dir)
        .args(["req", "-x509"])
        .args(EC_KEY)
        .args(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"])
        .args(["-subj", &format!("/CN={cn}")])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]))?;
    Ok(())
}

/// `<name>.pem` and `<name>.key` in `dir`, for `subject` (`/O=.../CN=...`), signed by
/// the CA there with the extensions of section `ext` of `dir/ext.cnf`.
pub fn issue(dir: &Path, name: &str, subject: &str, ext: &str) -> Result<()> {
    run(Command::new("openssl")
        .current_dir(dir)
        .arg("req")
        .args(EC_KEY)
        .args(["-keyout", &format!("{name}.key")])
        .args(["-out", &format!("{name}.csr")])
        .args(["-subj", subject]))?;
    run(Command::new("openssl")
        .current_dir(dir)
        .args(["x509", "-req", "-in", &format!("{name}.csr")])
        .args(["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"])
        .args(["-out", &format!("{name}.pem"), "-days", "2"])
        .args(["-extfile", "ext.cnf", "-extensions", ext]))?;
    Ok(())
}

/// The core: nats-server on loopback, JetStream on, client certificates required and
/// mapped to users by the access configuration `edgectl nats-config` writes for site0.
pub struct Core {
    pub port: u16,
    pub child: Child,
}

impl Core {
    pub fn start(dir: &Path, edgectl: &Path) -> Result<Core> {
        Core::start_on(dir, edgectl, free_port()?)
    }

    /// [`Core::start`] on 127.0.0.1:`port`, in a process group of its own.
    pub fn start_on(dir: &Path, edgectl: &Path, port: u16) -> Result<Core> {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            bail!(
                "127.0.0.1:{port} is taken: another nats-server (or something else) listens there"
            );
        }
        std::fs::create_dir_all(dir.join("store"))?;
        run(Command::new(edgectl)
            .args(["nats-config", "--site", "site0", "--tls-cert"])
            .arg(dir.join("server.pem"))
            .arg("--tls-key")
            .arg(dir.join("server.key"))
            .arg("--tls-ca")
            .arg(dir.join("ca.pem"))
            .arg("--out")
            .arg(dir.join("access.conf")))?;
        std::fs::write(
            dir.join("nats.conf"),
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\ninclude \"access.conf\"\n",
                dir.join("store").display(),
            ),
        )?;
        let log = std::fs::File::create(dir.join("nats.log"))?;
        let mut child = Command::new("/usr/sbin/nats-server")
            .arg("-c")
            .arg(dir.join("nats.conf"))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("failed to start /usr/sbin/nats-server")?;
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > Duration::from_secs(20) || child.try_wait()?.is_some() {
                let _ = child.kill();
                bail!(
                    "nats-server did not listen on {port}: {}",
                    std::fs::read_to_string(dir.join("nats.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Core { port, child })
    }

    /// Leaves nats-server running after this handle: its process group id.
    pub fn detach(self) -> u32 {
        let pid = self.child.id();
        std::mem::forget(self);
        pid
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The link between the guest's relay and the core: a TCP proxy the test can cut
/// (open connections shut, new ones refused) and restore.
pub struct Link {
    pub port: u16,
    pub cut: Arc<AtomicBool>,
    pub conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Link {
    pub fn start(target: u16) -> Result<Link> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Default::default();
        let (c2, k2) = (cut.clone(), conns.clone());
        std::thread::spawn(move || {
            for down in listener.incoming() {
                let Ok(down) = down else { break };
                if c2.load(Ordering::Relaxed) {
                    continue;
                }
                let Ok(up) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let (Ok(d2), Ok(u2)) = (down.try_clone(), up.try_clone()) else {
                    continue;
                };
                if let (Ok(d3), Ok(u3)) = (down.try_clone(), up.try_clone()) {
                    k2.lock().unwrap().extend([d3, u3]);
                }
                for (mut a, mut b) in [(d2, u2), (up, down)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut a, &mut b);
                        let _ = b.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Ok(Link { port, cut, conns })
    }

    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
        if cut {
            for c in self.conns.lock().unwrap().drain(..) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// The operator's tool (fabricd's `edgectl`): `EDGECTL`, else built (or found up to
/// date) beside this test's binary: a stale one would lack options the test uses.
pub fn edgectl() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("EDGECTL") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let beside = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("edgectl"))
        .context("test binary has no parent directory")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo).args(["build", "-p", "fabricd", "--bin", "edgectl"]))?;
    Ok(beside)
}

pub struct Operator {
    pub edgectl: PathBuf,
    pub dir: PathBuf,
    pub port: u16,
}

impl Operator {
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(&self.edgectl);
        c.arg("--server")
            .arg(format!("tls://127.0.0.1:{}", self.port))
            .arg("--ca")
            .arg(self.dir.join("ca.pem"))
            .arg("--cert")
            .arg(self.dir.join("operator.pem"))
            .arg("--key")
            .arg(self.dir.join("operator.key"));
        c
    }

    /// Puts `contents` under a KV key (written to `name` in the test's directory first);
    /// its sha256 as `edgectl put-kv` prints it.
    pub fn put_kv(&self, kv_key: &str, name: &str, contents: &str) -> Result<String> {
        let file = self.dir.join(name);
        std::fs::write(&file, contents)?;
        self.put_kv_file(kv_key, &file)
    }

    pub fn put_kv_file(&self, kv_key: &str, file: &Path) -> Result<String> {
        let out = run(self.cmd().args(["put-kv", "--kv-key", kv_key]).arg(file))?;
        out.split_whitespace()
            .last()
            .filter(|h| h.len() == 64)
            .map(str::to_string)
            .with_context(|| format!("no sha256 in {out:?}"))
    }

    /// Signs `manifest` and publishes it to site0.
    pub fn publish(&self, key: &Path, manifest: &serde_json::Value) -> Result<()> {
        let file = self.dir.join("manifest.json");
        std::fs::write(&file, manifest.to_string())?;
        run(self
            .cmd()
            .args(["publish", "--site", "site0", "--signing-key"])
            .arg(key)
            .arg(&file))?;
        Ok(())
    }
}

/// `"name" = '''contents'''` unless the contents hold `'''`; PEM and TOML here never do.
pub fn toml_string(name: &str, contents: &str) -> String {
    assert!(
        !contents.contains("'''"),
        "{name} cannot be a literal string"
    );
    format!("\"{name}\" = '''\n{contents}'''\n")
}

/// A site0 box's provisioning (the fw_cfg item `opt/org.edgeos/provision`, which init
/// unpacks into /var/lib/edge/provision) for the core made in `dir` by [`make_pki`],
/// which the guest reaches at 10.0.2.100:4222: fabricd's core table (after `extra`, TOML
/// such as `site = "site1"`), the core's CA and the site's enrollment certificate; the
/// site certificate comes with enrollment. Also the site network listener's certificate
/// and the CA of the machines that may produce there.
pub fn provision_bundle(dir: &Path, extra: &str) -> Result<String> {
    let pem = |n: &str| {
        std::fs::read_to_string(dir.join(n)).with_context(|| format!("{}", dir.join(n).display()))
    };
    let p = "/var/lib/edge/provision";
    let id = "/var/lib/edge/identity";
    let core_toml = format!(
        "{extra}[core]\nservers = [\"tls://10.0.2.100:4222\"]\nca = \"{p}/ca.pem\"\n\
         cert = \"{id}/site.pem\"\nkey = \"{id}/site-key.json\"\nbackoff_max_ms = 2000\n\
         [core.enroll]\ncert = \"{p}/enroll.pem\"\nkey = \"{p}/enroll.key\"\n\
         recovery_key = \"{id}/recovery-key\"\n"
    );
    let mut bundle = toml_string("fabricd-core.toml", &core_toml);
    for f in ["ca.pem", "enroll.pem", "enroll.key"] {
        bundle.push_str(&toml_string(f, &pem(f)?));
    }
    for (f, from) in [
        ("lan/server.pem", "lan-server.pem"),
        ("lan/server.key", "lan-server.key"),
        ("lan/clients-ca.pem", "ca.pem"),
    ] {
        bundle.push_str(&toml_string(f, &pem(from)?));
    }
    Ok(bundle)
}

/// A core ready for a scenario: the PKI made in `dir`, nats-server started with the access
/// configuration for site0, the link the guest dials, and `edgectl setup` done. The
/// core must outlive the test's use of the others (it stops when dropped).
pub fn start(dir: &Path) -> Result<(Core, Link, Operator)> {
    make_pki(dir)?;
    let edgectl = edgectl()?;
    let core = Core::start(dir, &edgectl)?;
    let link = Link::start(core.port)?;
    let op = Operator {
        edgectl,
        dir: dir.to_owned(),
        port: core.port,
    };
    run(op.cmd().arg("setup"))?;
    Ok((core, link, op))
}
