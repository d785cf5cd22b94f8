//! noded's Kubernetes API server path, first against a test double of kube-apiserver
//! (`fake_apiserver` checks what the real server checks for the calls noded makes, and
//! records every call): the apiserver module runs with a hand-fed pod status and a temp
//! cache directory: the Node is registered with its zone and Ready, the Lease renewed;
//! the pods bound to this node are mirrored as manifests noded's parser takes, with
//! what the server adds stripped and unsupported fields kept for the parser to name;
//! status is patched only when it changes; an outage keeps the cached pods and the
//! relist after it resyncs them. Bad `[apiserver]` config is refused by key. One test
//! runs the whole path through noded and a real containerd. Then against the upstream
//! control plane built from source (`cargo xtask controlplane`): the node's own
//! certificate under the Node authorizer, a Deployment scheduled onto it, scaled up
//! and down.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use noded::apiserver::{self, Settings};
use noded::pods::{PodReport, Status};
use qemu_tests::controlplane::ControlPlane;
use serde_json::{json, Value};

mod fake_apiserver;
use fake_apiserver::FakeApiServer;
#[path = "../../tpm/tests/common/swtpm.rs"]
#[allow(dead_code)] // one part of it is used here
mod swtpm;

const NODE: &str = "edge-a";

struct Setup {
    server: FakeApiServer,
    status: Status,
    cache: PathBuf,
    agent: Option<apiserver::Agent>,
    settings: Settings,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let server = FakeApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig()).unwrap();
    let cache = dir.path().join("cache");
    let settings = settings(kubeconfig, cache.clone());
    let status: Status = Arc::new(Mutex::new(Vec::new()));
    let agent = apiserver::start(settings.clone(), status.clone(), None)
        .await
        .unwrap();
    Setup {
        server,
        status,
        cache,
        agent: Some(agent),
        settings,
        _dir: dir,
    }
}

/// What `[apiserver]` with node_name edge-a and zone site-7 gives, with short intervals.
fn settings(kubeconfig: PathBuf, cache: PathBuf) -> Settings {
    let labels = [
        ("kubernetes.io/hostname", NODE),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "amd64"),
        (apiserver::ZONE_LABEL, "site-7"),
        ("example.com/role", "sensor"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Settings {
        kubeconfig,
        bootstrap_kubeconfig: None,
        node_name: NODE.into(),
        labels,
        cache_dir: cache,
        lease_duration: Duration::from_secs(4),
        renew_every: Duration::from_millis(300),
        node_status_every: Duration::from_millis(500),
        pod_status_every: Duration::from_millis(100),
        retry_max: Duration::from_millis(500),
        runtime_version: "containerd://1.6.20".into(),
        tunnel: None,
        log_dir: PathBuf::from("/var/log/pods"),
        csi_socket: None,
        state_dir: PathBuf::from("/var/lib/noded"),
        tpm_program: None,
        renew_after: 0.8,
        token_refresh: 0.8,
        // No pressure whatever this host has left (the eviction test raises it).
        thresholds: apiserver::Thresholds {
            memory_kib: 0,
            disk_percent: 0,
        },
        eviction_every: Duration::from_millis(500),
    }
}

async fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within 15 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spec(extra: Value) -> Value {
    let mut s = json!({
        "hostNetwork": true,
        "terminationGracePeriodSeconds": 1,
        "containers": [{"name": "main", "image": "edge.local/hello:1", "args": ["hi"],
                        "ports": [{"containerPort": 8080, "protocol": "TCP"}]}],
    });
    for (k, v) in extra.as_object().unwrap() {
        s[k] = v.clone();
    }
    s
}

fn cached(dir: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(file)).ok()
}

fn running_report(file: &str, name: &str, restarts: u32) -> PodReport {
    // Through serde: fields the reconciler adds for others default.
    serde_json::from_value(json!({
        "file": format!("api/{file}"), "name": name, "namespace": "default", "uid": "h",
        "state": "running", "error": null,
        "containers": [{"name": "main", "init": false, "state": "running",
                        "restarts": restarts, "exit_code": null, "last_error": null,
                        "ready": true}],
    }))
    .unwrap()
}

fn status_patches(server: &FakeApiServer, name: &str) -> usize {
    let path = format!("/api/v1/namespaces/default/pods/{name}/status");
    server
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH" && r.path == path && r.status == 200)
        .count()
}

