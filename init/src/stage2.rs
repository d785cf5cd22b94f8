//! Stage 2, PID 1 on the root for the life of the system: mounts and identity, modules,
//! network, watchdog, the service supervisor, the control port, the `ready` line and the
//! blessing of the boot, and the orderly end (docs/boot.md, "Stage 2").

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

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

/// The life of PID 1 on the root: set the system up, then serve it until it is powered
/// off or rebooted.
pub fn run() -> ! {
    let mut system = System::start();
    loop {
        system.tick();
    }
}

/// Everything PID 1 keeps between two turns of its loop.
struct System {
    /// This boot's release is below the security floor: nothing runs, nothing is
    /// blessed.
    refused: bool,
    /// ... and the other slot has an entry to go to: reboot on the first turn.
    refused_reboot: bool,
    boot: Boot,
    config: crate::config::System,
    signals: Option<OwnedFd>,
    watchdog: Option<Watchdog>,
    ctl: Control,
    buttons: Buttons,
    sup: Supervisor,
    ready: bool,
    /// Settled with a service given up: said once, and the boot is not blessed.
    degraded: bool,
    data_full: bool,
    shutdown: Option<Action>,
    last_space_check: Option<Instant>,
    last_device_scan: Instant,
    /// When init's metrics file was last written (metrics.rs).
    last_metrics: Option<Instant>,
    /// Updates: the trial of a new slot, and installs (none while /var is locked).
    updater: Option<crate::update::Updater>,
    /// The box's health as the status and the core hear it (health.rs).
    health: crate::health::Watch,
}

impl System {
    /// Mounts, identity, modules, network, watchdog, control, then the services.
    fn start() -> System {
        let mut laps = Laps::new();
        let signals = block_signals();
        mount_basics();
        let mut boot = boot_info();
        say!("stage 2: version {} slot {}", boot.version, boot.slot);
        laps.lap("mounts");
        measure_phase("sysinit");
        laps.lap("tpm");
        let config = load_config();
        load_modules();
        laps.lap("modules");
        let provisioning = Path::new(crate::provision::FW_CFG_ITEM);
        measure_provisioning(provisioning);
        for line in crate::provision::apply(provisioning, Path::new(crate::provision::DIR)).lines {
            say!("{line}");
        }
        if boot.data_locked.is_none() {
            provision_from_esp();
        }
        laps.lap("provisioning");
        for line in crate::net::setup(&config.network, Path::new(RESOLV)) {
            say!("{line}");
        }
        laps.lap("network");
        let watchdog = arm_watchdog(&config.watchdog);
        laps.lap("watchdog");
        let previous_boot = crate::health::previous_boot(
            &boot,
            watchdog.as_ref().is_some_and(|w| w.reset_the_last_boot),
        );
        say!("previous boot: {previous_boot}");
        let mut ctl = Control::new();
        if let Err(e) = ctl.listen(Path::new(CONTROL_SOCKET)) {
            say!("warning: {e}");
        }
        open_port(&mut ctl);
        let mut buttons = Buttons::default();
        scan_buttons(&mut buttons);
        let running = crate::update::Running {
            version: boot.version.clone(),
            slot: boot.slot.clone(),
            security_version: crate::cmdline::read()
                .map(|p| crate::update::security_version_of(&p.extra))
                .unwrap_or(1),
        };
        // A release below the box's security floor (an old slot booted anyway) runs
        // nothing: docs/update.md, "Anti-rollback at boot".
        let refused = boot
            .data_locked
            .is_none()
            .then(|| crate::update::refuse_below_floor(&running))
            .flatten();
        laps.lap("control");
        boot.services_start_ms = Some(crate::logs::uptime().as_millis() as u64);
        say!("stage 2: set up in {}; starting the services", laps);
        let sup = match (&boot.data_locked, &refused) {
            (None, None) => start_services(&config.logs),
            (Some(why), _) => {
                // Every service keeps its state on /var: none can run without it. The
                // box stays up to say why, on the console and the control port.
                say!("locked: the services stay down: {why}");
                ctl.event(&serde_json::json!({"event": "locked", "reason": why}));
                locked_supervisor()
            }
            (None, Some((why, _))) => {
                say!("refused: {why}");
                ctl.event(&serde_json::json!({"event": "refused", "reason": why}));
                locked_supervisor()
            }
        };
        let updater = (boot.data_locked.is_none() && refused.is_none())
            .then(|| crate::update::Updater::start(config.update.clone(), running));
        System {
            updater,
            refused_reboot: refused.as_ref().is_some_and(|(_, reboot)| *reboot),
            refused: refused.is_some(),
            boot,
            config,
            signals,
            watchdog,
            ctl,
            buttons,
            sup,
            ready: false,
            degraded: false,
            data_full: false,
            shutdown: None,
            last_space_check: None,
            last_device_scan: Instant::now(),
            last_metrics: None,
            health: crate::health::Watch::new(previous_boot),
        }
    }

