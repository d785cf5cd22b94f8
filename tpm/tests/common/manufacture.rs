//! A TPM "from the factory": swtpm_setup makes the endorsement keys in a TPM state
//! directory and writes their certificates, signed by a manufacturer's CA (swtpm_localca,
//! its state in `ca`, made on first use), into the TPM's NV, as a TPM maker does. Shared
//! by edge-tpm's and fabricd's tests and the QEMU harness (which include it by path).

use std::path::Path;
use std::process::Command;

/// Manufactures the TPM whose state directory is `state` (swtpm's `--tpmstate dir=`).
/// The manufacturer's root and issuing CA certificates are then in `ca`
/// (`swtpm-localca-rootca-cert.pem`, `issuercert.pem`).
pub fn manufacture(state: &Path, ca: &Path) -> Result<(), String> {
    let write = |path: &Path, text: String| {
        std::fs::write(path, text).map_err(|e| format!("failed to write {}: {e}", path.display()))
    };
    std::fs::create_dir_all(state)
        .and_then(|()| std::fs::create_dir_all(ca))
        .map_err(|e| {
            format!(
                "failed to make {} or {}: {e}",
                state.display(),
                ca.display()
            )
        })?;
    let conf = state.join("localca.conf");
    write(
        &conf,
        format!(
            "statedir = {0}\nsigningkey = {0}/signkey.pem\nissuercert = {0}/issuercert.pem\ncertserial = {0}/certserial\n",
            ca.display()
        ),
    )?;
    let setup = state.join("setup.conf");
    write(
        &setup,
        format!(
            "create_certs_tool = swtpm_localca\ncreate_certs_tool_config = {}\nactive_pcr_banks = sha256\n",
            conf.display()
        ),
    )?;
    let out = Command::new("swtpm_setup")
        .args(["--tpm2", "--create-ek-cert", "--overwrite", "--tpmstate"])
        .arg(state)
        .arg("--config")
        .arg(&setup)
        .output()
        .map_err(|e| {
            format!("failed to run swtpm_setup (swtpm-tools; cargo xtask test installs it): {e}")
        })?;
    if !out.status.success() {
        return Err(format!(
            "swtpm_setup: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}