fn renew_time(server: &FakeApiServer) -> Option<String> {
    server
        .lease("kube-node-lease", NODE)
        .and_then(|l| l["spec"]["renewTime"].as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_is_registered_with_its_zone_and_its_lease_renewed() {
    let s = setup().await;
    let node = wait_until("node registered", || s.server.node(NODE)).await;
    let labels = &node["metadata"]["labels"];
    assert_eq!(labels["topology.kubernetes.io/zone"], "site-7");
    assert_eq!(labels["kubernetes.io/hostname"], NODE);
    assert_eq!(labels["kubernetes.io/os"], "linux");
    assert_eq!(labels["example.com/role"], "sensor");
    let st = &node["status"];
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(st["capacity"]["cpu"], cpus.to_string());
    assert_eq!(st["capacity"]["pods"], "110");
    assert!(
        st["capacity"]["memory"].as_str().unwrap().ends_with("Ki"),
        "{st}"
    );
    assert_eq!(st["allocatable"], st["capacity"]);
    let addresses = st["addresses"].as_array().unwrap();
    assert!(
        addresses.contains(&json!({"type": "Hostname", "address": NODE})),
        "{st}"
    );
    for a in addresses.iter().filter(|a| a["type"] == "InternalIP") {
        let ip: std::net::Ipv4Addr = a["address"].as_str().unwrap().parse().unwrap();
        assert!(!ip.is_loopback(), "{a}");
    }
    let ready = &st["conditions"][0];
    assert_eq!(
        (ready["type"].as_str(), ready["status"].as_str()),
        (Some("Ready"), Some("True"))
    );
    // The pressures as this host measures them: a test host has memory, disk and pids
    // to spare, and an address.
    for kind in [
        "MemoryPressure",
        "DiskPressure",
        "PIDPressure",
        "NetworkUnavailable",
    ] {
        let c = st["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == kind)
            .unwrap_or_else(|| panic!("no {kind} condition: {st}"));
        assert_eq!(c["status"], "False", "{c}");
        assert!(c["message"].as_str().is_some_and(|m| !m.is_empty()), "{c}");
    }
    assert!(st["nodeInfo"]["kubeletVersion"]
        .as_str()
        .unwrap()
        .starts_with("noded/"));
    assert_eq!(
        st["nodeInfo"]["containerRuntimeVersion"],
        "containerd://1.6.20"
    );

    let lease = wait_until("lease created", || s.server.lease("kube-node-lease", NODE)).await;
    assert_eq!(lease["spec"]["holderIdentity"], NODE);
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 4);
    assert_eq!(lease["metadata"]["ownerReferences"][0]["kind"], "Node");
    assert_eq!(
        lease["metadata"]["ownerReferences"][0]["uid"],
        node["metadata"]["uid"]
    );
    let first = renew_time(&s.server).unwrap();
    let second = wait_until("lease renewed", || {
        renew_time(&s.server).filter(|t| *t != first)
    })
    .await;
    assert!(second > first, "{second} after {first}");
    let heartbeat = |n: &Value| n["status"]["conditions"][0]["lastHeartbeatTime"].clone();
    let hb = heartbeat(&node);
    wait_until("node status heartbeat", || {
        s.server.node(NODE).filter(|n| heartbeat(n) != hb)
    })
    .await;
    // Every call was one the test double serves, with the content type it requires.
    let bad: Vec<_> = s
        .server
        .requests()
        .into_iter()
        .filter(|r| r.status >= 400 && r.status != 404 && r.status != 409)
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_bound_to_this_node_are_cached_as_manifests_noded_runs() {
    let mut s = setup().await;
    s.server.add_pod("default", "web", NODE, spec(json!({})));
    s.server
        .add_pod("default", "elsewhere", "edge-b", spec(json!({})));
    s.server.add_pod(
        "site",
        "placed",
        NODE,
        spec(json!({"affinity": {"nodeAffinity": {}}})),
    );
    let text = wait_until("web cached", || cached(&s.cache, "default_web.yaml")).await;
    let path = s.cache.join("default_web.yaml").display().to_string();
    let pod = noded::manifest::parse(&path, &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(
        (pod.namespace.as_str(), pod.name.as_str()),
        ("default", "web")
    );
    assert_eq!(pod.containers[0].image, "edge.local/hello:1");
    // The server's imagePullPolicy is kept: the box pulls as the server says.
    assert!(text.contains("imagePullPolicy: IfNotPresent"), "{text}");
    assert_eq!(pod.labels.get("app").map(String::as_str), Some("web"));
    assert!(
        pod.volumes.is_empty() && pod.containers[0].volume_mounts.is_empty(),
        "{text}"
    );
    for gone in [
        "kube-api-access",
        "nodeName",
        "tolerations",
        "status",
        "resourceVersion",
        "managedFields",
        "terminationMessagePath",
        "serviceAccount",
        "schedulerName",
        "dnsPolicy",
        "priority",
        "enableServiceLinks",
        "securityContext",
    ] {
        assert!(!text.contains(gone), "{gone} left in:\n{text}");
    }
    let refused = wait_until("placed cached", || cached(&s.cache, "site_placed.yaml")).await;
    let e = noded::manifest::parse("site_placed.yaml", &refused)
        .unwrap_err()
        .to_string();
    assert!(e.contains("spec.affinity"), "{e}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(cached(&s.cache, "default_elsewhere.yaml").is_none());

    // A graceful delete: the manifest goes (the reconciler stops the pod), and once
    // the pod is no longer reported noded finishes the deletion as kubelet does.
    *s.status.lock().unwrap() = vec![running_report("default_web.yaml", "web", 0)];
    s.server.delete_pod("default", "web", true);
    wait_until("web uncached", || {
        cached(&s.cache, "default_web.yaml").is_none().then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        s.server.pod("default", "web").is_some(),
        "deleted while still reported"
    );
    s.status.lock().unwrap().clear();
    wait_until("web deleted on the server", || {
        s.server.pod("default", "web").is_none().then_some(())
    })
    .await;
    let del = s
        .server
        .requests()
        .into_iter()
        .find(|r| r.method == "DELETE")
        .unwrap();
    assert_eq!(del.body["gracePeriodSeconds"], 0, "{del:?}");
    assert!(del.body["preconditions"]["uid"].is_string(), "{del:?}");

    // A forced delete removes it at once.
    s.server.delete_pod("site", "placed", false);
    wait_until("placed uncached", || {
        cached(&s.cache, "site_placed.yaml").is_none().then_some(())
    })
    .await;
    s.agent.take();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_status_is_patched_when_it_changes_only() {
    let s = setup().await;
    s.server.add_pod("default", "web", NODE, spec(json!({})));
    s.server
        .add_pod("default", "bad", NODE, spec(json!({"affinity": {}})));
    wait_until("cached", || cached(&s.cache, "default_web.yaml")).await;
    *s.status.lock().unwrap() = vec![
        running_report("default_web.yaml", "web", 0),
        serde_json::from_value(json!({
            "file": "api/default_bad.yaml", "name": "", "namespace": "", "state": "invalid",
            "error": format!("{}: spec.affinity is not supported yet",
                             s.cache.join("default_bad.yaml").display()),
            "containers": [],
        }))
        .unwrap(),
    ];
    let pod = wait_until("web Running on the server", || {
        s.server
            .pod("default", "web")
            .filter(|p| p["status"]["phase"] == "Running")
    })
    .await;
    let st = &pod["status"];
    let cs = &st["containerStatuses"][0];
    assert_eq!(cs["name"], "main");
    assert_eq!(cs["ready"], true);
    assert_eq!(cs["restartCount"], 0);
    assert_eq!(cs["image"], "edge.local/hello:1");
    assert_eq!(cs["state"], json!({"running": {}}));
    let cond = |p: &Value, t: &str| {
        p["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == t)
            .unwrap()["status"]
            .clone()
    };
    for t in ["Ready", "ContainersReady", "Initialized", "PodScheduled"] {
        assert_eq!(cond(&pod, t), "True", "{t}: {st}");
    }
    let bad = wait_until("bad reported", || {
        s.server
            .pod("default", "bad")
            .filter(|p| p["status"]["message"].is_string())
    })
    .await;
    assert_eq!(bad["status"]["phase"], "Pending");
    assert_eq!(
        bad["status"]["message"],
        "spec.affinity is not supported yet"
    );
    assert_eq!(cond(&bad, "Ready"), "False");

    // Unchanged: not patched again.
    let patches = status_patches(&s.server, "web");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let web: Vec<_> = s
        .server
        .requests()
        .into_iter()
        .filter(|r| {
            r.path.contains("/web") || r.query.contains_key("watch") || r.path == "/api/v1/pods"
        })
        .map(|r| (r.method, r.path, r.query, r.body))
        .collect();
    assert_eq!(status_patches(&s.server, "web"), patches, "{web:#?}");
    // A restart is a change.
    *s.status.lock().unwrap() = vec![running_report("default_web.yaml", "web", 1)];
    wait_until("restartCount 1", || {
        s.server
            .pod("default", "web")
            .filter(|p| p["status"]["containerStatuses"][0]["restartCount"] == 1)
    })
    .await;
    assert_eq!(status_patches(&s.server, "web"), patches + 1);
    let patch = s
        .server
        .requests()
        .into_iter()
        .rfind(|r| r.path.ends_with("/web/status"))
        .unwrap();
    assert_eq!(patch.content_type, "application/merge-patch+json");
    assert!(
        patch.body["metadata"]["uid"].is_string(),
        "uid precondition: {:?}",
        patch.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_keeps_cached_pods_and_the_relist_after_it_resyncs() {
    let mut s = setup().await;
    s.server.add_pod("default", "a", NODE, spec(json!({})));
    s.server.add_pod("default", "b", NODE, spec(json!({})));
    wait_until("cached", || {
        cached(&s.cache, "default_a.yaml").and(cached(&s.cache, "default_b.yaml"))
    })
    .await;
    wait_until("lease", || renew_time(&s.server)).await;

    s.server.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        cached(&s.cache, "default_a.yaml").is_some(),
        "an outage removed a cached pod"
    );
    assert!(
        cached(&s.cache, "default_b.yaml").is_some(),
        "an outage removed a cached pod"
    );
    // Meanwhile, on the control plane: b deleted, c bound here, the Node object lost.
    s.server.delete_pod_silently("default", "b");
    s.server.add_pod("default", "c", NODE, spec(json!({})));
    s.server.delete_node(NODE);
    let before = renew_time(&s.server).unwrap();

    s.server.restart().await;
    wait_until("b removed after the relist", || {
        cached(&s.cache, "default_b.yaml").is_none().then_some(())
    })
    .await;
    wait_until("c cached", || cached(&s.cache, "default_c.yaml")).await;
    assert!(cached(&s.cache, "default_a.yaml").is_some());
    wait_until("lease renewed after the outage", || {
        renew_time(&s.server).filter(|t| *t > before)
    })
    .await;
    let node = wait_until("node registered again", || s.server.node(NODE)).await;
    assert_eq!(
        node["metadata"]["labels"]["topology.kubernetes.io/zone"],
        "site-7"
    );
    let watched_again = s
        .server
        .requests()
        .iter()
        .any(|r| r.path == "/api/v1/pods" && !r.query.contains_key("watch") && r.status == 200);
    assert!(watched_again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_with_no_api_server_the_cached_pods_stay() {
    let mut s = setup().await;
    s.server.add_pod("default", "a", NODE, spec(json!({})));
    wait_until("cached", || cached(&s.cache, "default_a.yaml")).await;
    // A reboot with the control plane unreachable: noded starts with only its cache.
    s.agent.take();
    s.server.stop();
    s.agent = Some(
        apiserver::start(s.settings.clone(), s.status.clone(), None)
            .await
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        cached(&s.cache, "default_a.yaml").is_some(),
        "the cache was emptied"
    );
    *s.status.lock().unwrap() = vec![running_report("default_a.yaml", "a", 0)];
    // The control plane comes back: the pod is still bound here, so it stays, and its
    // status reaches the server.
    s.server.restart().await;
    wait_until("a Running on the server", || {
        s.server
            .pod("default", "a")
            .filter(|p| p["status"]["phase"] == "Running")
    })
    .await;
    assert!(cached(&s.cache, "default_a.yaml").is_some());
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1 it signed, made with the host's openssl:
/// (ca.crt, server.crt, server.key) in `dir`.
fn pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca = [
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
        ],
    ]
    .concat();
    openssl(dir, &ca);
    let csr = [
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=kube-apiserver",
        ],
    ]
    .concat();
    openssl(dir, &csr);
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext",
        ],
    );
    (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}

/// A real API server is reached over HTTPS: noded trusts the kubeconfig's CA and no
/// other (TLS through kube's rustls with ring).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_is_reached_over_tls_trusting_the_kubeconfigs_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pki(&dir.path().join("pki"));
    let (other_ca, _, _) = pki(&dir.path().join("other"));
    let server = FakeApiServer::start_tls(&cert, &key).await;
    server.add_pod("default", "web", NODE, spec(json!({})));
    let status: Status = Arc::new(Mutex::new(Vec::new()));

    let wrong = dir.path().join("wrong-kubeconfig");
    std::fs::write(&wrong, server.kubeconfig_with_ca(Some(&other_ca))).unwrap();
    let agent = apiserver::start(
        settings(wrong, dir.path().join("cache")),
        status.clone(),
        None,
    )
    .await
    .unwrap();
    wait_until("noded refusing the certificate", || {
        (server.refused_handshakes() > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(agent);
    assert!(
        server.requests().is_empty() && server.node(NODE).is_none(),
        "a server whose certificate the kubeconfig's CA did not sign was used"
    );

    let right = dir.path().join("kubeconfig");
    std::fs::write(&right, server.kubeconfig_with_ca(Some(&ca))).unwrap();
    let cache = dir.path().join("cache");
    let _agent = apiserver::start(settings(right, cache.clone()), status, None)
        .await
        .unwrap();
    wait_until("node registered over TLS", || server.node(NODE)).await;
    wait_until("pod cached over TLS", || cached(&cache, "default_web.yaml")).await;
}

/// noded itself refuses a bad `[apiserver]` table at start, naming the key and file.
#[test]
fn bad_apiserver_config_is_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let config = dir.path().join("noded.toml");
    let base = format!("containerd_socket = \"{d}/c.sock\"\nmanifests_dir = \"{d}/m\"\n");
    let good = dir.path().join("kubeconfig");
    std::fs::write(&good, "apiVersion: v1\nkind: Config\n").unwrap();
    for (table, key, needle) in [
        ("kubeconfig = \"kube/config\"\nzone = \"s\"", "apiserver.kubeconfig", "kube/config"),
        (&format!("kubeconfig = \"{d}/missing\"\nzone = \"s\""), "apiserver.kubeconfig", "missing"),
        (&format!("kubeconfig = \"{}\"\nzone = \"bad zone\"", good.display()), "apiserver.zone", "bad zone"),
        (&format!("kubeconfig = \"{}\"\nzone = \"s\"\nlease_seconds = 1", good.display()), "apiserver.lease_seconds", "4"),
        (&format!("kubeconfig = \"{}\"\nzone = \"s\"\nnode_name = \"Edge_A\"", good.display()), "apiserver.node_name", "Edge_A"),
        (&format!("kubeconfig = \"{}\"\nzone = \"s\"\nlabels = {{ \"topology.kubernetes.io/zone\" = \"x\" }}", good.display()), "apiserver.labels", "set by noded"),
        (&format!("kubeconfig = \"{}\"\nzone = \"s\"\ntunnel = \"core.example\"", good.display()), "apiserver.tunnel", "core.example"),
        (&format!("kubeconfig = \"{}\"\nzone = \"s\"\ntunnel = \"core:0\"", good.display()), "apiserver.tunnel", "not host:port"),
    ] {
        std::fs::write(&config, format!("{base}[apiserver]\n{table}\n")).unwrap();
        let (ok, err) = noded_with(&config);
        assert!(!ok, "{table}: accepted");
        assert!(err.contains(&format!("key `{key}`")) && err.contains(needle), "{table}: {err}");
    }
    // An unknown key in the table is refused too (deny_unknown_fields).
    std::fs::write(
        &config,
        format!(
            "{base}[apiserver]\nkubeconfig = \"{}\"\nzone = \"s\"\nserver = \"x\"\n",
            good.display()
        ),
    )
    .unwrap();
    let (ok, err) = noded_with(&config);
    assert!(!ok && err.contains("server"), "{err}");
}

/// noded run with `config` until it ends: whether it succeeded, and what it said.
fn noded_with(config: &Path) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_noded"))
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A provisioned `apiserver_file` (how the shipped image joins a control plane): read
/// when present, none when absent, and a bad one is no API server rather than no noded.
#[test]
fn a_provisioned_apiserver_file_is_read_when_present_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("noded-apiserver.toml");
    assert!(
        apiserver::provisioned(&file).is_none(),
        "no file, no server"
    );
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, "apiVersion: v1\nkind: Config\n").unwrap();
    std::fs::write(
        &file,
        format!(
            "kubeconfig = \"{}\"\nzone = \"plant-7\"\n",
            kubeconfig.display()
        ),
    )
    .unwrap();
    let c = apiserver::provisioned(&file).expect("read");
    assert_eq!(
        (c.kubeconfig.as_path(), c.zone.as_str()),
        (kubeconfig.as_path(), "plant-7")
    );
    std::fs::write(&file, "kubeconfig = \"relative\"\nzone = \"plant-7\"\n").unwrap();
    assert!(
        apiserver::provisioned(&file).is_none(),
        "a bad file is not used"
    );

    // noded.toml may not give both.
    let config = dir.path().join("noded.toml");
    let d = dir.path().display();
    std::fs::write(
        &config,
        format!(
            "containerd_socket = \"{d}/c.sock\"\nmanifests_dir = \"{d}/m\"\n\
             apiserver_file = \"{}\"\n[apiserver]\nkubeconfig = \"{}\"\nzone = \"s\"\n",
            file.display(),
            kubeconfig.display()
        ),
    )
    .unwrap();
    let (ok, err) = noded_with(&config);
    assert!(!ok && err.contains("key `apiserver_file`"), "{err}");
}

mod common;

/// The whole path: noded with an `[apiserver]` table and a real containerd. A pod
/// created on the server runs, its status reaches the server as Running, and a
/// graceful delete on the server stops it and is finished by noded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_from_the_api_server_runs_in_containerd_and_is_reported_running() {
    let server = FakeApiServer::start().await;
    let kubeconfig = server.kubeconfig();
    let node = common::Node::start_with(
        "noded-apiserver-",
        "[apiserver]\nkubeconfig = \"{dir}/kubeconfig\"\nnode_name = \"edge-a\"\nzone = \"site-7\"\nlease_seconds = 8\n",
        |dir| std::fs::write(dir.join("kubeconfig"), &kubeconfig).unwrap(),
    )
    .await;
    // hello ignores SIGTERM (it is its container's pid 1): stopping it takes the grace
    // period, which the deletion must wait out.
    server.add_pod(
        "default",
        "hello",
        NODE,
        spec(json!({"terminationGracePeriodSeconds": 4})),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let running = |p: &Value| {
        p["status"]["phase"] == "Running" && p["status"]["containerStatuses"][0]["ready"] == true
    };
    while !server.pod("default", "hello").is_some_and(|p| running(&p)) {
        assert!(
            Instant::now() < deadline,
            "not Running on the server within 60 s: {:#?}\nnoded's log:\n{}",
            server.pod("default", "hello"),
            node.env.noded_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pods = node
        .env
        .wait_for("hello running from the cache", |p| {
            p.iter()
                .any(|p| p.file == "api/default_hello.yaml" && p.state == "running")
        })
        .await;
    assert!(pods.iter().any(|p| p.name == "hello"), "{pods:#?}");
    let registered = server.node(NODE).expect("node registered");
    assert_eq!(
        registered["status"]["nodeInfo"]["containerRuntimeVersion"]
            .as_str()
            .map(|v| v.starts_with("containerd://")),
        Some(true),
        "{registered}"
    );
    assert!(node
        .env
        .dir
        .join("state/apiserver/pods/default_hello.yaml")
        .exists());

    server.delete_pod("default", "hello", true);
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.pod("default", "hello").is_some() {
        assert!(
            Instant::now() < deadline,
            "deletion not finished within 30 s\nnoded's log:\n{}",
            node.env.noded_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // noded finished the deletion only once the pod's sandbox was gone.
    let left = node
        .cri
        .list_pod_sandbox(noded::cri::api::ListPodSandboxRequest::default())
        .await
        .unwrap()
        .items;
    assert!(left.is_empty(), "{left:#?}");
    let pods = noded::control::pods(&node.env.socket).await.unwrap();
    assert!(
        !pods.iter().any(|p| p.file.starts_with("api/")),
        "{pods:#?}"
    );
}

/// The upstream control plane (etcd, kube-apiserver, controller manager, scheduler, built
/// from source by `cargo xtask controlplane`), noded with a node certificate the Node
/// authorizer and NodeRestriction hold to its own objects: the Node registers Ready with
/// its labels and Lease; a Deployment's replicas are scheduled onto it, cached as
/// manifests noded runs, and reported Running at the API server from noded's status;
/// scaled down, the pods it no longer wants are stopped and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_at_the_upstream_control_plane_runs_here_and_scales() {
    let dir = tempfile::tempdir().unwrap();
    let Some((cp, settings)) = upstream_node(dir.path()).await else {
        return;
    };
    let cache = settings.cache_dir.clone();
    let status: Status = Arc::new(Mutex::new(Vec::new()));
    let agent = apiserver::start(settings, status.clone(), None)
        .await
        .unwrap();

    let cp = Arc::new(cp);
    let get = |args: &'static [&'static str]| {
        let cp = cp.clone();
        move || cp.get(args).ok()
    };
    let node = wait_until_long("node Ready at the API server", {
        let get = get(&["node", NODE]);
        move || {
            get().filter(|n| {
                n["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            })
        }
    })
    .await;
    let labels = &node["metadata"]["labels"];
    assert_eq!(labels["topology.kubernetes.io/zone"], "site-7", "{node}");
    assert_eq!(labels["example.com/role"], "sensor", "{node}");
    assert_eq!(
        node["status"]["nodeInfo"]["containerRuntimeVersion"],
        "containerd://1.6.20"
    );
    let lease = wait_until_long("lease", get(&["lease", "-n", "kube-node-lease", NODE])).await;
    assert_eq!(lease["spec"]["holderIdentity"], NODE, "{lease}");
    // The Node's own events, where kubelet puts them: noded starting, and each
    // condition's first status.
    let node_events = wait_until_long("the Node's events", || {
        cp.get(&[
            "events",
            "-n",
            "default",
            "--field-selector",
            "involvedObject.kind=Node,involvedObject.name=edge-a",
        ])
        .ok()
        .filter(|l| {
            let reasons: Vec<&str> = l["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["reason"].as_str())
                .collect();
            [
                "Starting",
                "NodeReady",
                "NodeHasSufficientMemory",
                "NodeHasNoDiskPressure",
            ]
            .iter()
            .all(|r| reasons.contains(r))
        })
    })
    .await;
    let ready = node_events["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["reason"] == "NodeReady")
        .unwrap();
    assert_eq!(
        ready["message"], "Node edge-a status is now: NodeReady",
        "{ready}"
    );
    assert_eq!(ready["source"]["component"], "noded");

    // The Node authorizer holds noded's credential to its own node.
    let other = cp.kubectl([
        &format!(
            "--kubeconfig={}",
            cp.dir.join(format!("node-{NODE}.kubeconfig")).display()
        ),
        "label",
        "node",
        NODE,
        "example.com/x=1",
    ]);
    assert!(other.is_ok(), "a node may label itself: {other:?}");

    cp.apply(
        r#"{"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
              "template": {"metadata": {"labels": {"app": "web"}},
                "spec": {"hostNetwork": true, "automountServiceAccountToken": false,
                  "terminationGracePeriodSeconds": 1,
                  "containers": [{"name": "main", "image": "edge.local/hello:1",
                                  "args": ["hi"]}]}}}}"#,
    )
    .unwrap();
    let cached_web = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("default_web-"))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    let files = wait_until_long("both replicas cached", || {
        let f = cached_web(&cache);
        (f.len() == 2).then_some(f)
    })
    .await;
    for f in &files {
        let text = cached(&cache, f).unwrap();
        let pod = noded::manifest::parse(f, &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(pod.containers[0].image, "edge.local/hello:1");
    }
    // What the reconciler would report: each pending, then running. The API server
    // shows them so, with an event for each container started.
    let name_of = |f: &str| {
        f.trim_start_matches("default_")
            .trim_end_matches(".yaml")
            .to_string()
    };
    let running_now: Vec<PodReport> = files
        .iter()
        .map(|f| running_report(f, &name_of(f), 0))
        .collect();
    *status.lock().unwrap() = running_now
        .iter()
        .cloned()
        .map(|mut r| {
            r.state = "pending".into();
            r.containers[0].state = "waiting".into();
            r.containers[0].ready = false;
            r
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    *status.lock().unwrap() = running_now;
    let running = wait_until_long("both Running at the API server", {
        let get = get(&["pods", "-n", "default", "-l", "app=web"]);
        move || {
            get().filter(|l| {
                let items = l["items"].as_array().cloned().unwrap_or_default();
                items.len() == 2 && items.iter().all(|p| p["status"]["phase"] == "Running")
            })
        }
    })
    .await;
    for p in running["items"].as_array().unwrap() {
        assert_eq!(p["spec"]["nodeName"], NODE, "scheduled here: {p}");
        let c = &p["status"]["containerStatuses"][0];
        assert_eq!(c["ready"], true, "{p}");
    }
    let deploy = wait_until_long("the Deployment sees 2 ready", {
        let get = get(&["deployment", "-n", "default", "web"]);
        move || get().filter(|d| d["status"]["readyReplicas"] == 2)
    })
    .await;
    assert_eq!(deploy["status"]["replicas"], 2);
    for f in &files {
        let pod = name_of(f);
        let selector = format!("involvedObject.name={pod}");
        let events = wait_until_long("a Started event", || {
            cp.get(&["events", "-n", "default", "--field-selector", &selector])
                .ok()
                .filter(|l| {
                    l["items"].as_array().is_some_and(|i| {
                        i.iter().any(|e| {
                            e["reason"] == "Started" && e["source"]["component"] == "noded"
                        })
                    })
                })
        })
        .await;
        let started = events["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["reason"] == "Started")
            .unwrap();
        assert_eq!(started["message"], "Started container main", "{started}");
        assert_eq!(started["type"], "Normal", "{started}");
        assert_eq!(started["source"]["host"], NODE, "{started}");
    }

    // Scaled to one: the controller deletes one pod gracefully; noded drops its
    // manifest (the reconciler stops it), and once it is no longer reported, finishes
    // the deletion.
    cp.kubectl(["scale", "-n", "default", "deployment/web", "--replicas=1"])
        .unwrap();
    let left = wait_until_long("one replica cached", || {
        let f = cached_web(&cache);
        (f.len() == 1).then_some(f)
    })
    .await;
    status
        .lock()
        .unwrap()
        .retain(|r| r.file.ends_with(&left[0]));
    wait_until_long("one pod left at the API server", {
        let get = get(&["pods", "-n", "default", "-l", "app=web"]);
        move || get().filter(|l| l["items"].as_array().is_some_and(|i| i.len() == 1))
    })
    .await;
    drop(agent);
}

/// The upstream control plane and a node with only a bootstrap token: noded makes a key,
/// asks for its certificate with a CertificateSigningRequest, the controller manager
/// approves and signs it, and the Node registers under it. The token is then revoked and
/// the Node deleted at the server: restarted, noded joins again with the certificate it
/// kept, asking nothing more. A node with a token the server does not know gets nothing
/// and registers nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_bootstrap_token_obtains_its_certificate_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cp) = upstream(dir.path()).await else {
        return;
    };
    let (token, boot) = bootstrap_file(&cp, dir.path());
    let stored = dir.path().join("state/kubeconfig");
    let status: Status = Arc::new(Mutex::new(Vec::new()));
    let mut s = settings(stored.clone(), dir.path().join("cache"));
    s.bootstrap_kubeconfig = Some(boot.clone());
    s.lease_duration = Duration::from_secs(10);
    let agent = apiserver::start(s.clone(), status.clone(), None)
        .await
        .unwrap();

    let cp = Arc::new(cp);
    let node_ready = || {
        let cp = cp.clone();
        move || {
            cp.get(&["node", NODE]).ok().filter(|n| {
                n["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            })
        }
    };
    wait_until_long("the node Ready under its own certificate", node_ready()).await;
    let csrs = cp.get(&["csr"]).unwrap();
    let items = csrs["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{csrs}");
    let csr = &items[0];
    let (id, _) = token.split_once('.').unwrap();
    assert_eq!(
        csr["spec"]["username"],
        format!("system:bootstrap:{id}"),
        "{csr}"
    );
    assert_eq!(
        csr["spec"]["signerName"],
        "kubernetes.io/kube-apiserver-client-kubelet"
    );
    assert!(
        csr["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with(&format!("node-csr-{NODE}-")),
        "{csr}"
    );
    let approved = csr["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["type"] == "Approved"));
    assert!(approved, "approved by the controller manager: {csr}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&stored).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the node's key is kept private");
    assert!(
        !dir.path().join("state/kubeconfig.key.pending").exists(),
        "the pending key is folded into the kubeconfig"
    );
    // The kept credential is the node's own: the Node authorizer lets it read its Node.
    let own = cp.kubectl([
        &format!("--kubeconfig={}", stored.display()),
        "get",
        "node",
        NODE,
        "-o",
        "name",
    ]);
    let own = own.unwrap_or_else(|e| panic!("the kept credential: {e:#}"));
    assert_eq!(own.trim(), "node/edge-a");
    drop(agent);

    // The token revoked and the Node deleted: noded joins again with what it kept.
    cp.kubectl([
        "delete",
        "secret",
        "-n",
        "kube-system",
        &format!("bootstrap-token-{id}"),
    ])
    .unwrap();
    cp.kubectl(["delete", "node", NODE]).unwrap();
    let agent = apiserver::start(s, status.clone(), None).await.unwrap();
    wait_until_long("the node back with its kept certificate", node_ready()).await;
    let csrs = cp.get(&["csr"]).unwrap();
    assert_eq!(csrs["items"].as_array().unwrap().len(), 1, "{csrs}");
    drop(agent);

    // A token the server does not know: nothing is obtained, nothing registers.
    let bad = dir.path().join("bad.kubeconfig");
    std::fs::write(
        &bad,
        ControlPlane::bootstrap_kubeconfig(
            &cp.url,
            &cp.dir.join("ca.pem"),
            "abcdef.0123456789abcdef",
        ),
    )
    .unwrap();
    let other = dir.path().join("other/kubeconfig");
    let mut s = settings(other.clone(), dir.path().join("cache-b"));
    s.node_name = "edge-b".into();
    s.bootstrap_kubeconfig = Some(bad);
    let agent = apiserver::start(s, status, None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!other.exists(), "no credential from a bad token");
    assert!(cp.get(&["node", "edge-b"]).is_err(), "no Node edge-b");
    assert_eq!(
        cp.get(&["csr"]).unwrap()["items"].as_array().unwrap().len(),
        1
    );
    drop(agent);
}

/// The upstream control plane: a pod reading a ConfigMap, a Secret and its own fields
/// (volumes, variables and `envFrom`) is cached with those as files in read-only
/// directories and as values, files with the modes asked; a pod whose ConfigMap does not exist yet is
/// not cached, a `FailedMount` event says why, and once the ConfigMap is made it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_configmap_secret_and_own_fields_reach_it_as_files_and_variables() {
    let dir = tempfile::tempdir().unwrap();
    let Some((cp, s)) = upstream_node(dir.path()).await else {
        return;
    };
    let cache = s.cache_dir.clone();
    let status: Status = Arc::new(Mutex::new(Vec::new()));
    let agent = apiserver::start(s, status, None).await.unwrap();
    cp.apply(
        r#"{"apiVersion": "v1", "kind": "List", "items": [
  {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app-config", "namespace": "default"},
   "data": {"app.conf": "level=debug\n", "mode": "fast"}},
  {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "app-secret", "namespace": "default"},
   "stringData": {"token": "s3cret"}},
  {"apiVersion": "v1", "kind": "Pod",
   "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
   "spec": {"nodeName": "edge-a", "hostNetwork": true, "automountServiceAccountToken": false,
     "containers": [{"name": "main", "image": "edge.local/hello:1",
       "env": [{"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "app-config", "key": "mode"}}},
               {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "app-secret", "key": "token"}}},
               {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
               {"name": "GONE", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "x", "optional": true}}},
               {"name": "mode", "value": "explicit"}],
       "envFrom": [{"configMapRef": {"name": "app-config"}},
                   {"secretRef": {"name": "app-secret"}, "prefix": "S_"},
                   {"configMapRef": {"name": "nope", "optional": true}}],
       "volumeMounts": [{"name": "conf", "mountPath": "/etc/app"},
                        {"name": "creds", "mountPath": "/run/creds"},
                        {"name": "info", "mountPath": "/etc/info"}]}],
     "volumes": [
       {"name": "conf", "configMap": {"name": "app-config", "items": [{"key": "app.conf", "path": "app.conf"}]}},
       {"name": "creds", "secret": {"secretName": "app-secret", "defaultMode": 256}},
       {"name": "info", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}]}}]}"#,
    )
    .unwrap();
    let text = wait_until_long("the pod cached", || cached(&cache, "default_web.yaml")).await;
    let pod =
        noded::manifest::parse("default_web.yaml", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let env: std::collections::BTreeMap<_, _> = pod.containers[0].env.iter().cloned().collect();
    assert_eq!(env.get("MODE").map(String::as_str), Some("fast"), "{text}");
    assert_eq!(env.get("TOKEN").map(String::as_str), Some("s3cret"));
    assert_eq!(env.get("POD").map(String::as_str), Some("web"));
    assert!(
        !env.contains_key("GONE"),
        "an optional missing key sets nothing"
    );
    // envFrom: every key of the ConfigMap, the Secret's with its prefix; `env` wins over
    // a key of the same name.
    assert_eq!(
        env.get("app.conf").map(String::as_str),
        Some("level=debug\n")
    );
    assert_eq!(env.get("S_token").map(String::as_str), Some("s3cret"));
    assert_eq!(
        env.get("mode").map(String::as_str),
        Some("explicit"),
        "{text}"
    );
    assert_eq!(env.len(), 6, "{env:?}");
    let vols = cache.join(".volumes/default_web");
    let read = |p: &str| std::fs::read_to_string(vols.join(p)).unwrap();
    assert_eq!(read("conf/app.conf"), "level=debug\n");
    assert!(!vols.join("conf/mode").exists(), "only the items named");
    assert_eq!(read("creds/token"), "s3cret");
    // Every label, one `key="value"` line each, sorted (the API server also copies
    // the node's topology labels onto its pods).
    let labels = read("info/labels");
    let lines: Vec<&str> = labels.lines().collect();
    assert!(lines.contains(&"app=\"web\""), "{labels}");
    assert!(lines.is_sorted(), "{labels}");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| {
        std::fs::metadata(vols.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("creds/token"), 0o400);
    assert_eq!(mode("conf/app.conf"), 0o644);
    let cached_mode = std::fs::metadata(cache.join("default_web.yaml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        cached_mode & 0o777,
        0o600,
        "a cached pod may hold a secret's value"
    );
    for v in &pod.volumes {
        match &v.source {
            noded::manifest::VolumeSource::HostPath { path, .. } => {
                assert_eq!(path, &vols.join(&v.name), "{v:?}")
            }
            other => panic!("{}: {other:?}", v.name),
        }
    }
    assert!(
        pod.containers[0].volume_mounts.iter().all(|m| m.read_only),
        "{:?}",
        pod.containers[0].volume_mounts
    );

    // A ConfigMap that is not there yet: the pod waits, and the core hears why. The
    // first read can be refused instead (403, "no relationship found": the API server's
    // node authorizer has not yet seen the pod bound to this node); noded tries again and
    // says the new reason in a new event.
    cp.apply(
        r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "later", "namespace": "default"},
   "spec": {"nodeName": "edge-a", "hostNetwork": true, "automountServiceAccountToken": false,
     "containers": [{"name": "main", "image": "edge.local/hello:1",
       "volumeMounts": [{"name": "conf", "mountPath": "/etc/app"}]}],
     "volumes": [{"name": "conf", "configMap": {"name": "later-config"}}]}}"#,
    )
    .unwrap();
    let event = wait_until_long("a FailedMount event", || {
        cp.get(&[
            "events",
            "-n",
            "default",
            "--field-selector",
            "involvedObject.name=later",
        ])
        .ok()
        .and_then(|l| {
            l["items"]
                .as_array()?
                .iter()
                .find(|e| {
                    e["reason"] == "FailedMount"
                        && e["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("not found"))
                })
                .cloned()
        })
    })
    .await;
    assert!(
        event["message"]
            .as_str()
            .is_some_and(|m| m.contains("later-config")),
        "{event}"
    );
    assert_eq!(event["type"], "Warning");
    assert!(cached(&cache, "default_later.yaml").is_none());
    cp.apply(
        r#"{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "later-config", "namespace": "default"},
   "data": {"k": "v"}}"#,
    )
    .unwrap();
    wait_until_long("the waiting pod cached once its ConfigMap exists", || {
        cached(&cache, "default_later.yaml")
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(cache.join(".volumes/default_later/conf/k")).unwrap(),
        "v"
    );
    // Deleted at the server: its volumes go with it.
    cp.kubectl(["delete", "pod", "later", "--grace-period=0", "--force"])
        .unwrap();
    wait_until_long("the pod's volumes removed", || {
        (!cache.join(".volumes/default_later").exists()).then_some(())
    })
    .await;
    drop(agent);
}

/// The upstream control plane (`cargo xtask controlplane`), started in `<dir>/core`;
/// `None` when it is not built (the precondition is reported).
async fn upstream(dir: &Path) -> Option<ControlPlane> {
    let Some(bin) = qemu_tests::controlplane::built() else {
        edge_common::precondition_missing(
            "the Kubernetes control plane built from source (cargo xtask controlplane)",
        );
        return None;
    };
    let cp_dir = dir.join("core");
    let cp = tokio::task::spawn_blocking(move || ControlPlane::start(&bin, &cp_dir))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("control plane: {e:#}"));
    Some(cp)
}

/// The upstream control plane in `dir`, and the settings of node edge-a under its node
/// certificate (cache in `dir/cache`), with a 10 s lease: longer than the test double's
/// 4 s, as the controller manager's node monitor reads it.
async fn upstream_node(dir: &Path) -> Option<(ControlPlane, Settings)> {
    let cp = upstream(dir).await?;
    let s = node_at(&cp, NODE, dir.join("cache"));
    Some((cp, s))
}

/// The settings of node `name` at the upstream control plane `cp`, under its own node
/// certificate, with the 10 s lease the controller manager's node monitor reads.
fn node_at(cp: &ControlPlane, name: &str, cache: PathBuf) -> Settings {
    let mut s = settings(cp.node_kubeconfig(name).unwrap(), cache);
    s.node_name = name.into();
    s.labels
        .insert("kubernetes.io/hostname".into(), name.into());
    s.lease_duration = Duration::from_secs(10);
    s
}

/// A bootstrap token at `cp` and a kubeconfig with it in `dir`.
fn bootstrap_file(cp: &ControlPlane, dir: &Path) -> (String, PathBuf) {
    let token = cp.bootstrap_token().unwrap();
    let boot = dir.join("bootstrap.kubeconfig");
    std::fs::write(
        &boot,
        ControlPlane::bootstrap_kubeconfig(&cp.url, &cp.dir.join("ca.pem"), &token),
    )
    .unwrap();
    (token, boot)
}

/// [`wait_until`] for the real control plane, whose controllers act on their own
/// periods (the scheduler, the Deployment and ReplicaSet controllers): 60 s.
async fn wait_until_long<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = tokio::task::block_in_place(&mut f) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within 60 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `kubectl logs` through the tunnel: the upstream control plane with konnectivity-server
/// as its egress to the nodes, noded dialling out to it as the Konnectivity agent of
/// node edge-a and serving the kubelet API's logs over it. The logs are what the
/// reconciler keeps (a CRI log file in the pod's log directory, written here as
/// containerd writes it): the whole log, `--tail`, `-f` showing a line written after it
/// started, and a container without logs refused with noded's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_logs_reach_the_box_through_its_outbound_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let Some((cp, mut settings)) = upstream_node(dir.path()).await else {
        return;
    };
    let logs = dir.path().join("logs");
    let status: Status = Arc::new(Mutex::new(Vec::new()));
    settings.tunnel = Some(format!("127.0.0.1:{}", cp.tunnel_port));
    settings.log_dir = logs.clone();
    let _agent = apiserver::start(settings, status.clone(), None)
        .await
        .unwrap();
    cp.apply(
        r#"{"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "logger", "namespace": "default"},
            "spec": {"nodeName": "edge-a", "hostNetwork": true,
              "automountServiceAccountToken": false,
              "containers": [{"name": "main", "image": "edge.local/hello:1"},
                             {"name": "side", "image": "edge.local/hello:1"}]}}"#,
    )
    .unwrap();
    let cp = Arc::new(cp);
    let pod = wait_until_long("the pod at the API server", {
        let cp = cp.clone();
        move || cp.get(&["pod", "-n", "default", "logger"]).ok()
    })
    .await;
    let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
    let mut report = running_report("default_logger.yaml", "logger", 0);
    report.uid = uid.clone();
    let mut side = report.containers[0].clone();
    side.name = "side".into();
    report.containers.push(side);
    *status.lock().unwrap() = vec![report];
    let main_dir = logs.join(format!("default_logger_{uid}/main"));
    std::fs::create_dir_all(&main_dir).unwrap();
    let log = main_dir.join("0.log");
    let line = |i: u32| format!("2026-12-06T10:00:0{i}.000000000Z stdout F reading {i}\n");
    std::fs::write(&log, (1..=3).map(line).collect::<String>()).unwrap();

    // The node's tunnel is up once the API server's dial finds it.
    let whole = wait_until_long("kubectl logs through the tunnel", || {
        cp.kubectl(["logs", "-n", "default", "logger", "-c", "main"])
            .ok()
    })
    .await;
    assert_eq!(whole, "reading 1\nreading 2\nreading 3\n");
    let tail = cp
        .kubectl(["logs", "-n", "default", "logger", "-c", "main", "--tail=1"])
        .unwrap();
    assert_eq!(tail, "reading 3\n");
    let none = cp
        .kubectl(["logs", "-n", "default", "logger", "-c", "side"])
        .unwrap_err();
    assert!(
        format!("{none:#}").contains("container \"side\" of pod default/logger has no logs yet"),
        "{none:#}"
    );

    // -f: what is written after it started arrives.
    let mut follow = cp
        .kubectl_command()
        .args([
            "logs", "-f", "-n", "default", "logger", "-c", "main", "--tail=1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| {
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("kubectl logs -f: no {what} within 30 s"))
    };
    assert_eq!(next("first line"), "reading 3");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(line(4).as_bytes()).unwrap();
    }
    assert_eq!(next("line written while following"), "reading 4");
    let _ = follow.kill();
    let _ = follow.wait();

    // A second box, edge-b, at the same site address (both run on this host, as boxes
    // behind NAT can share one). The API server prefers a node's InternalIP, as
    // kubeadm's does; a dial by address could reach either box, and edge-b has no such
    // pod. Each of a dozen reads of edge-a's pod reaches edge-a.
    let mut b = node_at(&cp, "edge-b", dir.path().join("cache-b"));
    b.tunnel = Some(format!("127.0.0.1:{}", cp.tunnel_port));
    b.log_dir = dir.path().join("logs-b");
    let _agent_b = apiserver::start(b, Arc::new(Mutex::new(Vec::new())), None)
        .await
        .unwrap();
    cp.apply(
        r#"{"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "elsewhere", "namespace": "default"},
            "spec": {"nodeName": "edge-b", "hostNetwork": true,
              "automountServiceAccountToken": false,
              "containers": [{"name": "main", "image": "edge.local/hello:1"}]}}"#,
    )
    .unwrap();
    // edge-b's tunnel is up once its kubelet API answers for its own pod.
    wait_until_long("edge-b answering through its tunnel", || {
        let e = cp
            .kubectl(["logs", "-n", "default", "elsewhere"])
            .unwrap_err();
        format!("{e:#}").contains("(pods: none)").then_some(())
    })
    .await;
    for _ in 0..12 {
        let read = cp.kubectl(["logs", "-n", "default", "logger", "-c", "main"]);
        assert_eq!(
            read.map_err(|e| format!("{e:#}")),
            Ok("reading 1\nreading 2\nreading 3\nreading 4\n".to_string())
        );
    }
    let nodes = cp.get(&["node", "edge-a"]).unwrap();
    assert!(
        nodes["status"]["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["type"] == "Hostname"),
        "a tunnelled node is known by its name only: {}",
        nodes["status"]["addresses"]
    );
}

/// `kubectl exec` and `kubectl port-forward` through the tunnel, to a container a real
/// containerd runs: noded (the binary) with the upstream control plane's node
/// certificate and its tunnel, a pod the operator creates there. exec prints what the
/// command prints, passes input to it and gives back its exit code; port-forward
/// reaches a port the container listens on; exec into a container that does not exist
/// is refused naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_exec_and_port_forward_reach_a_container_through_the_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cp) = upstream(dir.path()).await else {
        return;
    };
    let kubeconfig = cp.node_kubeconfig(NODE).unwrap();
    let table = format!(
        "[apiserver]\nkubeconfig = \"{}\"\nnode_name = \"{NODE}\"\nzone = \"site-7\"\n\
         lease_seconds = 10\ntunnel = \"127.0.0.1:{}\"\n",
        kubeconfig.display(),
        cp.tunnel_port
    );
    let node = common::Node::start_with("noded-exec-", &table, |_| {}).await;
    let listen = common::free_port();
    cp.apply(&format!(
        r#"{{"apiVersion": "v1", "kind": "Pod",
            "metadata": {{"name": "shell", "namespace": "default"}},
            "spec": {{"nodeName": "{NODE}", "hostNetwork": true,
              "automountServiceAccountToken": false, "terminationGracePeriodSeconds": 1,
              "containers": [{{"name": "main", "image": "edge.local/hello:1",
                "env": [{{"name": "HELLO_LISTEN", "value": "{listen}"}}]}}]}}}}"#
    ))
    .unwrap();
    let cp = Arc::new(cp);
    wait_until_long("the pod Running at the API server", {
        let cp = cp.clone();
        move || {
            cp.get(&["pod", "-n", "default", "shell"])
                .ok()
                .filter(|p| p["status"]["phase"] == "Running")
        }
    })
    .await;
    let said = wait_until_long("kubectl exec through the tunnel", || {
        cp.kubectl([
            "exec", "-n", "default", "shell", "--", "hello", "--say", "from", "inside",
        ])
        .ok()
    })
    .await;
    assert_eq!(
        said,
        "from inside\n",
        "noded's log:\n{}",
        node.env.noded_log()
    );
    // Input reaches the command (-i).
    let mut cat = cp
        .kubectl_command()
        .args([
            "exec", "-i", "-n", "default", "shell", "--", "hello", "--cat",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = cat.stdin.take().unwrap();
        stdin.write_all(b"piped through\n").unwrap();
    }
    let out = tokio::task::block_in_place(|| cat.wait_with_output()).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "piped through\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With a terminal (-it, kubectl run under script(1) so its own input is one), the
    // command's output is a terminal in the container; without, it is not.
    let kubectl = cp.kubectl_command();
    let mut line: Vec<String> = vec![kubectl.get_program().to_string_lossy().into_owned()];
    line.extend(kubectl.get_args().map(|a| a.to_string_lossy().into_owned()));
    line.extend(
        [
            "exec", "-it", "-n", "default", "shell", "--", "hello", "--tty",
        ]
        .map(String::from),
    );
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new("script")
            .args(["-qec", &line.join(" "), "/dev/null"])
            .stdin(std::process::Stdio::null())
            .output()
    })
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("a terminal") && !said.contains("not a terminal"),
        "kubectl exec -it: {said:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plain = cp
        .kubectl(["exec", "-n", "default", "shell", "--", "hello", "--tty"])
        .unwrap();
    assert_eq!(plain, "not a terminal\n");
    // The command's exit code comes back.
    let failed = cp
        .kubectl([
            "exec", "-n", "default", "shell", "--", "hello", "--check", "/nope",
        ])
        .unwrap_err();
    assert!(
        format!("{failed:#}").contains("command terminated with exit code 1"),
        "{failed:#}"
    );
    let none = cp
        .kubectl([
            "exec", "-n", "default", "shell", "-c", "other", "--", "hello",
        ])
        .unwrap_err();
    assert!(format!("{none:#}").contains("other"), "{none:#}");

    // port-forward: a local port reaches the container's.
    let local = common::free_port();
    let mut forward = cp
        .kubectl_command()
        .args([
            "port-forward",
            "-n",
            "default",
            "pod/shell",
            &format!("{local}:{listen}"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let answer = wait_until_long("an answer through kubectl port-forward", || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", local)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        (!out.is_empty()).then_some(out)
    })
    .await;
    let _ = forward.kill();
    let _ = forward.wait();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");

    // One exec whose command never reads its input does not hold the tunnel, which
    // every connection shares, back: its input is pumped until it backs up, and another
    // exec answers meanwhile (the kubelet leg's streams have flow control of their own,
    // so the backlog stays with the client, not in the tunnel).
    let mut stuck = cp
        .kubectl_command()
        .args([
            "exec", "-i", "-n", "default", "shell", "--", "hello", "never", "reads",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut input = stuck.stdin.take().unwrap();
    let pumped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::spawn({
        let pumped = pumped.clone();
        move || {
            use std::io::Write;
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..1024 {
                if input.write_all(&chunk).is_err() {
                    break;
                }
                pumped.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    // Until the pump stops getting rid of its input (backed up; about 9 MiB are taken
    // first), at most 30 s.
    let mut last = 0;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = pumped.load(std::sync::atomic::Ordering::Relaxed);
        if now > 0 && now == last {
            break;
        }
        last = now;
    }
    assert!(
        last > 0 && last < 64 << 20,
        "the input of a command that never reads it backs up: {last} bytes taken"
    );
    let kubectl = cp.kubectl_command();
    let other = tokio::task::block_in_place(|| {
        std::process::Command::new("timeout")
            .arg("60")
            .arg(kubectl.get_program())
            .args(kubectl.get_args())
            .args([
                "exec", "-n", "default", "shell", "--", "hello", "--say", "still", "here",
            ])
            .output()
    })
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&other.stdout),
        "still here\n",
        "another exec while one's input is backed up ({} bytes taken): {}\nnoded's log:\n{}",
        pumped.load(std::sync::atomic::Ordering::Relaxed),
        String::from_utf8_lossy(&other.stderr),
        node.env.noded_log()
    );
    let _ = stuck.kill();
    let _ = stuck.wait();
}

/// The node's certificate is renewed before it expires, asked for with the node's own
/// certificate (not the bootstrap token), and the node carries on under the new one:
/// a kept certificate that has lived 100 of its 120 s (past the 80 % mark once the
/// node starts) is replaced by one the controller manager signs for a year, and the
/// Node is Ready with its Lease renewed under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_certificate_is_renewed_with_its_own_before_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cp) = upstream(dir.path()).await else {
        return;
    };
    let (_, boot) = bootstrap_file(&cp, dir.path());
    // The kept credential: system:node:edge-a, signed by the cluster CA 100 s ago,
    // valid 20 s more.
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(cp.dir.join("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(cp.dir.join("ca.pem")).unwrap(),
        ca_key,
    )
    .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("system:node:{NODE}"));
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let now = std::time::SystemTime::now();
    params.not_before = (now - Duration::from_secs(100)).into();
    params.not_after = (now + Duration::from_secs(20)).into();
    let cert = params.signed_by(&key, &issuer).unwrap();
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let stored = dir.path().join("state/kubeconfig");
    std::fs::create_dir_all(stored.parent().unwrap()).unwrap();
    std::fs::write(
        &stored,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: core\n  cluster:\n    \
             server: {}\n    certificate-authority-data: {}\nusers:\n- name: node\n  user:\n    \
             client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: core\n  \
             context:\n    cluster: core\n    user: node\ncurrent-context: core\n",
            cp.url,
            b64(&std::fs::read(cp.dir.join("ca.pem")).unwrap()),
            b64(cert.pem().as_bytes()),
            b64(key.serialize_pem().as_bytes()),
        ),
    )
    .unwrap();
    let old = std::fs::read_to_string(&stored).unwrap();

    let status: Status = Arc::new(Mutex::new(Vec::new()));
    let mut s = settings(stored.clone(), dir.path().join("cache"));
    s.bootstrap_kubeconfig = Some(boot.clone());
    s.lease_duration = Duration::from_secs(10);
    let _agent = apiserver::start(s, status, None).await.unwrap();

    let cp = Arc::new(cp);
    let csr = wait_until_long("a renewal request, signed", || {
        cp.get(&["csr"]).ok().and_then(|l| {
            l["items"]
                .as_array()?
                .iter()
                .find(|c| c["status"]["certificate"].is_string())
                .cloned()
        })
    })
    .await;
    assert_eq!(
        csr["spec"]["username"],
        format!("system:node:{NODE}"),
        "asked for with the node's own certificate: {csr}"
    );
    let renewed = wait_until_long("the new certificate kept", || {
        std::fs::read_to_string(&stored).ok().filter(|t| *t != old)
    })
    .await;
    let k: serde_yaml::Value = serde_yaml::from_str(&renewed).unwrap();
    let pem = base64::engine::general_purpose::STANDARD
        .decode(
            k["users"][0]["user"]["client-certificate-data"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let x509 = pem.parse_x509().unwrap();
    let left = x509.validity().not_after.timestamp() - edge_common::unix_ms() as i64 / 1000;
    assert!(left > 86_400, "the new certificate is valid {left} s more");
    // The node goes on under it, past the old one's expiry.
    let expiry = now + Duration::from_secs(25);
    tokio::time::sleep(
        expiry
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
    .await;
    let lease = cp.get(&["lease", "-n", "kube-node-lease", NODE]).unwrap();
    let renew: String = lease["spec"]["renewTime"].as_str().unwrap().to_string();
    let renewed_at = unix_secs(&renew);
    let now = edge_common::unix_ms() as i64 / 1000;
    assert!(
        now - renewed_at < 10,
        "the Lease was last renewed at {renew}"
    );
}

/// Unix seconds of an RFC 3339 time with microseconds (`2026-12-06T10:00:00.000000Z`).
fn unix_secs(t: &str) -> i64 {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", t, "+%s"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// A projected `serviceAccountToken`: noded asks the upstream API server for a token of
/// the pod's service account, bound to the pod and for the audience asked, writes it
/// into the pod's volume, and asks again once the part of its lifetime set has passed
/// (shortened here), replacing the file in place while the cached pod stays the same
/// (no restart). The API server accepts the token for that audience (TokenReview) and
/// names the pod in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projected_service_account_token_is_written_and_renewed_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let Some((cp, mut s)) = upstream_node(dir.path()).await else {
        return;
    };
    let cache = s.cache_dir.clone();
    // 600 s tokens asked for again after 6 s.
    s.token_refresh = 0.01;
    let _agent = apiserver::start(s, Arc::new(Mutex::new(Vec::new())), None)
        .await
        .unwrap();
    let cp = Arc::new(cp);
    // The controller manager makes each namespace's `default` service account.
    wait_until_long("the default service account", {
        let cp = cp.clone();
        move || cp.get(&["serviceaccount", "-n", "default", "default"]).ok()
    })
    .await;
    let pod = |name: &str, seconds: u32| {
        format!(
            r#"{{"apiVersion": "v1", "kind": "Pod",
   "metadata": {{"name": "{name}", "namespace": "default"}},
   "spec": {{"nodeName": "edge-a", "hostNetwork": true, "automountServiceAccountToken": false,
     "containers": [{{"name": "main", "image": "edge.local/hello:1",
       "volumeMounts": [{{"name": "vault", "mountPath": "/var/run/vault"}}]}}],
     "volumes": [{{"name": "vault", "projected": {{"sources": [
       {{"serviceAccountToken": {{"audience": "vault", "expirationSeconds": {seconds},
                                 "path": "token"}}}}]}}}}]}}}}"#
        )
    };
    cp.apply(&pod("reader", 600)).unwrap();
    let text = wait_until_long("the pod cached", || cached(&cache, "default_reader.yaml")).await;
    let file = cache.join(".volumes/default_reader/vault/token");
    let first = std::fs::read_to_string(&file).unwrap();
    // The token's claims: the pod's service account, the audience asked, the pod.
    let claims = |token: &str| -> Value {
        use base64::Engine;
        let part = token.split('.').nth(1).unwrap();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    };
    let c = claims(&first);
    assert_eq!(c["sub"], "system:serviceaccount:default:default", "{c}");
    assert_eq!(c["aud"], json!(["vault"]), "{c}");
    assert_eq!(c["kubernetes.io"]["pod"]["name"], "reader", "{c}");
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 600);
    let review_file = dir.path().join("review.json");
    std::fs::write(
        &review_file,
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
               "spec": {"token": first.trim(), "audiences": ["vault"]}})
        .to_string(),
    )
    .unwrap();
    let reviewed: Value = serde_json::from_str(
        &cp.kubectl([
            "create",
            "-o",
            "json",
            "-f",
            &review_file.display().to_string(),
        ])
        .unwrap(),
    )
    .unwrap();
    assert_eq!(reviewed["status"]["authenticated"], true, "{reviewed}");

    // Asked for again and replaced in place; the cached pod is unchanged.
    let second = wait_until_long("a new token", || {
        std::fs::read_to_string(&file).ok().filter(|t| *t != first)
    })
    .await;
    assert!(claims(&second)["iat"].as_i64() >= c["iat"].as_i64());
    assert_eq!(cached(&cache, "default_reader.yaml").unwrap(), text);
}

/// The Node's labels follow the config: a label noded set and the config no longer has
/// is taken off the Node when noded starts again, while a label the operator set
/// stays; a condition another component set stays through noded's status patches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_taken_out_of_the_config_is_taken_off_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let Some((cp, mut s)) = upstream_node(dir.path()).await else {
        return;
    };
    let agent = apiserver::start(s.clone(), Arc::new(Mutex::new(Vec::new())), None)
        .await
        .unwrap();
    let cp = Arc::new(cp);
    let labels = || {
        cp.get(&["node", NODE])
            .ok()
            .map(|n| n["metadata"]["labels"].clone())
    };
    wait_until_long("the node with its labels", || {
        labels().filter(|l| l["example.com/role"] == "sensor")
    })
    .await;
    cp.kubectl(["label", "node", NODE, "example.com/rack=7"])
        .unwrap();
    drop(agent);
    s.labels.remove("example.com/role");
    let _agent = apiserver::start(s, Arc::new(Mutex::new(Vec::new())), None)
        .await
        .unwrap();
    let l = wait_until_long("the label taken off", || {
        labels().filter(|l| l.get("example.com/role").is_none())
    })
    .await;
    assert_eq!(
        l["example.com/rack"], "7",
        "the operator's label stays: {l}"
    );
    assert_eq!(l["topology.kubernetes.io/zone"], "site-7", "{l}");
    assert_eq!(l["kubernetes.io/hostname"], NODE, "{l}");
    // A condition another component sets on the Node stays through noded's status
    // patches (conditions merge by type).
    cp.kubectl([
        "patch",
        "node",
        NODE,
        "--subresource=status",
        "--type=strategic",
        "-p",
        r#"{"status": {"conditions": [{"type": "example.com/SensorBus", "status": "True",
            "reason": "Probed", "message": "bus up"}]}}"#,
    ])
    .unwrap();
    let ours = |n: &Value, kind: &str| {
        n["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == kind).cloned())
    };
    let first = ours(&cp.get(&["node", NODE]).unwrap(), "Ready").unwrap();
    let node = wait_until_long("noded's next status patch", || {
        cp.get(&["node", NODE]).ok().filter(|n| {
            ours(n, "Ready").is_some_and(|r| r["lastHeartbeatTime"] != first["lastHeartbeatTime"])
        })
    })
    .await;
    let other = ours(&node, "example.com/SensorBus");
    assert!(
        other.is_some_and(|c| c["status"] == "True"),
        "the other condition was lost: {node}"
    );
}

