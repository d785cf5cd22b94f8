//! Pods seen from outside the box: site-provisioned pod manifests (the provisioning
//! bundle's `pods/`, run by noded as `site/<name>`) start beside the image's static ones;
//! init's control port answers `pods` and `logs` from noded; a malformed manifest is
//! reported by file and field while the other pods run; a container that exits at once
//! is restarted with a growing back-off; a noded that does not answer is reported; a pod
//! writes into a volume storaged made on the box's second NVMe disk (through CSI) and a
//! pod asking for more than the pool holds is told so; after a power cycle every pod
//! comes back with no control plane anywhere, and the volume still holds what was written.
//! A pod on the pod network (CNI bridge) is reached from outside the box through its
//! hostPort (portmap's DNAT), its readiness probe going to the pod's own address; a
//! container failing its liveness probe is restarted and finds its emptyDir as it left it.
//! A Block-mode volume reaches a container as a device and keeps what it wrote across the
//! power cycle; an image named by a registry only the site's mirror configuration
//! (the bundle's `registry/<host>/hosts.toml`) resolves is pulled and runs. containerd
//! killed under noded comes back (init) and no container is started twice.
//!
//! One machine, two boots (each boot under TCG costs ~30-60 s).

use qemu_tests::{pod, pod_running as running, Machine, Options};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Everything noded needs to start a pod: images pulled, containers created, under TCG
/// on a loaded host.
const PODS_UP: Duration = Duration::from_secs(300);

/// A sensor with no fabric and no inference: readings go to stdout only, five a second.
const ECHO: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: echo
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 2
  containers:
    - name: echo
      image: edge.local/sensor:1
      env:
        - name: SENSOR_NAME
          value: echo0
        - name: SENSOR_INTERVAL_MS
          value: "200"
      resources:
        limits:
          memory: 32Mi
"#;

/// A second model server, on its own port.
const SCORER: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: scorer
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 2
  containers:
    - name: scorer
      image: edge.local/inference:1
      env:
        - name: MODEL_PATH
          value: /models/temp-anomaly.txt
        - name: LISTEN
          value: 127.0.0.1:8081
      volumeMounts:
        - name: models
          mountPath: /models
          readOnly: true
      resources:
        limits:
          memory: 32Mi
  volumes:
    - name: models
      hostPath:
        path: /usr/share/edge/models
        type: Directory
"#;

/// The model server exits with status 1 at once when it cannot listen: a crash loop.
const CRASHER: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: crasher
spec:
  hostNetwork: true
  restartPolicy: Always
  terminationGracePeriodSeconds: 1
  containers:
    - name: crasher
      image: edge.local/inference:1
      env:
        - name: LISTEN
          value: not-an-address
"#;

/// A sensor keeping its readings on a storaged volume (ext4 on the pool, through CSI):
/// restarted, it continues after the last reading the volume holds.
const LOGGER: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: logger
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 2
  containers:
    - name: logger
      image: edge.local/sensor:1
      env:
        - name: SENSOR_NAME
          value: logger0
        - name: SENSOR_INTERVAL_MS
          value: "500"
        - name: SENSOR_FILE
          value: /data/readings.jsonl
      volumeMounts:
        - name: data
          mountPath: /data
  volumes:
    - name: data
      csi:
        driver: storaged.edgeos
        volumeAttributes:
          volume: readings
          size: 64Mi
"#;

/// A model server on the pod network: its own address from the CNI bridge, reached on
/// the node's port 18080 (hostPort), ready once `/healthz` answers at the pod's address.
const WEB: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: web
spec:
  terminationGracePeriodSeconds: 2
  containers:
    - name: web
      image: edge.local/inference:1
      env:
        - name: MODEL_PATH
          value: /models/temp-anomaly.txt
        - name: LISTEN
          value: 0.0.0.0:8080
      ports:
        - containerPort: 8080
          hostPort: 18080
      readinessProbe:
        httpGet:
          path: /healthz
          port: 8080
        periodSeconds: 2
      volumeMounts:
        - name: models
          mountPath: /models
          readOnly: true
  volumes:
    - name: models
      hostPath:
        path: /usr/share/edge/models
        type: Directory
