//! Stage 2, PID 1 on the root for the life of the system: mounts and identity, modules,
//! network, watchdog, the service supervisor, the control port, the `ready` line and the
//! blessing of the boot, and the orderly end (docs/boot.md, "Stage 2").

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::control::{self, Control, Request};
use crate::power::{self, Action, Buttons};
use crate::say;
use crate::status::Boot;
use crate::supervisor::{Note, Options, Supervisor};
use crate::watchdog::Watchdog;

const SYSTEM_TOML: &str = "/etc/edge/system.toml";
const SERVICES_TOML: &str = "/etc/edge/services.toml";
const MODULE_LIST: &str = "/etc/edge/modules";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const CONTROL_SOCKET: &str = "/run/edge/init.sock";
const PORT_NAME: &str = "org.edgeos.control";
const DATA: &str = "/var";
const RESOLV: &str = "/run/resolv.conf";

pub fn run() -> ! {
    let signals = block_signals();
    mount_basics();
    let boot = boot_info();
    say!("stage 2: version {} slot {}", boot.version, boot.slot);
    let (system, problem) = crate::config::load(Path::new(SYSTEM_TOML));
    if let Some(p) = problem {
        say!("warning: {p}");
    }
    if let Err(e) = rustix::system::sethostname(system.hostname.as_bytes()) {
        say!(
            "failed to set hostname {}: {}",
            system.hostname,
            std::io::Error::from(e)
        );
    }
    load_modules();
    for line in crate::net::setup(&system.network, Path::new(RESOLV)) {
        say!("{line}");
    }
    let mut watchdog = match Watchdog::open(&system.watchdog.device, system.watchdog.timeout_s) {
        Ok(Some(w)) => {
            say!(
                "watchdog armed: {} s ({})",
                w.timeout_s,
                system.watchdog.device.display()
            );
            Some(w)
        }
        Ok(None) => {
            say!("no watchdog at {}", system.watchdog.device.display());
            None
        }
        Err(e) => {
            say!("warning: {e}");
            None
        }
    };

    let mut ctl = Control::new();
    if let Err(e) = ctl.listen(Path::new(CONTROL_SOCKET)) {
        say!("warning: {e}");
    }
    open_port(&mut ctl);
    let mut buttons = Buttons::default();
    scan_buttons(&mut buttons);

    let table = crate::services::load(Path::new(SERVICES_TOML));
    let log_dir = system.logs.dir.clone();
    let logs_ok = std::fs::create_dir_all(&log_dir).is_ok();
    if !logs_ok {
        say!(
            "warning: cannot create {}; service logs go nowhere",
            log_dir.display()
        );
    }
    let mut sup = Supervisor::new(
        table.services,
        Options {
            log_dir: logs_ok.then_some(log_dir),
            log_max_bytes: system.logs.max_bytes,
            cgroup_root: Path::new(CGROUP_ROOT)
                .join("cgroup.controllers")
                .exists()
                .then(|| PathBuf::from(CGROUP_ROOT)),
            reap_any: true,
        },
    );
    for p in &table.problems {
        sup.warn(format!("service table: {p}"));
    }

    let mut data_full = false;
    let mut last_space_check: Option<Instant> = None;
    let mut last_port_scan = Instant::now();
    let mut ready = false;
    let mut shutdown: Option<Action> = None;
    let min_free = system.logs.min_free_mib.saturating_mul(1 << 20);

    loop {
        wait(&signals, &sup, &ctl, &buttons);
        if let Some(w) = &mut watchdog {
            w.tick();
        }
        let mut requested = read_signals(&signals);
        if buttons.pressed() {
            say!("power button pressed");
            requested = requested.or(Some(Action::Poweroff));
        }

        if shutdown.is_none() {
            sup.step();
        }
        deliver(&mut sup, &mut ctl);

        // Control requests are answered against the current state.
        let mut asked: Option<Action> = None;
        ctl.step(&mut |req| {
            let name = req.name();
            match req {
                Request::Status => {
                    let st = crate::status::build(&boot, ready, data_full, sup.status());
                    json!({"reply": "status", "ok": true, "status": st})
                }
                Request::Kill { service, signal } => match sup.kill(&service, signal) {
                    Ok(()) => control::ok_reply(name),
                    Err(e) => control::error_reply(name, &e),
                },
                Request::Restart { service } => match sup.restart(&service) {
                    Ok(()) => control::ok_reply(name),
                    Err(e) => control::error_reply(name, &e),
                },
                Request::Poweroff => {
                    asked = Some(Action::Poweroff);
                    control::ok_reply(name)
                }
                Request::Reboot => {
                    asked = Some(Action::Reboot);
                    control::ok_reply(name)
                }
            }
        });
        deliver(&mut sup, &mut ctl);
        let requested = requested.or(asked);

        if shutdown.is_none() {
            if let Some(action) = requested {
                say!("shutdown requested: {}", action.as_str());
                ctl.event(&json!({"event": "shutdown", "action": action.as_str()}));
                sup.begin_shutdown();
                shutdown = Some(action);
            }
        }

        if let Some(action) = shutdown {
            if sup.shutdown_step() {
                deliver(&mut sup, &mut ctl);
                // Logs live on /var, which is about to be unmounted.
                sup.logs.close_all();
                let mut pet = || {
                    if let Some(w) = &mut watchdog {
                        w.pet();
                    }
                };
                power::finish(action, &mut pet);
            }
            deliver(&mut sup, &mut ctl);
            continue;
        }

        if last_space_check.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            last_space_check = Some(Instant::now());
            if let Some(full) = crate::logs::is_full(Path::new(DATA), min_free) {
                if full && !data_full {
                    sup.warn(format!(
                        "data partition full: less than {} MiB free on {DATA}",
                        system.logs.min_free_mib
                    ));
                } else if !full && data_full {
                    sup.logs.clear_full();
                    say!("data partition has free space again");
                }
                data_full = full;
            }
        }

        if last_port_scan.elapsed() >= Duration::from_secs(2) {
            last_port_scan = Instant::now();
            if !ctl.has_port() {
                open_port(&mut ctl);
            }
            if buttons.is_empty() {
                scan_buttons(&mut buttons);
            }
        }

        if !ready && sup.settled() {
            ready = true;
            let ms = crate::logs::uptime().as_millis() as u64;
            say!(
                "ready version={} slot={} uptime_ms={ms}",
                boot.version,
                boot.slot
            );
            ctl.event(
                &json!({"event": "ready", "version": boot.version, "slot": boot.slot,
                              "uptime_ms": ms}),
            );
            let failed = sup.failed();
            if failed.is_empty() {
                if let Err(e) = bless(&boot) {
                    sup.warn(format!("failed to bless the boot: {e}"));
                }
            } else {
                sup.warn(format!(
                    "boot not blessed: failed services: {}",
                    failed.join(", ")
                ));
            }
            deliver(&mut sup, &mut ctl);
        }
    }
}