    /// One turn: wait for input or a timer, pet the watchdog, move the services on,
    /// answer requests, and either go on toward shutdown or look after the running system.
    fn tick(&mut self) {
        wait(&self.signals, &self.sup, &self.ctl, &self.buttons);
        if let Some(w) = &mut self.watchdog {
            w.tick();
        }
        let mut requested = read_signals(&self.signals);
        if self.buttons.pressed() {
            say!("power button pressed");
            requested = requested.or(Some(Action::Poweroff));
        }
        if self.shutdown.is_none() {
            self.sup.step();
        }
        deliver(&mut self.sup, &mut self.ctl);
        let asked = self.answer_requests();
        deliver(&mut self.sup, &mut self.ctl);

        let refused = std::mem::take(&mut self.refused_reboot).then_some(Action::Reboot);
        if let Some(action) = self.shutdown.or(requested.or(asked)).or(refused) {
            self.shut_down(action);
            return;
        }
        if self.boot.data_locked.is_none() {
            self.check_data_space();
        }
        self.rescan_devices();
        self.write_metrics();
        for w in self
            .health
            .look(&self.boot.slot, &self.config.network.listeners)
        {
            self.sup.warn(w);
        }
        if !self.ready && self.boot.data_locked.is_none() && !self.refused && self.sup.settled() {
            self.settle();
        }
        let now = crate::update::unix_ms();
        if let Some(e) = self.health.tell(self.ready, self.sup.failed(), now) {
            self.sup.warn(e);
        }
        if let Some(updater) = &mut self.updater {
            let health = crate::update::Health {
                ready: self.ready,
                given_up: if self.degraded {
                    self.sup.failed()
                } else {
                    Vec::new()
                },
                unhealthy: self.sup.unhealthy(),
            };
            if let Some(action) = updater.step(&health) {
                deliver(&mut self.sup, &mut self.ctl);
                self.shut_down(action);
            }
        }
    }

    /// Control requests are answered against the current state; a power request is
    /// returned to the loop.
    fn answer_requests(&mut self) -> Option<Action> {
        let mut asked = None;
        let (boot, ready, data_full, sup) = (&self.boot, self.ready, self.data_full, &mut self.sup);
        let (updater, health) = (&self.updater, &self.health);
        let watchdog_s = self.watchdog.as_ref().map(|w| w.timeout_s);
        let mut hang = false;
        self.ctl.step(&mut |req| {
            let name = req.name();
            // The control protocol answers with the refusal in words.
            let done = |r: crate::error::Result<()>| match r {
                Ok(()) => control::ok_reply(name),
                Err(e) => control::error_reply(name, &e.to_string()),
            };
            match req {
                Request::Status => {
                    let mut st = crate::status::build(
                        boot,
                        ready,
                        data_full,
                        sup.logs.dropped(),
                        sup.status(),
                    );
                    if let Some(obj) = st.as_object_mut() {
                        health.status_fields(obj);
                        if let Some(u) = updater {
                            obj.insert("update".into(), u.status());
                        }
                    }
                    json!({"reply": "status", "ok": true, "status": st})
                }
                Request::Measurements => json!({"reply": "measurements", "ok": true,
                    "measurements": crate::measurements::read()}),
                Request::Kill { service, signal } => done(sup.kill(&service, signal)),
                Request::Restart { service } => done(sup.restart(&service)),
                Request::Poweroff | Request::Reboot => {
                    asked = Some(if matches!(req, Request::Poweroff) {
                        Action::Poweroff
                    } else {
                        Action::Reboot
                    });
                    control::ok_reply(name)
                }
                Request::WatchdogTest => match watchdog_s {
                    Some(_) => {
                        hang = true;
                        control::ok_reply(name)
                    }
                    None => control::error_reply(
                        name,
                        "no watchdog is armed: nothing would reset the box",
                    ),
                },
            }
        });
        if let (true, Some(s)) = (hang, watchdog_s) {
            crate::watchdog::hang_for_the_test(&mut self.ctl, s);
        }
        asked
    }