"#;

/// A sensor whose liveness probe can never pass (nothing listens on port 9): stopped and
/// restarted, it resumes after the readings it kept in its emptyDir.
const LIVELY: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: lively
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  containers:
    - name: lively
      image: edge.local/sensor:1
      env:
        - name: SENSOR_NAME
          value: lively0
        - name: SENSOR_INTERVAL_MS
          value: "200"
        - name: SENSOR_FILE
          value: /scratch/readings.jsonl
      livenessProbe:
        tcpSocket:
          port: 9
        initialDelaySeconds: 4
        periodSeconds: 2
        failureThreshold: 2
      volumeMounts:
        - name: scratch
          mountPath: /scratch
  volumes:
    - name: scratch
      emptyDir: {}
"#;

/// A sensor keeping its newest readings in a ring on a raw block volume (a storaged thin
/// volume in Block mode, handed to the container as a device): restarted, it resumes
/// after the newest.
const RECORDER: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: recorder
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 2
  containers:
    - name: recorder
      image: edge.local/sensor:1
      env:
        - name: SENSOR_NAME
          value: recorder0
        - name: SENSOR_INTERVAL_MS
          value: "500"
        - name: SENSOR_DEVICE
          value: /dev/xvdb
      volumeDevices:
        - name: raw
          devicePath: /dev/xvdb
  volumes:
    - name: raw
      csi:
        driver: storaged.edgeos
        volumeAttributes:
          volume: recorder-raw
          size: 16Mi
          volumeMode: Block
"#;

/// The site's registry mirror for `registry.site.example`, in containerd's hosts.toml
/// format. The mirror here is the box's own registry (noded's, serving the bundled
/// images by name whatever the host), so the pull stays inside the guest.
const MIRROR_HOSTS: &str = r#"server = "http://127.0.0.1:5000"

[host."http://127.0.0.1:5000"]
  capabilities = ["pull", "resolve"]
"#;

/// A sensor pulled by a name only the site's mirror configuration resolves.
const MIRRORED: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: mirrored
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  containers:
    - name: mirrored
      image: registry.site.example/sensor:1
      env:
        - name: SENSOR_NAME
          value: mirrored0
"#;

/// The node port WEB's hostPort maps.
const WEB_HOST_PORT: u16 = 18080;

/// More than the 1 GiB pool could ever hold.
const GREEDY: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: greedy
spec:
  hostNetwork: true
  containers:
    - name: greedy
      image: edge.local/sensor:1
      volumeMounts:
        - name: data
          mountPath: /data
  volumes:
    - name: data
      csi:
        driver: storaged.edgeos
        volumeAttributes:
          volume: huge
          size: 100Ti
"#;

/// `affinity` is not something noded runs.
const BROKEN: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: broken
spec:
  affinity: {}
  containers:
    - name: broken
      image: edge.local/sensor:1
"#;

const PROVISION: &str = "/var/lib/edge/provision";

