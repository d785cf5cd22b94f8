//! A TPM emulator for tests: swtpm in socket mode on loopback, its state in a temporary
//! directory, killed when dropped. Shared by edge-tpm's tests and fabricd's (which
//! include this file by path).

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

/// A TPM "from the factory" of the manufacturer whose CA lives in `ca` (swtpm_localca's
/// state directory, made on first use): swtpm_setup makes its endorsement keys and writes
/// their certificates, signed by that CA, into the TPM's NV.
pub fn manufactured(ca: &Path) -> Swtpm {
    let state = tempfile::tempdir().unwrap();
    let conf = state.path().join("localca.conf");
    std::fs::write(
        &conf,
        format!(
            "statedir = {0}\nsigningkey = {0}/signkey.pem\nissuercert = {0}/issuercert.pem\ncertserial = {0}/certserial\n",
            ca.display()
        ),
    )
    .unwrap();
    let setup = state.path().join("setup.conf");
    std::fs::write(
        &setup,
        format!(
            "create_certs_tool = swtpm_localca\ncreate_certs_tool_config = {}\nactive_pcr_banks = sha256\n",
            conf.display()
        ),
    )
    .unwrap();
    let out = Command::new("swtpm_setup")
        .args(["--tpm2", "--create-ek-cert", "--overwrite", "--tpmstate"])
        .arg(state.path())
        .arg("--config")
        .arg(&setup)
        .output()
        .expect("swtpm_setup must be installed (swtpm-tools; cargo xtask test installs it)");
    assert!(
        out.status.success(),
        "swtpm_setup: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    swtpm_on(state)
}