/// Under memory pressure (the threshold raised above what the host has) noded evicts
/// the pods from the API server one at a time, BestEffort before Guaranteed: the
/// evicted pod is `Failed` with reason `Evicted` at the server, with an `Evicted` event,
/// its cached manifest goes and it is not cached again when the server's updates of it
/// arrive; the Node reports MemoryPressure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_memory_pressure_pods_are_evicted_besteffort_first() {
    let dir = tempfile::tempdir().unwrap();
    let Some((cp, mut s)) = upstream_node(dir.path()).await else {
        return;
    };
    let cache = s.cache_dir.clone();
    let status: Status = Arc::new(Mutex::new(Vec::new()));
    let _agent = apiserver::start(s.clone(), status.clone(), None)
        .await
        .unwrap();
    let pod = |name: &str, resources: &str| {
        format!(
            r#"{{"apiVersion": "v1", "kind": "Pod",
   "metadata": {{"name": "{name}", "namespace": "default"}},
   "spec": {{"nodeName": "edge-a", "hostNetwork": true, "automountServiceAccountToken": false,
     "containers": [{{"name": "main", "image": "edge.local/hello:1", "resources": {resources}}}]}}}}"#
        )
    };
    cp.apply(&pod("best", "{}")).unwrap();
    cp.apply(&pod(
        "sure",
        r#"{"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}}"#,
    ))
    .unwrap();
    for f in ["default_best.yaml", "default_sure.yaml"] {
        wait_until_long("both pods cached", || cached(&cache, f)).await;
    }
    *status.lock().unwrap() = vec![
        running_report("default_best.yaml", "best", 0),
        running_report("default_sure.yaml", "sure", 0),
    ];
    let cp = Arc::new(cp);
    let phase = |name: &str| {
        cp.get(&["pod", "-n", "default", name])
            .ok()
            .map(|p| (p["status"]["phase"].as_str().unwrap_or("").to_string(), p))
    };
    wait_until_long("both Running at the server", || {
        (phase("best")?.0 == "Running" && phase("sure")?.0 == "Running").then_some(())
    })
    .await;
    // Pressure: noded restarted with a memory threshold above what the host has, an
    // eviction every 3 s.
    drop(_agent);
    s.thresholds.memory_kib = u64::MAX / 2;
    s.eviction_every = Duration::from_secs(3);
    let _agent = apiserver::start(s, status.clone(), None).await.unwrap();
    let best = wait_until_long("the BestEffort pod evicted", || {
        phase("best").filter(|(p, _)| p == "Failed").map(|(_, p)| p)
    })
    .await;
    assert_eq!(best["status"]["reason"], "Evicted", "{best}");
    let message = best["status"]["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("The node was low on resource: memory."),
        "{best}"
    );
    assert_eq!(phase("sure").unwrap().0, "Running", "Guaranteed goes later");
    assert!(cached(&cache, "default_best.yaml").is_none());
    let events = cp
        .get(&[
            "events",
            "-n",
            "default",
            "--field-selector",
            "involvedObject.name=best,reason=Evicted",
        ])
        .unwrap();
    assert_eq!(
        events["items"].as_array().map(Vec::len),
        Some(1),
        "{events}"
    );
    let node = cp.get(&["node", NODE]).unwrap();
    assert!(
        node["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "MemoryPressure" && c["status"] == "True"),
        "{node}"
    );
    // The pressure stays: the Guaranteed pod goes next, and neither comes back.
    wait_until_long("the Guaranteed pod evicted", || {
        phase("sure").filter(|(p, _)| p == "Failed")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(cached(&cache, "default_best.yaml").is_none());
    assert!(cached(&cache, "default_sure.yaml").is_none());
}

/// A 64Mi ReadWriteOnce claim of `class` and a pod that mounts it, both named `name`.
fn claim_and_pod(name: &str, class: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: {name}, namespace: default}}
spec:
  storageClassName: {class}
  accessModes: [ReadWriteOnce]
  resources: {{requests: {{storage: 64Mi}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default}}
spec:
  automountServiceAccountToken: false
  hostNetwork: true
  containers: [{{name: main, image: "edge.local/hello:1",
    volumeMounts: [{{name: data, mountPath: /data}}]}}]
  volumes: [{{name: data, persistentVolumeClaim: {{claimName: {name}}}}}]
"#
    )
}

