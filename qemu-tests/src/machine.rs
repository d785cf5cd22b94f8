//! One virtual appliance: its temp dir, disposable disk, firmware variables, TPM and the
//! QEMU process, plus the ways a test talks to it (console, control port, QMP).

use crate::console::ConsoleLog;
use crate::control::{Control, Events};
use crate::disk;
use crate::gpt::Partition;
use crate::process::Group;

#[path = "../../tpm/tests/common/manufacture.rs"]
mod manufacture;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// How long a boot may take to reach the ready line under TCG (observed: well under a
/// minute; the margin is for a loaded 2-core host running two machines).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Console lines that mean this boot will not reach ready.
pub const BOOT_FAILURES: &[&str] = &[
    "edgeos: degraded",
    "edgeos: data: locked",
    "edgeos: stage 1 failed",
    "edgeos: stage 2 failed",
    "Kernel panic",
];
/// How long the guest may take to answer one control request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long starting swtpm or QEMU may take before their sockets exist.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the serial console goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleMode {
    /// Appended to `console.log` in the machine's directory (tests, benchmarks).
    File,
    /// This terminal, in and out (`cargo xtask run`).
    Terminal,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub image: PathBuf,
    pub cpus: u32,
    pub memory_mib: u32,
    pub console: ConsoleMode,
    /// Use KVM instead of TCG. Off unless EDGEOS_KVM=1: KVM hangs on the build hosts.
    pub kvm: bool,
    /// Attach a TPM (swtpm). The harness's own firmware-only check turns it off.
    pub tpm: bool,
    /// The TPM comes from the factory of the manufacturer whose CA (swtpm_localca's
    /// state) is in this directory: endorsement keys and their certificates are made
    /// before the first boot, as enrollment needs. Without it, a blank TPM.
    pub tpm_manufacturer: Option<PathBuf>,
    /// User-net port forwards from the host's loopback into the guest:
    /// (host port, guest port), `hostfwd=tcp:127.0.0.1:<host>-:<guest>`.
    pub hostfwd: Vec<(u16, u16)>,
    /// User-net guest forwards, each the text after `guestfwd=`, e.g.
    /// `tcp:10.0.2.100:4222-cmd:socat - TCP:127.0.0.1:4222` (no commas).
    pub guestfwd: Vec<String>,
    /// fw_cfg items: (name, host file), e.g. `opt/org.edgeos/provision`.
    pub fw_cfg: Vec<(String, PathBuf)>,
    /// A second, empty NVMe disk of this many MiB (the guest's `nvme1n1`): storaged's
    /// pool. It lives as long as the machine, across reboots.
    pub pool_disk_mib: Option<u64>,
}

impl Options {
    /// The appliance as shipped: 2 vCPUs, 2 GiB, TPM, console to a file.
    pub fn new(image: &Path) -> Options {
        Options {
            image: image.to_path_buf(),
            cpus: 2,
            memory_mib: 2048,
            console: ConsoleMode::File,
            kvm: std::env::var("EDGEOS_KVM").as_deref() == Ok("1"),
            tpm: true,
            tpm_manufacturer: None,
            hostfwd: Vec::new(),
            guestfwd: Vec::new(),
            fw_cfg: Vec::new(),
            pool_disk_mib: None,
        }
    }
}

/// The image under test, from `EDGEOS_IMAGE` (set by `cargo xtask test`).
pub fn image_from_env() -> Result<PathBuf> {
    let image = std::env::var_os("EDGEOS_IMAGE").ok_or_else(|| {
        anyhow!(
            "EDGEOS_IMAGE is not set: run the system tests with `cargo xtask test` \
             (it builds the image and points EDGEOS_IMAGE at it)"
        )
    })?;
    let image = PathBuf::from(image);
    if !image.is_file() {
        bail!(
            "EDGEOS_IMAGE={} does not exist: run `cargo xtask test` to build it",
            image.display()
        );
    }
    Ok(image)
}

/// The fields of `edgeos: ready version=.. slot=.. uptime_ms=..`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    pub version: String,
    pub slot: String,
    pub uptime_ms: u64,
}

pub fn parse_ready(line: &str) -> Result<Ready> {
    let rest = line
        .split_once("edgeos: ready")
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("not a ready line: {line:?}"))?;
    let field = |k: &str| {
        rest.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .map(str::to_string)
            .ok_or_else(|| anyhow!("ready line {line:?} has no {k}="))
    };
    Ok(Ready {
        version: field("version")?,
        slot: field("slot")?,
        uptime_ms: field("uptime_ms")?
            .parse()
            .with_context(|| format!("uptime_ms in {line:?} is not a number"))?,
    })
}