/// Sends the supervisor's lines to the console and its events to the port.
fn deliver(sup: &mut Supervisor, ctl: &mut Control) {
    for n in sup.take_notes() {
        match n {
            Note::Console(line) => say!("{line}"),
            Note::Event(ev) => ctl.event(&ev),
        }
    }
}

/// The signals PID 1 handles go through a signalfd, so they are ordinary loop input.
/// ctrl-alt-del is turned into SIGINT for us instead of an immediate reboot.
fn block_signals() -> Option<OwnedFd> {
    // SAFETY: sigset and signalfd calls on values we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [
            libc::SIGCHLD,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGPWR,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGHUP,
        ] {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let _ = rustix::system::reboot(rustix::system::RebootCommand::CadOff);
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            say!(
                "warning: signalfd failed: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        Some(OwnedFd::from_raw_fd(fd))
    }
}

/// Drains the signalfd. SIGCHLD needs no action here: the supervisor reaps every step.
fn read_signals(fd: &Option<OwnedFd>) -> Option<Action> {
    let fd = fd.as_ref()?;
    let mut action = None;
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    loop {
        // SAFETY: reads at most one siginfo into the struct we own.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n != size as isize {
            break;
        }
        let sig = info.ssi_signo as i32;
        // busybox's convention: SIGTERM and ctrl-alt-del reboot, SIGPWR/SIGUSR2 power off.
        let a = match sig {
            libc::SIGTERM | libc::SIGINT => Some(Action::Reboot),
            libc::SIGPWR | libc::SIGUSR2 => Some(Action::Poweroff),
            _ => None,
        };
        if let Some(a) = a {
            say!("signal {sig} received");
            action = action.or(Some(a));
        }
    }
    action
}