    /// Stops the services in reverse order over several turns, then syncs, unmounts and
    /// powers off or reboots. The watchdog is petted to the end, so a hung stop is reset.
    fn shut_down(&mut self, action: Action) {
        if self.shutdown.is_none() {
            say!("shutdown requested: {}", action.as_str());
            self.ctl
                .event(&json!({"event": "shutdown", "action": action.as_str()}));
            self.sup.begin_shutdown();
            self.shutdown = Some(action);
        }
        if self.sup.shutdown_step() {
            deliver(&mut self.sup, &mut self.ctl);
            // Logs live on /var, which is about to be unmounted.
            self.sup.logs.close_all();
            let watchdog = &mut self.watchdog;
            let mut pet = || {
                if let Some(w) = watchdog {
                    w.pet();
                }
            };
            power::finish(action, &mut pet);
        }
        deliver(&mut self.sup, &mut self.ctl);
    }

    /// Every 10 s: is the data partition (nearly) full? Reported once each way; the
    /// services keep running and their log lines are dropped and counted meanwhile.
    fn check_data_space(&mut self) {
        if self
            .last_space_check
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            return;
        }
        self.last_space_check = Some(Instant::now());
        let min_free_mib = self.config.logs.min_free_mib;
        let Some(full) =
            crate::logs::is_full(Path::new(DATA), min_free_mib.saturating_mul(1 << 20))
        else {
            return;
        };
        if full && !self.data_full {
            self.sup.warn(format!(
                "data partition full: less than {min_free_mib} MiB free on {DATA}"
            ));
        } else if !full && self.data_full {
            self.sup.logs.clear_full();
            say!("data partition has free space again");
        }
        self.data_full = full;
    }

    /// Every 15 s: init's figures for fabricd's scrape (metrics.rs). A failure of the
    /// first write is said; the box runs on without them.
    fn write_metrics(&mut self) {
        if self
            .last_metrics
            .is_some_and(|t| t.elapsed() < crate::metrics::EVERY)
        {
            return;
        }
        let first = self.last_metrics.is_none();
        self.last_metrics = Some(Instant::now());
        let services = self.sup.status();
        let text = crate::metrics::render(&crate::metrics::Figures {
            boot: &self.boot,
            ready: self.ready,
            services: &services,
            log_lines_dropped: self.sup.logs.dropped(),
            data_full: self.data_full,
            watchdog: self
                .watchdog
                .as_ref()
                .map(|w| (w.timeout_s, w.reset_the_last_boot)),
        });
        if let Err(e) = crate::metrics::write(Path::new(crate::metrics::FILE), &text) {
            if first {
                self.sup
                    .warn(format!("failed to write {}: {e}", crate::metrics::FILE));
            }
        }
    }

    /// The control port and the power button may appear after start (module load order).
    fn rescan_devices(&mut self) {
        if self.last_device_scan.elapsed() < Duration::from_secs(2) {
            return;
        }
        self.last_device_scan = Instant::now();
        if !self.ctl.has_port() {
            open_port(&mut self.ctl);
        }
        if self.buttons.is_empty() {
            scan_buttons(&mut self.buttons);
        }
    }

    /// Every service has settled. All ready: the one `ready` line and the blessing of this
    /// boot. Some given up: the one `degraded` line naming them, and no blessing, so that
    /// boot counting can fall back to the other slot; should they be restarted and come
    /// up, the box is ready then.
    fn settle(&mut self) {
        let failed = self.sup.failed();
        let (version, slot) = (&self.boot.version, &self.boot.slot);
        let ms = crate::logs::uptime().as_millis() as u64;
        if failed.is_empty() {
            self.ready = true;
            say!("ready version={version} slot={slot} uptime_ms={ms}");
            measure_phase("ready");
            self.ctl.event(
                &json!({"event": "ready", "version": version, "slot": slot, "uptime_ms": ms}),
            );
            crate::esp::bless_in_background(&self.boot);
        } else if !self.degraded {
            self.degraded = true;
            say!(
                "degraded version={version} slot={slot} uptime_ms={ms} failed={}",
                failed.join(",")
            );
            self.ctl.event(
                &json!({"event": "degraded", "version": version, "slot": slot,
                                   "uptime_ms": ms, "failed": failed}),
            );
            self.sup
                .warn("boot not blessed: a service was given up".to_string());
        }
        deliver(&mut self.sup, &mut self.ctl);
    }
}

