//! A TPM emulator for tests: swtpm in socket mode on loopback, its state in a temporary
//! directory, killed when dropped. Shared by edge-tpm's tests and fabricd's (which
//! include this file by path).

#[path = "manufacture.rs"]
mod manufacture;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Swtpm {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port_pair() -> u16 {
    loop {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < 65535 && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

pub fn swtpm() -> Swtpm {
    swtpm_on(tempfile::tempdir().unwrap())
}

pub fn swtpm_on(dir: tempfile::TempDir) -> Swtpm {
    let port = free_port_pair();
    let child = Command::new("swtpm")
        .args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
        .arg("--tpmstate")
        .arg(format!("dir={}", dir.path().display()))
        .args([
            "--server",
            &format!("type=tcp,bindaddr=127.0.0.1,port={port}"),
        ])
        .args([
            "--ctrl",
            &format!("type=tcp,bindaddr=127.0.0.1,port={}", port + 1),
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("swtpm must be installed (cargo xtask test installs it)");
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "swtpm did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Swtpm {
        child,
        port,
        _dir: dir,
    }
}

/// A TPM "from the factory" of the manufacturer whose CA lives in `ca` (see
/// `manufacture`), started.
pub fn manufactured(ca: &Path) -> Swtpm {
    let state = tempfile::tempdir().unwrap();
    manufacture::manufacture(state.path(), ca).unwrap();
    swtpm_on(state)
}