/// Sleeps until input or 100 ms (timers: readiness probes, backoff, watchdog).
fn wait(signals: &Option<OwnedFd>, sup: &Supervisor, ctl: &Control, buttons: &Buttons) {
    let mut fds: Vec<libc::pollfd> = Vec::new();
    let mut add = |fd: RawFd, write: bool| {
        fds.push(libc::pollfd {
            fd,
            events: libc::POLLIN | if write { libc::POLLOUT } else { 0 },
            revents: 0,
        })
    };
    if let Some(s) = signals {
        add(s.as_raw_fd(), false);
    }
    for fd in sup.poll_fds() {
        add(fd, false);
    }
    for (fd, w) in ctl.poll_fds() {
        add(fd, w);
    }
    for fd in buttons.poll_fds() {
        add(fd, false);
    }
    // SAFETY: poll on our array of pollfds.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
}

fn mount_basics() {
    for p in crate::cgroups::setup(Path::new(CGROUP_ROOT)) {
        say!("warning: {p}");
    }
    let is_mounted = |p: &str| {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(p))
    };
    if !is_mounted("/tmp") {
        if let Err(e) = rustix::mount::mount(
            "tmpfs",
            "/tmp",
            "tmpfs",
            rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV,
            c"mode=1777",
        ) {
            say!("warning: failed to mount /tmp: {}", std::io::Error::from(e));
        }
    }
    let _ = std::fs::create_dir_all("/run/edge");
}

/// Slot and version from stage 1's /run/edge/boot.json, else from the command line.
fn boot_info() -> Boot {
    if let Ok(text) = std::fs::read_to_string("/run/edge/boot.json") {
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            let b = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
            if !s("slot").is_empty() {
                return Boot {
                    slot: s("slot"),
                    version: s("version"),
                    data_formatted: b("data_formatted"),
                    data_clean: v.get("data_clean").and_then(Value::as_bool).unwrap_or(true),
                };
            }
        }
        say!("warning: /run/edge/boot.json is unreadable; using the kernel command line");
    }
    match crate::cmdline::read() {
        Ok(p) => Boot {
            slot: p.slot,
            version: p.version,
            data_formatted: false,
            data_clean: true,
        },
        Err(e) => {
            say!("warning: {e}");
            Boot {
                slot: "?".into(),
                version: "?".into(),
                data_formatted: false,
                data_clean: true,
            }
        }
    }
}

fn load_modules() {
    let dir = crate::modules::running_kernel_dir();
    for p in crate::modules::load_list(Path::new(MODULE_LIST), &dir) {
        say!("warning: {p}");
    }
}

fn open_port(ctl: &mut Control) {
    if let Some(p) = control::find_port(
        Path::new("/sys/class/virtio-ports"),
        Path::new("/dev"),
        PORT_NAME,
    ) {
        match ctl.open_port(&p) {
            Ok(()) => say!("control port {}", p.display()),
            Err(e) => say!("warning: {e}"),
        }
    }
}