/// Claims from storaged, with noded as the provisioner for its own node: the operator
/// applies the example storage classes (image/examples/storage.yaml), a claim and a pod
/// that mounts it; the scheduler picks edge-a and names it in the claim, noded creates
/// the volume (at a CSI double: the host has no device-mapper for storaged) and the
/// PersistentVolume, the controller manager binds them and the scheduler the pod, whose
/// cached manifest has the volume as its `csi` volume. Grown at the core, the volume
/// grows and the claim's status says so; its filesystem is grown when it is staged next.
/// Deleted, the claim's volume is deleted with its PersistentVolume (kept, with the
/// policy Retain). A class parameter
/// storaged does not take is a ProvisioningFailed event naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_is_provisioned_from_storaged_grown_and_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let Some((cp, mut settings)) = upstream_node(dir.path()).await else {
        return;
    };
    let socket = dir.path().join("csi.sock");
    let double = common::csi::serve(&socket, &dir.path().join("volumes"));
    let state = dir.path().join("state");
    settings.csi_socket = Some(socket.clone());
    settings.state_dir = state.clone();
    let cache = settings.cache_dir.clone();
    let status: Status = Arc::new(Mutex::new(Vec::new()));
    let _agent = apiserver::start(settings, status, None).await.unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/examples/storage.yaml");
    cp.kubectl(["apply", "-f", examples.to_str().unwrap()])
        .unwrap();
    cp.apply(&claim_and_pod("db", "storaged-rwo")).unwrap();
    let pvc = wait_until_long("the claim bound", || {
        cp.get(&["pvc", "-n", "default", "db"])
            .ok()
            .filter(|c| c["status"]["phase"] == "Bound")
    })
    .await;
    let volume = format!("pvc-{}", pvc["metadata"]["uid"].as_str().unwrap());
    assert_eq!(pvc["spec"]["volumeName"], volume.as_str(), "{pvc}");
    assert_eq!(
        pvc["metadata"]["annotations"]["volume.kubernetes.io/selected-node"],
        NODE
    );
    let pv = cp.get(&["pv", &volume]).unwrap();
    assert_eq!(pv["spec"]["csi"]["driver"], "storaged.edgeos", "{pv}");
    assert_eq!(
        pv["spec"]["persistentVolumeReclaimPolicy"], "Delete",
        "{pv}"
    );
    let created = double
        .calls()
        .into_iter()
        .find(|c| c.method == "CreateVolume" && c.volume == volume)
        .expect("CreateVolume of the claim's volume");
    assert_eq!(created.size, 64 << 20);
    // The scheduler puts the pod here, and noded caches it with the claim's volume.
    let cached = cache.join("default_db.yaml");
    let manifest = wait_until_long("the pod cached with its volume", || {
        std::fs::read_to_string(&cached)
            .ok()
            .filter(|m| m.contains(&volume))
    })
    .await;
    let pod = noded::manifest::parse("db", &manifest).unwrap();
    match &pod.volumes[0].source {
        noded::manifest::VolumeSource::Csi(c) => {
            assert_eq!(c.volume, volume);
            assert_eq!(c.access_mode, noded::manifest::AccessMode::ReadWriteOnce);
            assert_eq!(c.size_bytes, 64 << 20);
        }
        other => panic!("not a csi volume: {other:?}"),
    }
    let events = wait_until_long("ProvisioningSucceeded", || {
        cp.get(&[
            "events",
            "-n",
            "default",
            "--field-selector",
            "involvedObject.name=db",
        ])
        .ok()
        .filter(|l| {
            l["items"]
                .as_array()
                .is_some_and(|i| i.iter().any(|e| e["reason"] == "ProvisioningSucceeded"))
        })
    })
    .await;
    assert!(events.to_string().contains(&volume), "{events}");

    // Grown at the core: the volume grows, the claim's status says so, and as no pod
    // has it staged its filesystem is grown at its next stage.
    cp.kubectl([
        "patch",
        "-n",
        "default",
        "pvc/db",
        "-p",
        r#"{"spec": {"resources": {"requests": {"storage": "96Mi"}}}}"#,
    ])
    .unwrap();
    wait_until_long("the claim grown", || {
        cp.get(&["pvc", "-n", "default", "db"]).ok().filter(|c| {
            let cap = &c["status"]["capacity"]["storage"];
            *cap == "96Mi" || *cap == "100663296"
        })
    })
    .await;
    assert!(double
        .calls()
        .iter()
        .any(|c| c.method == "ControllerExpandVolume" && c.volume == volume && c.size == 96 << 20));
    let volumes = noded::volumes::Volumes::new(Some(socket), state.clone());
    volumes.attach("u1", &pod).await.unwrap();
    let calls = double.calls();
    let stage = calls
        .iter()
        .position(|c| c.method == "NodeStageVolume" && c.volume == volume)
        .expect("staged");
    assert!(
        calls[stage..]
            .iter()
            .any(|c| c.method == "NodeExpandVolume" && c.volume == volume),
        "{calls:#?}"
    );
    assert!(!state.join("csi/grow").join(&volume).exists());
    volumes.detach("u1", "default/db").await.unwrap();

    // Deleted: the pod, then its claim; the volume goes with its PersistentVolume.
    cp.kubectl(["delete", "-n", "default", "pod/db", "--wait=false"])
        .unwrap();
    cp.kubectl(["delete", "-n", "default", "pvc/db", "--wait=false"])
        .unwrap();
    wait_until_long("the PersistentVolume reclaimed", || {
        cp.get(&["pv"])
            .ok()
            .filter(|l| l["items"].as_array().is_some_and(|i| i.is_empty()))
    })
    .await;
    assert!(double
        .calls()
        .iter()
        .any(|c| c.method == "DeleteVolume" && c.volume == volume));

    // With the reclaim policy Retain, the volume and its PersistentVolume stay.
    cp.apply(
        r#"apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: kept}
provisioner: storaged.edgeos
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Retain
"#,
    )
    .unwrap();
    cp.apply(&claim_and_pod("kept", "kept")).unwrap();
    let kept = wait_until_long("the kept claim bound", || {
        cp.get(&["pvc", "-n", "default", "kept"])
            .ok()
            .filter(|c| c["status"]["phase"] == "Bound")
    })
    .await;
    let kept = kept["spec"]["volumeName"].as_str().unwrap().to_string();
    cp.kubectl([
        "delete",
        "-n",
        "default",
        "pod/kept",
        "pvc/kept",
        "--wait=false",
    ])
    .unwrap();
    wait_until_long("the kept volume released", || {
        cp.get(&["pv", &kept])
            .ok()
            .filter(|v| v["status"]["phase"] == "Released")
    })
    .await;
    // noded acts on each change it sees within a moment; give it a few.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        cp.get(&["pv", &kept]).is_ok(),
        "a Retain volume was deleted"
    );
    assert!(!double
        .calls()
        .iter()
        .any(|c| c.method == "DeleteVolume" && c.volume == kept));

    // A class that asks for what storaged does not take: told on the claim, by name.
    cp.apply(
        r#"apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: replicated}
provisioner: storaged.edgeos
volumeBindingMode: WaitForFirstConsumer
parameters: {replicas: "3"}
"#,
    )
    .unwrap();
    cp.apply(&claim_and_pod("bad", "replicated")).unwrap();
    let failed = wait_until_long("ProvisioningFailed", || {
        cp.get(&[
            "events",
            "-n",
            "default",
            "--field-selector",
            "involvedObject.name=bad",
        ])
        .ok()
        .and_then(|l| {
            l["items"]
                .as_array()?
                .iter()
                .find(|e| {
                    e["reason"] == "ProvisioningFailed" && e["source"]["component"] == "noded"
                })
                .cloned()
        })
    })
    .await;
    assert!(
        failed["message"].as_str().unwrap().contains("\"replicas\""),
        "{failed}"
    );
}