pub struct Machine {
    name: String,
    opts: Options,
    /// None once the directory was deleted or handed over for keeping.
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    disk: PathBuf,
    swtpm: Option<Group>,
    qemu: Option<Group>,
    control: Option<Control>,
    events: Events,
    console: ConsoleLog,
    started: Option<Instant>,
    boots: u32,
    finished: bool,
}

impl Machine {
    /// A machine on a disposable copy of the image named by `EDGEOS_IMAGE`. Not started.
    pub fn new(name: &str) -> Result<Machine> {
        Machine::with_options(name, Options::new(&image_from_env()?))
    }

    pub fn with_options(name: &str, opts: Options) -> Result<Machine> {
        // Short prefix: the unix sockets inside must fit in 108 bytes.
        let short: String = name.chars().take(24).collect();
        let dir = tempfile::Builder::new()
            .prefix(&format!("edgeos-{short}-"))
            .tempdir()
            .context("failed to create the machine's temp dir")?;
        let path = dir.path().to_path_buf();
        let disk_path = path.join("disk.qcow2");
        disk::create_overlay(&opts.image, &disk_path)?;
        if let Some(mib) = opts.pool_disk_mib {
            disk::create_empty(&path.join("pool.qcow2"), mib)?;
        }
        std::fs::copy(OVMF_VARS, path.join("OVMF_VARS.fd"))
            .with_context(|| format!("failed to copy {OVMF_VARS} (is ovmf installed?)"))?;
        std::fs::create_dir(path.join("tpm")).context("failed to create tpm state dir")?;
        Ok(Machine {
            name: name.to_string(),
            console: ConsoleLog::new(&path.join("console.log")),
            opts,
            dir: Some(dir),
            disk: disk_path,
            path,
            swtpm: None,
            qemu: None,
            control: None,
            events: Events::default(),
            started: None,
            boots: 0,
            finished: false,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// Plugs the TPM in or out for the next boot (its state is kept either way).
    pub fn set_tpm(&mut self, attached: bool) {
        self.opts.tpm = attached;
    }

    /// The machine's own disk (a qcow2 overlay of the image).
    pub fn disk(&self) -> &Path {
        &self.disk
    }

    pub fn console_log(&self) -> &Path {
        self.console.path()
    }

    /// Time since QEMU was started for the current boot.
    pub fn since_start(&self) -> Duration {
        self.started.map(|s| s.elapsed()).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        match self.qemu.as_mut() {
            Some(q) => matches!(q.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The partition table of this machine's disk.
    pub fn partitions(&self) -> Result<Vec<Partition>> {
        disk::partitions(&self.disk, &disk::scratch_in(&self.path))
    }

    /// Inverts one byte of a partition on this machine's disk (never the shared image).
    /// Only while the machine is off.
    pub fn corrupt(&mut self, partition: &str, offset: u64) -> Result<(u8, u8)> {
        if self.is_running() {
            bail!("corrupt() needs the machine powered off");
        }
        let parts = self.partitions()?;
        let p = crate::gpt::find(&parts, partition)?;
        if offset >= p.size() {
            bail!(
                "offset {offset} is outside {partition} ({} bytes)",
                p.size()
            );
        }
        disk::flip_byte(
            &self.disk,
            p.offset() + offset,
            &disk::scratch_in(&self.path),
        )
    }

    /// Starts swtpm and QEMU on this machine's disk, vars and TPM state. Works for the
    /// first boot and for every later one (after the previous QEMU exited).
    pub fn boot(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("{}: boot() while QEMU is still running", self.name);
        }
        self.stop_children();
        self.console.skip_to_end();
        self.boots += 1;
        if self.opts.tpm {
            self.start_swtpm()?;
        }
        self.start_qemu()?;
        if self.opts.console == ConsoleMode::File {
            let control = Control::connect(
                &self.path.join("ctl.sock"),
                &self.path.join("control.log"),
                self.events.clone(),
            )?;
            self.control = Some(control);
        }
        Ok(())
    }

    /// Cuts the power: QEMU is killed at once, so whatever the guest had not written to
    /// its disk is lost (what reached the disk image stays, as on a real disk). Boot
    /// again with [`Machine::reboot_same_disk`].
    pub fn power_cut(&mut self) {
        self.stop_children();
    }

    /// Boots again from the same disk, firmware variables and TPM state, after the
    /// previous boot ended (power-off). What a power cycle of the box does.
    pub fn reboot_same_disk(&mut self) -> Result<()> {
        self.boot()
    }

    fn start_swtpm(&mut self) -> Result<()> {
        let state = self.path.join("tpm");
        if let Some(ca) = &self.opts.tpm_manufacturer {
            if !state.join("tpm2-00.permall").exists() {
                manufacture::manufacture(&state, ca).map_err(|e| anyhow!("{}: {e}", self.name))?;
            }
        }
        let sock = self.path.join("swtpm.sock");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new("swtpm");
        cmd.args(["socket", "--tpm2", "--terminate"])
            .arg("--tpmstate")
            .arg(format!("dir={}", state.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", sock.display()))
            .arg("--log")
            .arg(format!(
                "file={},level=5",
                self.path.join("swtpm.log").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log_file("swtpm.stderr")?);
        let mut g = Group::spawn("swtpm", cmd)?;
        wait_for_path(&sock, &mut g, "swtpm")?;
        self.swtpm = Some(g);
        Ok(())
    }

    fn log_file(&self, name: &str) -> Result<std::fs::File> {
        let p = self.path.join(name);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .with_context(|| format!("failed to open {}", p.display()))
    }

    /// User networking, restricted (no route out), plus the forwards the test asked for.
    fn nic(&self) -> String {
        let mut nic = String::from("user,model=virtio-net-pci,restrict=on");
        for (host, guest) in &self.opts.hostfwd {
            nic.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        for g in &self.opts.guestfwd {
            nic.push_str(&format!(",guestfwd={g}"));
        }
        nic
    }

    /// The QEMU command line shared by tests, benchmarks and `cargo xtask run`.
    pub fn qemu_command(&self) -> Command {
        let d = &self.path;
        let mut cmd = Command::new("qemu-system-x86_64");
        let accel = if self.opts.kvm { "kvm" } else { "tcg" };
        cmd.args(["-name", &format!("edgeos-{}", self.name)])
            .args(["-no-user-config", "-machine", "q35", "-accel", accel])
            .args(["-smp", &self.opts.cpus.to_string()])
            .args(["-m", &self.opts.memory_mib.to_string()])
            .args(["-display", "none", "-vga", "none"])
            .args(["-global", "ICH9-LPC.disable_s3=1"])
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                d.join("OVMF_VARS.fd").display()
            ))
            .arg("-drive")
            .arg(format!(
                "if=none,id=boot,format=qcow2,file={}",
                self.disk.display()
            ))
            .args(["-device", "nvme,drive=boot,serial=edgeos-boot"])
            .args(["-device", "i6300esb", "-action", "watchdog=reset"])
            .args(["-device", "virtio-rng-pci"])
            .arg("-nic")
            .arg(self.nic())
            .args(["-device", "virtio-serial-pci"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=ctl,path={},server=on,wait=off",
                d.join("ctl.sock").display()
            ))
            .args([
                "-device",
                "virtserialport,chardev=ctl,name=org.edgeos.control",
            ])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                d.join("qmp.sock").display()
            ));
        if self.opts.pool_disk_mib.is_some() {
            cmd.arg("-drive")
                .arg(format!(
                    "if=none,id=pool,format=qcow2,file={}",
                    d.join("pool.qcow2").display()
                ))
                .args(["-device", "nvme,drive=pool,serial=edgeos-pool"]);
        }
        for (name, file) in &self.opts.fw_cfg {
            cmd.arg("-fw_cfg")
                .arg(format!("name={name},file={}", file.display()));
        }
        if self.opts.tpm {
            cmd.arg("-chardev")
                .arg(format!(
                    "socket,id=chrtpm,path={}",
                    d.join("swtpm.sock").display()
                ))
                .args(["-tpmdev", "emulator,id=tpm0,chardev=chrtpm"])
                .args(["-device", "tpm-tis,tpmdev=tpm0"]);
        }
        match self.opts.console {
            ConsoleMode::File => {
                cmd.arg("-chardev")
                    .arg(format!(
                        "file,id=con,path={},append=on",
                        self.console.path().display()
                    ))
                    .args(["-serial", "chardev:con", "-monitor", "none"]);
            }
            ConsoleMode::Terminal => {
                // Ctrl-C stops QEMU (signal=on); Ctrl-A c reaches the monitor.
                cmd.args(["-chardev", "stdio,id=con,mux=on,signal=on"])
                    .args([
                        "-serial",
                        "chardev:con",
                        "-mon",
                        "chardev=con,mode=readline",
                    ]);
            }
        }
        cmd
    }

    fn start_qemu(&mut self) -> Result<()> {
        for s in ["qmp.sock", "ctl.sock"] {
            let _ = std::fs::remove_file(self.path.join(s));
        }
        let mut cmd = self.qemu_command();
        std::fs::write(self.path.join("qemu.cmdline"), format!("{cmd:?}\n"))
            .context("failed to write qemu.cmdline")?;
        let g = if self.opts.console == ConsoleMode::Terminal {
            cmd.stderr(self.log_file("qemu.log")?);
            Group::spawn_foreground("qemu-system-x86_64", cmd)?
        } else {
            cmd.stdin(Stdio::null())
                .stdout(self.log_file("qemu.log")?)
                .stderr(self.log_file("qemu.log")?);
            Group::spawn("qemu-system-x86_64", cmd)?
        };
        self.started = Some(Instant::now());
        self.qemu = Some(g);
        let g = self.qemu.as_mut().expect("just set");
        let r = wait_for_path(&self.path.join("qmp.sock"), g, "qemu")
            .and_then(|_| wait_for_path(&self.path.join("ctl.sock"), g, "qemu"));
        r.with_context(|| format!("qemu.log: {}", self.qemu_log_tail()))
    }

    fn qemu_log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.path.join("qemu.log")).unwrap_or_default();
        log.lines()
            .rev()
            .take(10)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits for a console line containing `pattern` that came after the previous match
    /// (or after the boot started); returns the line.
    pub fn wait_for_console(&mut self, pattern: &str, timeout: Duration) -> Result<String> {
        self.wait_for_console_unless(pattern, &[], timeout)
    }

    /// Like [`wait_for_console`](Self::wait_for_console), but fails as soon as a line
    /// containing one of `fatal` shows up (a boot that already failed need not time out).
    pub fn wait_for_console_unless(
        &mut self,
        pattern: &str,
        fatal: &[&str],
        timeout: Duration,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut patterns = vec![pattern];
        patterns.extend_from_slice(fatal);
        loop {
            let exited = !self.is_running();
            // Looked at after the exit check: a line written just before exiting counts.
            match self.console.take_first(&patterns) {
                Some((0, line)) => return Ok(line),
                Some((_, line)) => bail!(
                    "{}: console showed {line:?} while waiting for {pattern:?}; last lines:\n{}",
                    self.name,
                    self.console.tail(30)
                ),
                None => {}
            }
            if exited {
                bail!(
                    "{}: QEMU exited before the console showed {pattern:?}; last lines:\n{}",
                    self.name,
                    self.console.tail(30)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: no console line with {pattern:?} within {timeout:?}; last lines:\n{}",
                    self.name,
                    self.console.tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the ready line and parses it.
    pub fn wait_ready(&mut self) -> Result<Ready> {
        let line = self.wait_for_console_unless("edgeos: ready", BOOT_FAILURES, BOOT_TIMEOUT)?;
        parse_ready(&line)
    }

    /// One request on the control port; returns the whole reply (checked: it answers
    /// this request and has "ok": true).
    pub fn request(&mut self, req: Value) -> Result<Value> {
        let name = self.name.clone();
        let c = self
            .control
            .as_mut()
            .ok_or_else(|| anyhow!("{name}: not booted, no control port"))?;
        c.request(&req, REQUEST_TIMEOUT)
            .with_context(|| format!("{name}: control request failed"))
    }

    /// Like [`request`](Self::request), but an `"ok": false` reply is returned as is.
    pub fn request_any(&mut self, req: Value) -> Result<Value> {
        let name = self.name.clone();
        let c = self
            .control
            .as_mut()
            .ok_or_else(|| anyhow!("{name}: not booted, no control port"))?;
        c.request_any(&req, REQUEST_TIMEOUT)
            .with_context(|| format!("{name}: control request failed"))
    }

    /// noded's pods, through init's `{"cmd":"pods"}` (one object per manifest file).
    pub fn pods(&mut self) -> Result<Vec<Value>> {
        let reply = self.request(serde_json::json!({"cmd":"pods"}))?;
        match reply.get("pods").and_then(Value::as_array) {
            Some(p) => Ok(p.clone()),
            None => bail!("pods reply without a \"pods\" list: {reply}"),
        }
    }

    /// The last `tail` log lines of `pod`'s only app container (`previous`: the attempt
    /// before the current one), through init's `{"cmd":"logs"}`.
    pub fn logs(&mut self, pod: &str, previous: bool, tail: u32) -> Result<Vec<String>> {
        let reply = self.request(serde_json::json!({
            "cmd": "logs", "pod": pod, "previous": previous, "tail": tail
        }))?;
        let lines = reply["logs"]["lines"]
            .as_array()
            .ok_or_else(|| anyhow!("logs reply without \"logs.lines\": {reply}"))?;
        Ok(lines
            .iter()
            .map(|l| l.as_str().unwrap_or_default().to_string())
            .collect())
    }

    /// Polls `pods` until `pred` holds for them; returns those pods.
    pub fn wait_pods(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            // noded is not up yet early in a boot: that is an answer, not a failure.
            let pods = match self.pods() {
                Ok(p) => p,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
                Err(e) => return Err(e.context(format!("{}: {what}", self.name))),
            };
            if pred(&pods) {
                return Ok(pods);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: {what} not reached within {timeout:?}; last pods: {}",
                    self.name,
                    Value::from(pods)
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Waits until noded said `container started` for each pod of `pods` (in any order;
    /// the image's static pods have one container named as the pod), failing at once on
    /// a pod or container that failed to start or a rejected manifest.
    pub fn wait_pods_started(&mut self, pods: &[&str]) -> Result<()> {
        let mut missing: Vec<&str> = pods.to_vec();
        while !missing.is_empty() {
            let line = self.wait_for_console_unless(
                "container started pod=",
                &[
                    "pod failed to start",
                    "container failed to start",
                    "rejected pod manifest",
                ],
                Duration::from_secs(180),
            )?;
            missing.retain(|p| {
                !(line.contains(&format!("pod={p} ")) && line.contains(&format!("container={p}")))
            });
        }
        Ok(())
    }

    /// The status object of `{"cmd":"status"}`.
    pub fn status(&mut self) -> Result<Value> {
        let reply = self.request(serde_json::json!({"cmd":"status"}))?;
        reply
            .get("status")
            .cloned()
            .ok_or_else(|| anyhow!("status reply without \"status\": {reply}"))
    }

    /// Polls the status until `pred` holds for it; returns that status.
    pub fn wait_status(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status()?;
            if pred(&st) {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: {what} not reached within {timeout:?}; last status: {st}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Every event seen on the control port, over all boots of this machine.
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().expect("events lock").clone()
    }

    /// Polls until an event satisfying `pred` arrives (among those after index `from`).
    pub fn wait_for_event(
        &mut self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.events().into_iter().skip(from).find(|e| pred(e)) {
                return Ok(e);
            }
            if !self.is_running() {
                bail!("{}: QEMU exited while waiting for an event", self.name);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: no matching event within {timeout:?}; events since: {:?}",
                    self.name,
                    self.events().get(from..).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Presses the ACPI power button through QMP.
    pub fn powerdown(&mut self) -> Result<()> {
        crate::qmp::execute(
            &self.path.join("qmp.sock"),
            "system_powerdown",
            Duration::from_secs(10),
        )
        .with_context(|| format!("{}: system_powerdown failed", self.name))?;
        Ok(())
    }

    /// Limits the boot disk to `iops` requests a second (QEMU's I/O throttling), or lifts
    /// the limit (`None`): a disk that all but stalls, as a worn one can.
    pub fn throttle_boot_disk(&mut self, iops: Option<u64>) -> Result<()> {
        let iops = iops.unwrap_or(0);
        let limits = serde_json::json!({"device": "boot", "bps": 0, "bps_rd": 0, "bps_wr": 0,
                            "iops": iops, "iops_rd": 0, "iops_wr": 0});
        crate::qmp::execute_with(
            &self.path.join("qmp.sock"),
            "block_set_io_throttle",
            limits,
            Duration::from_secs(10),
        )
        .with_context(|| format!("{}: block_set_io_throttle failed", self.name))?;
        Ok(())
    }

    /// Waits for QEMU to exit by itself; then stops swtpm.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let q = self
            .qemu
            .as_mut()
            .ok_or_else(|| anyhow!("{}: not booted", self.name))?;
        let status = q.wait_timeout(timeout)?;
        let Some(status) = status else {
            bail!(
                "{}: QEMU still running after {timeout:?}; last console lines:\n{}",
                self.name,
                self.console.tail(20)
            );
        };
        self.stop_children();
        Ok(status)
    }

    /// For `cargo xtask run`: waits as long as the user keeps QEMU running.
    pub fn wait_interactive(&mut self) -> Result<ExitStatus> {
        let q = self
            .qemu
            .as_mut()
            .ok_or_else(|| anyhow!("{}: not booted", self.name))?;
        let s = q.wait()?;
        self.stop_children();
        Ok(s)
    }

    fn stop_children(&mut self) {
        self.control = None;
        if let Some(mut q) = self.qemu.take() {
            q.kill();
        }
        if let Some(mut t) = self.swtpm.take() {
            t.kill();
        }
    }

    /// The test passed: stop everything and delete the directory.
    pub fn finish(mut self) {
        self.stop_children();
        // EDGEOS_KEEP=1 keeps a passing machine's directory too (its console shows where
        // a boot's time went); Drop says where.
        self.finished = std::env::var_os("EDGEOS_KEEP").is_none();
        if self.finished {
            if let Some(d) = self.dir.take() {
                let _ = d.close();
            }
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop_children();
        if !self.finished {
            if let Some(d) = self.dir.take() {
                let kept = d.keep();
                eprintln!(
                    "{}: kept {} (console.log, control.log, swtpm.log, qemu.log)",
                    self.name,
                    kept.display()
                );
            }
        }
    }
}

/// Waits until `path` exists while `child` keeps running.
fn wait_for_path(path: &Path, child: &mut Group, what: &str) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while !path.exists() {
        if let Some(s) = child.try_wait()? {
            bail!("{what} exited ({s}) before creating {}", path.display());
        }
        if Instant::now() >= deadline {
            bail!(
                "{what} did not create {} within {START_TIMEOUT:?}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The report of the pod of manifest `file` (`site/<name>`, `downlink/<name>`, ...) in a
/// `pods` answer.
pub fn pod<'a>(pods: &'a [Value], file: &str) -> Option<&'a Value> {
    pods.iter().find(|p| p["file"] == file)
}

/// The pod of `file` is running with all its containers running.
pub fn pod_running(pods: &[Value], file: &str) -> bool {
    pod(pods, file).is_some_and(|p| {
        p["state"] == "running"
            && p["containers"]
                .as_array()
                .is_some_and(|c| !c.is_empty() && c.iter().all(|c| c["state"] == "running"))
    })
}

/// The entry for service `name` in a status object.
pub fn service<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status
        .get("services")?
        .as_array()?
        .iter()
        .find(|s| s.get("name").and_then(Value::as_str) == Some(name))
}

/// Whether every service in a status object is `ready`.
pub fn all_ready(status: &Value) -> bool {
    status
        .get("services")
        .and_then(Value::as_array)
        .is_some_and(|svcs| !svcs.is_empty() && svcs.iter().all(|s| s["state"] == "ready"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_services_and_readiness_in_status() {
        let st = serde_json::json!({"services":[
            {"name":"containerd","state":"ready","pid":5},
            {"name":"noded","state":"backoff","pid":null}]});
        assert_eq!(service(&st, "containerd").unwrap()["pid"], 5);
        assert!(service(&st, "fabricd").is_none());
        assert!(!all_ready(&st));
        assert!(all_ready(
            &serde_json::json!({"services":[{"name":"a","state":"ready"}]})
        ));
        assert!(!all_ready(&serde_json::json!({"services":[]})));
    }

    #[test]
    fn parses_the_ready_line() {
        let r = parse_ready("edgeos: ready version=0.1.0 slot=a uptime_ms=23456").unwrap();
        assert_eq!(
            r,
            Ready {
                version: "0.1.0".into(),
                slot: "a".into(),
                uptime_ms: 23456
            }
        );
        assert!(parse_ready("edgeos: ready version=0.1.0 slot=a").is_err());
        assert!(parse_ready("edgeos: ready version=0.1.0 slot=a uptime_ms=x").is_err());
        assert!(parse_ready("edgeos: starting").is_err());
    }
}