fn scan_buttons(b: &mut Buttons) {
    for n in b.scan(Path::new("/sys/class/input"), Path::new("/dev/input")) {
        say!("power button: /dev/input/{n}");
    }
}

/// `edgeos-<v>-<s>+<left>[-<done>].efi` -> `edgeos-<v>-<s>.efi`; `None` for other names.
pub fn blessed_name(file: &str, version: &str, slot: &str) -> Option<String> {
    let stem = format!("edgeos-{version}-{slot}");
    let counter = file
        .strip_prefix(&stem)?
        .strip_prefix('+')?
        .strip_suffix(".efi")?;
    let (left, done) = counter.split_once('-').unwrap_or((counter, "0"));
    if left.is_empty()
        || !left.bytes().all(|b| b.is_ascii_digit())
        || !done.bytes().all(|b| b.is_ascii_digit())
        || done.is_empty()
    {
        return None;
    }
    Some(format!("{stem}.efi"))
}

/// Marks this boot good for systemd-boot's boot counting: the booted UKI loses its
/// `+left-done` counter. The ESP is mounted only for this.
fn bless(boot: &Boot) -> Result<(), String> {
    let devs = crate::disk::scan(Path::new("/sys/class/block"));
    let esp = crate::disk::find_labels(&devs, &["esp"])
        .remove("esp")
        .cloned()
        .ok_or("no partition labelled esp")?;
    let node = crate::disk::ensure_node(&esp, Path::new("/dev"))?;
    let _ = std::fs::create_dir_all("/efi");
    rustix::mount::mount(
        node.as_path(),
        "/efi",
        "vfat",
        rustix::mount::MountFlags::NOSUID
            | rustix::mount::MountFlags::NODEV
            | rustix::mount::MountFlags::NOEXEC,
        None,
    )
    .map_err(|e| {
        format!(
            "failed to mount {} at /efi: {}",
            node.display(),
            std::io::Error::from(e)
        )
    })?;
    let result = (|| -> Result<String, String> {
        let dir = Path::new("/efi/EFI/Linux");
        let entries =
            std::fs::read_dir(dir).map_err(|e| format!("failed to list {}: {e}", dir.display()))?;
        let mut done = None;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(new) = blessed_name(&name, &boot.version, &boot.slot) {
                std::fs::rename(dir.join(&name), dir.join(&new))
                    .map_err(|e| format!("failed to rename {name} to {new}: {e}"))?;
                done = Some(format!("boot blessed: {name} -> {new}"));
                break;
            }
        }
        Ok(done.unwrap_or_else(|| {
            format!(
                "boot already blessed (edgeos-{}-{}.efi)",
                boot.version, boot.slot
            )
        }))
    })();
    rustix::fs::sync();
    if let Err(e) = rustix::mount::unmount("/efi", rustix::mount::UnmountFlags::empty()) {
        say!(
            "warning: failed to unmount /efi: {}",
            std::io::Error::from(e)
        );
    }
    let line = result?;
    say!("{line}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blessing_drops_the_boot_counter() {
        assert_eq!(
            blessed_name("edgeos-0.1.0-a+2-1.efi", "0.1.0", "a").as_deref(),
            Some("edgeos-0.1.0-a.efi")
        );
        assert_eq!(
            blessed_name("edgeos-0.1.0-a+3.efi", "0.1.0", "a").as_deref(),
            Some("edgeos-0.1.0-a.efi")
        );
        assert_eq!(
            blessed_name("edgeos-0.1.0-a.efi", "0.1.0", "a"),
            None,
            "already blessed"
        );
        assert_eq!(
            blessed_name("edgeos-0.1.0-b+3.efi", "0.1.0", "a"),
            None,
            "other slot"
        );
        assert_eq!(
            blessed_name("edgeos-0.2.0-a+3.efi", "0.1.0", "a"),
            None,
            "other version"
        );
    }
}
