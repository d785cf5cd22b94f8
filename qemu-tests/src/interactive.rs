//! `cargo xtask run`: the appliance with its serial console on this terminal.

use crate::machine::{ConsoleMode, Machine, Options};
use anyhow::Result;
use std::path::Path;
use std::process::ExitStatus;

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Ctrl-C reaches QEMU and us alike (same foreground process group). QEMU exits on it;
/// we must live on to kill swtpm and delete the temp dir. A handler, not SIG_IGN: a
/// handler is reset to the default in children on exec, so QEMU still gets the signal.
fn survive_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installs a handler that does nothing, which is async-signal-safe.
        unsafe {
            libc::signal(sig, ignore_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Boots `image` on a disposable disk with the console attached to this terminal, with
/// the machine's options as `customize` leaves them; returns when QEMU exits (guest
/// power-off, Ctrl-C, or Ctrl-A x).
pub fn run(image: &Path, customize: impl FnOnce(&mut Options)) -> Result<ExitStatus> {
    survive_interrupts();
    let mut opts = Options::new(image);
    opts.console = ConsoleMode::Terminal;
    // storaged's pool: a second, empty NVMe disk, as on the edge boxes it targets.
    opts.pool_disk_mib = Some(2048);
    customize(&mut opts);
    let mut m = Machine::with_options("run", opts)?;
    eprintln!(
        "edgeos: booting {} (TCG; Ctrl-C or Ctrl-A x quits, Ctrl-A c for the QEMU monitor)",
        image.display()
    );
    eprintln!(
        "edgeos: control port: socat - UNIX-CONNECT:{}/ctl.sock",
        m.dir().display()
    );
    m.boot()?;
    let status = m.wait_interactive()?;
    m.finish();
    Ok(status)
}