#[test]
fn provisioned_and_static_pods_run_report_restart_and_survive_a_power_cycle() -> anyhow::Result<()>
{
    let started = Instant::now();
    let mut opts = Options::new(&qemu_tests::image_from_env()?);
    let bundle_dir = tempfile::tempdir()?;
    let bundle = bundle_dir.path().join("provision.toml");
    let mut text = String::new();
    for (file, yaml) in [
        ("echo.yaml", ECHO),
        ("scorer.yaml", SCORER),
        ("crasher.yaml", CRASHER),
        ("broken.yaml", BROKEN),
        ("logger.yaml", LOGGER),
        ("greedy.yaml", GREEDY),
        ("web.yaml", WEB),
        ("lively.yaml", LIVELY),
        ("recorder.yaml", RECORDER),
        ("mirrored.yaml", MIRRORED),
    ] {
        text.push_str(&format!("\"pods/{file}\" = '''\n{yaml}'''\n"));
    }
    text.push_str(&format!(
        "\"registry/registry.site.example/hosts.toml\" = '''\n{MIRROR_HOSTS}'''\n"
    ));
    std::fs::write(&bundle, text)?;
    opts.fw_cfg
        .push(("opt/org.edgeos/provision".into(), bundle.clone()));
    // storaged's pool: an empty second NVMe disk (`pool_device = "auto"` in the image).
    opts.pool_disk_mib = Some(1024);
    // The host side reaches the node's hostPort through the guest's eth0, as a machine
    // on the site network would.
    let web_port = free_port()?;
    opts.hostfwd.push((web_port, WEB_HOST_PORT));
    let mut m = Machine::with_options("pods", opts)?;

    m.boot()?;
    let line = m.wait_for_console("edgeos: provisioning:", Duration::from_secs(180))?;
    assert!(line.contains("provisioning: 11 file(s)"), "{line}");
    m.wait_ready()?;
    eprintln!("ready after {:?}", started.elapsed());

    // Static and provisioned pods run; the malformed one is reported, by file and field.
    let pods = m.wait_pods(PODS_UP, "every pod running", |p| {
        [
            "sensor.yaml",
            "inference.yaml",
            "site/echo.yaml",
            "site/scorer.yaml",
            "site/logger.yaml",
            "site/web.yaml",
            "site/recorder.yaml",
            "site/mirrored.yaml",
        ]
        .iter()
        .all(|f| running(p, f))
            && pod(p, "site/broken.yaml").is_some()
            && pod(p, "site/greedy.yaml").is_some_and(|g| !g["error"].is_null())
    })?;
    eprintln!("pods running after {:?}", started.elapsed());
    let broken = pod(&pods, "site/broken.yaml").unwrap();
    assert_eq!(broken["state"], "invalid", "{broken}");
    assert_eq!(
        broken["error"],
        format!("{PROVISION}/pods/broken.yaml: spec.affinity is not supported yet").as_str(),
        "{broken}"
    );
    // A volume beyond the pool: the pod says which volume and what storaged answered.
    let greedy = pod(&pods, "site/greedy.yaml").unwrap();
    let e = greedy["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("volume data") && e.contains("CreateVolume") && e.contains("OUT_OF_RANGE"),
        "{greedy}"
    );
    assert_ne!(greedy["state"], "running", "{greedy}");
    // The logger's volume is new: formatted once, empty.
    let lines = m.logs("logger", false, 1000)?;
    assert!(
        lines
            .iter()
            .any(|l| l.contains("starting a new file /data/readings.jsonl")),
        "{lines:?}"
    );
    // The recorder's block volume is new: its ring is blank.
    let lines = m.logs("recorder", false, 1000)?;
    assert!(
        lines
            .iter()
            .any(|l| l.contains("starting on the blank device /dev/xvdb")),
        "{lines:?}"
    );
    let echo = pod(&pods, "site/echo.yaml").unwrap();
    assert_eq!(echo["name"], "echo");
    assert_eq!(echo["namespace"], "default");
    assert_eq!(echo["containers"][0]["restarts"], 0, "{echo}");

    // Logs: the provisioned sensor's readings, JSON lines, newest last.
    let deadline = Instant::now() + Duration::from_secs(60);
    let lines = loop {
        let lines = m.logs("echo", false, 5)?;
        if lines.len() == 5 || Instant::now() >= deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(lines.len(), 5, "tail 5 of echo: {lines:?}");
    let seqs: Vec<u64> = lines
        .iter()
        .map(|l| {
            let r: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
            assert_eq!(r["sensor"], "echo0", "{l}");
            assert!(r["celsius"].as_f64().is_some(), "{l}");
            r["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {l}"))
        })
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    // The image's sensor, named as `<namespace>/<name>`: its readings too.
    let lines = m.logs("default/sensor", false, 3)?;
    assert!(!lines.is_empty(), "the static sensor logged nothing");
    for l in lines.iter().filter(|l| l.starts_with('{')) {
        let r: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
        assert_eq!(r["sensor"], "temp0", "{l}");
    }
    assert!(lines.iter().any(|l| l.contains("\"celsius\"")), "{lines:?}");
    // Refusals name what is wrong.
    let r = m.request_any(serde_json::json!({"cmd":"logs","pod":"nope"}))?;
    assert_eq!(r["ok"], false, "{r}");
    let e = r["error"].as_str().unwrap_or_default();
    assert!(e.contains("no pod named \"nope\""), "{e}");
    let r = m.request_any(serde_json::json!({"cmd":"logs"}))?;
    assert_eq!(r["ok"], false, "{r}");

    // The crashing container: restarted per restartPolicy after a back-off that grows
    // (the image's base is 10 s, doubling), never a tight loop.
    let mut seen: Vec<(u64, Instant)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(200);
    let last = loop {
        let pods = m.pods()?;
        let c = pod(&pods, "site/crasher.yaml")
            .map(|p| p["containers"][0].clone())
            .unwrap_or(Value::Null);
        let n = c["restarts"].as_u64().unwrap_or(0);
        if seen.last().is_none_or(|(r, _)| *r != n) {
            eprintln!("crasher: restarts {n} after {:?}: {c}", started.elapsed());
            seen.push((n, Instant::now()));
        }
        // Two exits seen as they happened: the first look only tells where the count
        // was (the crasher may have exited before it, on a fast or a slow host).
        if (n >= 2 && seen.len() >= 3) || Instant::now() >= deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let restarts = last["restarts"].as_u64().unwrap_or(0);
    assert!(
        (2..=5).contains(&restarts),
        "crasher restarted {restarts} times: {last}"
    );
    assert_eq!(last["exit_code"], 1, "{last}");
    assert!(
        last["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("exited with code 1")),
        "the last error says how it ended: {last}"
    );
    let [.., (a, ta), (b, tb)] = seen[..] else {
        panic!("crasher's restarts not seen changing: {seen:?}");
    };
    // Between two exits: at least the 10 s back-off, then the start and the exit.
    assert!(a >= 1 && b == a + 1, "{seen:?}");
    assert!(
        tb - ta >= Duration::from_secs(9),
        "restarted after {:?}: the back-off was not kept",
        tb - ta
    );
    // noded says each delay on the console: it doubles.
    let deadline = Instant::now() + Duration::from_secs(15);
    let delays = loop {
        let console = std::fs::read_to_string(m.console_log())?;
        let delays: Vec<String> = console
            .lines()
            .filter(|l| l.contains("container exited; restarting in") && l.contains("pod=crasher"))
            .filter_map(|l| l.split("restarting in ").nth(1)?.split_whitespace().next())
            .map(str::to_string)
            .collect();
        if delays.len() >= 2 || Instant::now() >= deadline {
            break delays;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        delays.get(..2),
        Some(&["10s".to_string(), "20s".to_string()][..]),
        "{delays:?}"
    );
    // Its output, of this attempt and of the one before.
    for previous in [false, true] {
        let lines = m.logs("crasher", previous, 10)?;
        assert!(
            lines
                .iter()
                .any(|l| l.contains("cannot listen on not-an-address")),
            "previous={previous}: {lines:?}"
        );
    }
    // The others were not disturbed.
    let pods = m.pods()?;
    for f in [
        "sensor.yaml",
        "inference.yaml",
        "site/echo.yaml",
        "site/scorer.yaml",
    ] {
        assert!(
            running(&pods, f),
            "{f} not running: {}",
            Value::from(pods.clone())
        );
        let p = pod(&pods, f).unwrap();
        assert_eq!(p["containers"][0]["restarts"], 0, "{p}");
    }

    // The pod network: the model server in its own network namespace answers from
    // outside the box through the node's hostPort, and its readiness probe (sent to the
    // pod's address) passes.
    let pods = m.wait_pods(Duration::from_secs(60), "web ready", |p| {
        pod(p, "site/web.yaml").is_some_and(|w| w["containers"][0]["ready"] == true)
    })?;
    let web = pod(&pods, "site/web.yaml").unwrap();
    assert_eq!(web["state"], "running", "{web}");
    let answer = infer(web_port, r#"{"celsius":30.0}"#)?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("\"model\":\"temp-anomaly\"") && answer.contains("\"anomaly\":true"),
        "{answer}"
    );

    // A failing liveness probe: the container is stopped and restarted (after the
    // back-off), and it finds the readings it kept in its emptyDir.
    let (resumed, _) = wait_resumed(&mut m, "lively", Duration::from_secs(90))?;
    assert!(resumed > 0, "lively resumed after seq {resumed}");
    let pods = m.pods()?;
    let lively = pod(&pods, "site/lively.yaml").unwrap();
    assert!(
        lively["containers"][0]["restarts"].as_u64() >= Some(1),
        "{lively}"
    );
    let console = std::fs::read_to_string(m.console_log())?;
    assert!(
        console.lines().any(|l| l.contains("pod=lively")
            && l.contains("liveness probe failed")
            && l.contains("stopping the container")),
        "no liveness stop of lively on the console"
    );

    // noded not answering (stopped): init says so within its timeout, naming noded's
    // socket, and relays again once noded runs.
    const SIGSTOP: i32 = 19;
    const SIGCONT: i32 = 18;
    m.request(serde_json::json!({"cmd":"kill","service":"noded","signal":SIGSTOP}))?;
    let asked = Instant::now();
    let r = m.request_any(serde_json::json!({"cmd":"pods"}));
    m.request(serde_json::json!({"cmd":"kill","service":"noded","signal":SIGCONT}))?;
    let r = r?;
    assert_eq!(r["ok"], false, "{r}");
    let e = r["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("/run/noded/noded.sock") && e.contains("did not answer"),
        "{e}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "{:?}",
        asked.elapsed()
    );
    assert!(running(&m.pods()?, "site/echo.yaml"));

    // containerd killed under noded: init starts it again, the containers run on in
    // their shims, and noded carries on with them: no container is started twice, and
    // the echo sensor's readings continue their sequence (a new container would start
    // again at 0).
    let console = std::fs::read_to_string(m.console_log())?;
    let starts_before = container_starts(&console);
    assert!(
        starts_before >= 4,
        "echo, sensor, web and scorer were started: {starts_before}"
    );
    let seq_before = last_seq(&m.logs("echo", false, 1)?)?;
    let pid_before = containerd_pid(&mut m)?;
    const SIGKILL: i32 = 9;
    m.request(serde_json::json!({"cmd":"kill","service":"containerd","signal":SIGKILL}))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = m.status()?;
        let c = qemu_tests::service(&st, "containerd")
            .cloned()
            .unwrap_or_default();
        if c["state"] == "ready" && c["pid"].as_u64().is_some_and(|p| Some(p) != pid_before) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "containerd not back within 120 s: {c}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let pods = m.wait_pods(Duration::from_secs(60), "pods after containerd", |p| {
        [
            "sensor.yaml",
            "inference.yaml",
            "site/echo.yaml",
            "site/web.yaml",
        ]
        .iter()
        .all(|f| running(p, f))
    })?;
    // The echo sensor's log goes on from where it was (containerd reattaches to the
    // shim's output once it has recovered its containers).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lines = m.logs("echo", false, 5)?;
        let seq_after = last_seq(&lines)?;
        if seq_after > seq_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "echo's log stayed at seq {seq_after} (was {seq_before}): {lines:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    // A few more seconds of noded polling the new containerd.
    std::thread::sleep(Duration::from_secs(3));
    let console = std::fs::read_to_string(m.console_log())?;
    assert_eq!(
        container_starts(&console),
        starts_before,
        "containers started again after containerd's restart"
    );
    for f in ["sensor.yaml", "site/echo.yaml", "site/web.yaml"] {
        let p = pod(&pods, f).unwrap();
        assert_eq!(p["containers"][0]["restarts"], 0, "{p}");
    }

    // Power cycle: same disk, no control plane anywhere; every pod comes back.
    m.powerdown()?;
    m.wait_exit(Duration::from_secs(120))?;
    let down = Instant::now();
    m.reboot_same_disk()?;
    m.wait_ready()?;
    let pods = m.wait_pods(PODS_UP, "every pod running again", |p| {
        [
            "sensor.yaml",
            "inference.yaml",
            "site/echo.yaml",
            "site/scorer.yaml",
            "site/logger.yaml",
            "site/web.yaml",
            "site/recorder.yaml",
        ]
        .iter()
        .all(|f| running(p, f))
    })?;
    eprintln!("pods back {:?} after the power cycle", down.elapsed());
    assert_eq!(
        pod(&pods, "site/broken.yaml").map(|p| p["state"].clone()),
        Some("invalid".into())
    );
    let lines = m.logs("echo", false, 1)?;
    assert!(
        lines.iter().any(|l| l.contains("\"sensor\":\"echo0\"")),
        "{lines:?}"
    );
    // The logger's readings survived on its volume: it continues after them.
    let (resumed, _) = wait_resumed(&mut m, "logger", Duration::from_secs(60))?;
    assert!(resumed > 0, "logger resumed after seq {resumed}");
    // And the recorder's readings survived on its raw block volume.
    let (resumed, lines) = wait_resumed(&mut m, "recorder", Duration::from_secs(30))?;
    assert!(resumed > 0, "recorder resumed after seq {resumed}");
    assert!(
        lines.iter().any(|l| l.contains("from device /dev/xvdb")),
        "{lines:?}"
    );
    m.finish();
    eprintln!("took {:?}", started.elapsed());
    Ok(())
}

/// Once the sensor of `pod` said it resumed after a stored reading: that reading's seq
/// and the log lines.
fn wait_resumed(
    m: &mut Machine,
    pod: &str,
    timeout: Duration,
) -> anyhow::Result<(u64, Vec<String>)> {
    let deadline = Instant::now() + timeout;
    loop {
        let lines = m.logs(pod, false, 1000)?;
        let found = lines.iter().find_map(|l| {
            l.split("resuming after seq ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        });
        match found {
            Some(seq) => return Ok((seq, lines)),
            None if Instant::now() >= deadline => {
                anyhow::bail!("{pod} did not resume within {timeout:?}: {lines:?}")
            }
            None => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// noded's `container started` console lines of the pods that never exit on their own.
fn container_starts(console: &str) -> usize {
    console
        .lines()
        .filter(|l| l.contains("container started"))
        .filter(|l| {
            ["pod=echo ", "pod=sensor ", "pod=web ", "pod=scorer "]
                .iter()
                .any(|p| l.contains(p))
        })
        .count()
}

/// The `seq` of the last JSON reading among sensor log lines.
fn last_seq(lines: &[String]) -> anyhow::Result<u64> {
    lines
        .iter()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|r| r["seq"].as_u64())
        .ok_or_else(|| anyhow::anyhow!("no reading in {lines:?}"))
}

fn containerd_pid(m: &mut Machine) -> anyhow::Result<Option<u64>> {
    let st = m.status()?;
    Ok(qemu_tests::service(&st, "containerd").and_then(|c| c["pid"].as_u64()))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// POSTs `body` to `/infer` on the host's forward of the node's hostPort; the whole
/// HTTP answer. Retried for a while: the forward answers before the guest's port does.
fn infer(port: u16, body: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(
                s,
                "POST /infer HTTP/1.1\r\nHost: web\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match attempt {
            Ok(a) if !a.is_empty() => return Ok(a),
            Ok(_) | Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_secs(1))
            }
            Ok(_) => anyhow::bail!("POST /infer on 127.0.0.1:{port}: empty answer"),
            Err(e) => anyhow::bail!("POST /infer on 127.0.0.1:{port}: {e}"),
        }
    }
}