/// init's own configuration, the kernel command line's `edgeos.*` flags over system.toml;
/// a problem is reported and the defaults stand in.
fn load_config() -> crate::config::System {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (config, problems) = crate::config::load(Path::new(SYSTEM_TOML), &cmdline);
    for p in problems {
        say!("warning: {p}");
    }
    if let Err(e) = rustix::system::sethostname(config.hostname.as_bytes()) {
        say!(
            "failed to set hostname {}: {}",
            config.hostname,
            std::io::Error::from(e)
        );
    }
    config
}

fn arm_watchdog(cfg: &crate::config::Watchdog) -> Option<Watchdog> {
    if let Err(e) = crate::watchdog::keep_init_in_memory() {
        say!("warning: PID 1's pages are not locked in memory (a stalled disk can hold the loop): {e}");
    }
    match Watchdog::open(&cfg.device, cfg.timeout_s) {
        Ok(Some(w)) => {
            say!(
                "watchdog armed: {} s ({})",
                w.timeout_s,
                cfg.device.display()
            );
            Some(w)
        }
        Ok(None) => {
            say!("no watchdog at {}", cfg.device.display());
            None
        }
        Err(e) => {
            say!("warning: {e}");
            None
        }
    }
}

/// The service table, started under the supervisor; bad entries are reported and skipped.
fn start_services(logs: &crate::config::Logs) -> Supervisor {
    let table = crate::services::load(Path::new(SERVICES_TOML));
    let logs_ok = std::fs::create_dir_all(&logs.dir).is_ok();
    if !logs_ok {
        say!(
            "warning: cannot create {}; service logs go nowhere",
            logs.dir.display()
        );
    }
    let mut sup = Supervisor::new(
        table.services,
        Options {
            log_dir: logs_ok.then(|| logs.dir.clone()),
            log_max_bytes: logs.max_bytes,
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
    sup
}

/// A supervisor with no services, for a boot whose data partition stayed closed.
fn locked_supervisor() -> Supervisor {
    Supervisor::new(
        Vec::new(),
        Options {
            log_dir: None,
            log_max_bytes: 0,
            cgroup_root: None,
            reap_any: true,
        },
    )
}

/// Where stage 2's set-up before the services goes, said on the console (the boot
/// bench's breakdown reads when the services started from the status).
struct Laps {
    last: Instant,
    laps: Vec<(&'static str, Duration)>,
}

impl Laps {
    fn new() -> Laps {
        Laps {
            last: Instant::now(),
            laps: Vec::new(),
        }
    }

    /// Ends the step called `what`.
    fn lap(&mut self, what: &'static str) {
        let now = Instant::now();
        self.laps.push((what, now - self.last));
        self.last = now;
    }

    fn total_ms(&self) -> u64 {
        self.laps
            .iter()
            .map(|(_, d)| *d)
            .sum::<Duration>()
            .as_millis() as u64
    }
}

impl std::fmt::Display for Laps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ms (", self.total_ms())?;
        for (i, (what, d)) in self.laps.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{what} {}", d.as_millis())?;
        }
        write!(f, ")")
    }
}

/// Extends PCR 11 with a stage-2 boot phase, as systemd-pcrphase would; a box without a
/// TPM says so and boots on.
fn measure_phase(word: &str) {
    match crate::sealed_data::phase(None, word) {
        Ok(pcr11) => say!("tpm: PCR 11 after {word}: {pcr11}"),
        Err(e) => say!("tpm: {word} not measured: {e}"),
    }
}

/// Measures the provisioning item, as it is before anything reads it, into the TPM
/// (docs/security.md, "What is measured"); nothing when there is none.
fn measure_provisioning(item: &Path) {
    // Unreadable or too large: not measured, and `apply` refuses it with the reason.
    let Ok(Some(bytes)) = crate::provision::read(item) else {
        return;
    };
    let event = format!("edgeos provisioning: {}", item.display());
    match crate::sealed_data::measure_provisioning(&event, &bytes) {
        Ok(pcr) => say!("tpm: provisioning ({} bytes) measured: {pcr}", bytes.len()),
        Err(e) => say!("tpm: provisioning not measured: {e}"),
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
        // SIGTERM stops the box like the power button does; ctrl-alt-del (SIGINT)
        // reboots it.
        let a = match sig {
            libc::SIGINT => Some(Action::Reboot),
            libc::SIGTERM | libc::SIGPWR | libc::SIGUSR2 => Some(Action::Poweroff),
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
    // The firmware's TPM event log is read from securityfs (`measurements`).
    if let Err(e) = rustix::mount::mount(
        "securityfs",
        crate::measurements::SECURITYFS,
        "securityfs",
        rustix::mount::MountFlags::NOSUID
            | rustix::mount::MountFlags::NODEV
            | rustix::mount::MountFlags::NOEXEC,
        c"",
    ) {
        say!(
            "warning: failed to mount securityfs: {}",
            std::io::Error::from(e)
        );
    }
}

/// Slot and version from stage 1's /run/edge/boot.json, else from the command line.
fn boot_info() -> Boot {
    if let Ok(text) = std::fs::read_to_string("/run/edge/boot.json") {
        match serde_json::from_str::<Boot>(&text) {
            Ok(b) if !b.slot.is_empty() => return b,
            _ => {}
        }
        say!("warning: /run/edge/boot.json is unreadable; using the kernel command line");
    }
    match crate::cmdline::read() {
        Ok(p) => Boot {
            slot: p.slot,
            version: p.version,
            data_formatted: false,
            data_clean: true,
            ..Boot::default()
        },
        Err(e) => {
            say!("warning: {e}");
            Boot {
                slot: "?".into(),
                version: "?".into(),
                data_formatted: false,
                data_clean: true,
                ..Boot::default()
            }
        }
    }
}

fn load_modules() {
    let dir = edge_kmod::running_kernel_dir();
    for p in edge_kmod::load_list(Path::new(MODULE_LIST), &dir) {
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

/// Site provisioning from the ESP (`provision::ESP_FILE`), for boxes without fw_cfg:
/// measured, unpacked onto the data partition, then removed from the ESP once every
/// file of it has landed, so that its secrets do not stay on the unencrypted ESP. Only
/// with the data partition open: a locked box leaves the file where it is.
fn provision_from_esp() {
    let result = crate::esp::with_esp(|esp| {
        let file = esp.join(crate::provision::ESP_FILE);
        if !file.exists() {
            return;
        }
        measure_provisioning(&file);
        let applied = crate::provision::apply(&file, Path::new(crate::provision::DIR));
        for line in &applied.lines {
            say!("{line}");
        }
        if !applied.complete {
            say!(
                "provisioning: {} left on the ESP (not every file of it was written)",
                crate::provision::ESP_FILE
            );
            return;
        }
        match std::fs::remove_file(&file) {
            Ok(()) => {
                if let Some(dir) = file.parent() {
                    let _ = std::fs::remove_dir(dir);
                }
                say!(
                    "provisioning: {} removed from the ESP; its files live on the encrypted data partition",
                    crate::provision::ESP_FILE
                );
            }
            Err(e) => say!(
                "warning: failed to remove {} from the ESP: {e}; its secrets are still there",
                file.display()
            ),
        }
    });
    if let Err(e) = result {
        say!("warning: provisioning from the ESP: {e}");
    }
}