/// edge-tpm built from this tree (as fabricd's tests build it), next to noded's binary.
fn edge_tpm() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = std::process::Command::new(cargo)
        .args(["build", "-p", "edge-tpm", "--bin", "edge-tpm"])
        .status()
        .expect("run cargo");
    assert!(st.success(), "cargo build -p edge-tpm failed");
    Path::new(env!("CARGO_BIN_EXE_noded"))
        .parent()
        .unwrap()
        .join("edge-tpm")
}

/// The node's key in the TPM (swtpm here, edge-tpm built from this tree): with a
/// bootstrap token and `tpm_key`, noded makes its key in the TPM, asks for its
/// certificate with a request the TPM signed, and registers Ready under it, every TLS
/// handshake with the API server signed by the TPM. Its kubeconfig names the key's file,
/// which holds no private key; the certificate is for the TPM's public key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_key_is_made_in_the_tpm_and_never_leaves_it() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cp) = upstream(dir.path()).await else {
        return;
    };
    let program = tokio::task::block_in_place(edge_tpm);
    let tpm = swtpm::swtpm();
    let tcti = |t: &swtpm::Swtpm| format!("swtpm:host=127.0.0.1,port={}", t.port);
    // Only this test runs edge-tpm; noded's children take its TPM from the environment.
    std::env::set_var("EDGE_TPM_TCTI", tcti(&tpm));
    let (_, boot) = bootstrap_file(&cp, dir.path());
    let stored = dir.path().join("state/kubeconfig");
    let mut s = settings(stored.clone(), dir.path().join("cache"));
    s.bootstrap_kubeconfig = Some(boot);
    s.lease_duration = Duration::from_secs(10);
    s.tpm_program = Some(program.clone());
    let status: Status = Arc::new(Mutex::new(Vec::new()));
    let agent = apiserver::start(s.clone(), status.clone(), None)
        .await
        .unwrap();
    let ready = |n: &Value| {
        n["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
    };
    wait_until_long("the node Ready under its TPM key", || {
        cp.get(&["node", NODE]).ok().filter(ready)
    })
    .await;
    drop(agent);
    let k: Value = serde_yaml::from_str(&std::fs::read_to_string(&stored).unwrap()).unwrap();
    let user = &k["users"][0]["user"];
    assert!(user.get("client-key-data").is_none(), "{k}");
    let key_file = PathBuf::from(user["client-key"].as_str().expect("client-key"));
    let blob = std::fs::read(&key_file).unwrap();
    let text = String::from_utf8_lossy(&blob);
    assert!(
        !text.contains("PRIVATE KEY") && text.contains("\"private\""),
        "the key file is the TPM's wrapped blob: {text}"
    );
    let out = std::process::Command::new(&program)
        .args(["site-key", "public"])
        .env("EDGE_TPM_TCTI", tcti(&tpm))
        .stdin(std::fs::File::open(&key_file).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = String::from_utf8_lossy(&out.stdout).into_owned();
    let cert = {
        use base64::Engine;
        let b64 = user["client-certificate-data"].as_str().unwrap();
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap()
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(&cert).unwrap();
    let cert = pem.parse_x509().unwrap();
    let (_, spki) = x509_parser::pem::parse_x509_pem(public.as_bytes()).unwrap();
    assert_eq!(
        cert.public_key().raw,
        &spki.contents[..],
        "the certificate is for the TPM's key"
    );

    std::env::remove_var("EDGE_TPM_TCTI");
}
