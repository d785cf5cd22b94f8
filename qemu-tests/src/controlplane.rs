//! An upstream Kubernetes control plane on loopback, for the tests and `cargo xtask core`:
//! etcd, kube-apiserver, kube-controller-manager and kube-scheduler as xtask builds them
//! from their pinned source (xtask/src/controlplane.rs), with a CA and certificates made
//! with openssl, the Node authorizer and NodeRestriction on, as a production control
//! plane has them.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::core::{free_port, issue, make_ca, run};
use crate::process::Group;

/// The pinned releases (`k8s.io/kubernetes` and `go.etcd.io/etcd/server/v3`).
pub const KUBERNETES: &str = "v1.37.2";
pub const ETCD: &str = "v3.6.16";
/// The `k8s.io/*` staging modules' release that matches [`KUBERNETES`].
pub const KUBERNETES_STAGING: &str = "v0.37.2";
/// The Konnectivity service (`sigs.k8s.io/apiserver-network-proxy`): its server is the
/// core's end of the tunnel boxes dial out to, through which the API server reaches
/// each box's kubelet API (`kubectl logs`).
pub const KONNECTIVITY: &str = "v0.36.0";

/// Where a guest reaches konnectivity-server's agent port (a guest forward to
/// [`ControlPlane::tunnel_port`]), as [`ControlPlane::provision_bundle`] tells noded.
pub const GUEST_TUNNEL: &str = "10.0.2.100:8132";

/// Where a guest finds the files of [`ControlPlane::kube_bundle`]: its provisioning
/// bundle's `kube/`.
pub const GUEST_KUBE: &str = "/var/lib/edge/provision/kube";

/// The programs xtask builds, all in [`bin_dir`].
pub const PROGRAMS: [&str; 6] = [
    "etcd",
    "konnectivity-server",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
];

/// Where the pinned build lives: `<cache>/controlplane/<pins>`, the cache being
/// `EDGEOS_CACHE` or `~/.cache/edgeos` as for the image's packages.
pub fn cache_dir() -> Result<PathBuf> {
    let root = match std::env::var_os("EDGEOS_CACHE").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
            .join(".cache/edgeos"),
    };
    Ok(root.join("controlplane").join(format!(
        "kubernetes-{KUBERNETES}-etcd-{ETCD}-konnectivity-{KONNECTIVITY}"
    )))
}

/// The built programs' directory: `EDGEOS_CONTROLPLANE_BIN` if set, else the cache's.
pub fn bin_dir() -> Result<PathBuf> {
    match std::env::var_os("EDGEOS_CONTROLPLANE_BIN").filter(|d| !d.is_empty()) {
        Some(d) => Ok(PathBuf::from(d)),
        None => Ok(cache_dir()?.join("bin")),
    }
}

/// The directory holding every program, when it does.
pub fn built() -> Option<PathBuf> {
    let bin = bin_dir().ok()?;
    PROGRAMS
        .iter()
        .all(|p| bin.join(p).is_file())
        .then_some(bin)
}

/// The certificates' extensions: the API server is reached on loopback and, from a
/// guest, at QEMU's forward address 10.0.2.100.
const EXTENSIONS: &str = "[server]\nbasicConstraints=CA:FALSE\n\
    keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n\
    subjectAltName=IP:127.0.0.1,IP:10.0.2.100,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,\
    DNS:kubernetes.default.svc\n\
    [client]\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
    extendedKeyUsage=clientAuth\n";

/// A running control plane; stopped (every process killed) when dropped.
pub struct ControlPlane {
    pub dir: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    pub port: u16,
    /// konnectivity-server's agent port on loopback, which boxes dial out to (noded's
    /// `[apiserver] tunnel`) so that the API server reaches their kubelet API.
    pub tunnel_port: u16,
    /// Where its programs are (kubectl too).
    bin: PathBuf,
    processes: Vec<Group>,
}

impl ControlPlane {
    /// Starts etcd and konnectivity-server, then kube-apiserver (waited for until
    /// `/readyz` says ok) with its egress to the nodes through konnectivity-server, then
    /// the controller manager and the scheduler, each logging to `<name>.log` in `dir`.
    pub fn start(bin: &Path, dir: &Path) -> Result<ControlPlane> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ext.cnf"), EXTENSIONS)?;
        make_ca(dir, "edgeos core CA")?;
        issue(dir, "apiserver", "/CN=kube-apiserver", "server")?;
        issue(
            dir,
            "admin",
            "/O=system:masters/CN=edgeos-operator",
            "client",
        )?;
        run(Command::new("openssl").current_dir(dir).args([
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "service-accounts.key",
        ]))?;
        run(Command::new("openssl").current_dir(dir).args([
            "ec",
            "-in",
            "service-accounts.key",
            "-pubout",
            "-out",
            "service-accounts.pub",
        ]))?;
        // The API server's client certificate towards kubelets (noded authorizes it
        // with a SubjectAccessReview, as kubelet does), and konnectivity-server's
        // serving one for the boxes' tunnels.
        issue(
            dir,
            "apiserver-kubelet-client",
            "/O=system:masters/CN=kube-apiserver-kubelet-client",
            "client",
        )?;
        issue(dir, "konnectivity", "/CN=konnectivity-server", "server")?;
        let port = free_port()?;
        let tunnel_port = free_port()?;
        let mut cp = ControlPlane {
            dir: dir.to_path_buf(),
            url: format!("https://127.0.0.1:{port}"),
            port,
            tunnel_port,
            bin: bin.to_path_buf(),
            processes: Vec::new(),
        };
        let (etcd_client, etcd_peer) = (free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        cp.spawn(
            bin,
            "etcd",
            &[
                "--name=core",
                &format!("--data-dir={}", dir.join("etcd").display()),
                &format!("--listen-client-urls={etcd_url}"),
                &format!("--advertise-client-urls={etcd_url}"),
                &format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
                &format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
                &format!("--initial-cluster=core=http://127.0.0.1:{etcd_peer}"),
                "--log-level=warn",
            ],
        )?;
        let f = |name: &str| dir.join(name).display().to_string();
        // The API server reaches konnectivity-server on a unix socket; a box's agent
        // names itself with its node's name and address, which the API server dials.
        let uds = f("konnectivity.sock");
        cp.spawn(
            bin,
            "konnectivity-server",
            &[
                "--mode=grpc",
                &format!("--uds-name={uds}"),
                "--delete-existing-uds-file",
                "--server-port=0",
                "--agent-bind-address=127.0.0.1",
                &format!("--agent-port={tunnel_port}"),
                "--admin-bind-address=127.0.0.1",
                &format!("--admin-port={}", free_port()?),
                "--health-bind-address=127.0.0.1",
                &format!("--health-port={}", free_port()?),
                &format!("--cluster-cert={}", f("konnectivity.pem")),
                &format!("--cluster-key={}", f("konnectivity.key")),
                &format!("--cluster-ca-cert={}", f("ca.pem")),
                "--server-count=1",
                "--proxy-strategies=destHost",
            ],
        )?;
        std::fs::write(
            dir.join("egress.yaml"),
            format!(
                "apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\n\
                 egressSelections:\n- name: cluster\n  connection:\n    proxyProtocol: GRPC\n\
                 \x20   transport:\n      uds:\n        udsName: {uds}\n"
            ),
        )?;
        cp.spawn(
            bin,
            "kube-apiserver",
            &[
                &format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1",
                // One server on loopback: the `kubernetes` service's endpoints are not
                // kept (they may not be a loopback address).
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
                &format!("--secure-port={port}"),
                &format!("--tls-cert-file={}", f("apiserver.pem")),
                &format!("--tls-private-key-file={}", f("apiserver.key")),
                &format!("--client-ca-file={}", f("ca.pem")),
                &format!("--service-account-key-file={}", f("service-accounts.pub")),
                &format!(
                    "--service-account-signing-key-file={}",
                    f("service-accounts.key")
                ),
                "--service-account-issuer=https://kubernetes.default.svc",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                // Boxes join with a bootstrap token and ask for their own certificate.
                "--enable-bootstrap-token-auth",
                "--service-cluster-ip-range=10.96.0.0/16",
                &format!("--egress-selector-config-file={}", f("egress.yaml")),
                &format!(
                    "--kubelet-client-certificate={}",
                    f("apiserver-kubelet-client.pem")
                ),
                &format!("--kubelet-client-key={}", f("apiserver-kubelet-client.key")),
                // kubeadm's order: a node's InternalIP before its name. A tunnelled box
                // reports no InternalIP (noded's node.rs), so dials still go by name.
                "--kubelet-preferred-address-types=InternalIP,ExternalIP,Hostname",
            ],
        )?;
        let admin = cp.admin_kubeconfig();
        std::fs::write(&admin, cp.kubeconfig("admin"))?;
        cp.wait_ready(Duration::from_secs(90))?;
        let kubeconfig = format!("--kubeconfig={}", admin.display());
        cp.spawn(
            bin,
            "kube-controller-manager",
            &[
                &kubeconfig,
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                &format!("--secure-port={}", free_port()?),
                &format!(
                    "--service-account-private-key-file={}",
                    f("service-accounts.key")
                ),
                &format!("--root-ca-file={}", f("ca.pem")),
                // A node silent for 20 s is NotReady (the default is 50 s), so that a
                // test's link cut shows within its time.
                "--node-monitor-grace-period=20s",
                "--node-monitor-period=2s",
                // Node client certificates asked for with a CertificateSigningRequest.
                &format!("--cluster-signing-cert-file={}", f("ca.pem")),
                &format!("--cluster-signing-key-file={}", f("ca.key")),
            ],
        )?;
        cp.spawn(
            bin,
            "kube-scheduler",
            &[
                &kubeconfig,
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                &format!("--secure-port={}", free_port()?),
            ],
        )?;
        Ok(cp)
    }

    fn spawn(&mut self, bin: &Path, name: &str, args: &[&str]) -> Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let mut cmd = Command::new(bin.join(name));
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.processes.push(Group::spawn(name, cmd)?);
        Ok(())
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self
                .kubectl(["get", "--raw", "/readyz"])
                .unwrap_or_default();
            if out.trim() == "ok" {
                return Ok(());
            }
            for p in &mut self.processes {
                if let Some(st) = p.try_wait()? {
                    bail!("{} exited ({st}) before the API server was ready", p.name());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "kube-apiserver not ready within {timeout:?} (see {})",
                    self.dir.join("kube-apiserver.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The operator's kubeconfig (group system:masters).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// A kubeconfig for the certificate `<user>.pem` in the directory.
    fn kubeconfig(&self, user: &str) -> String {
        kubeconfig_text(&self.url, &self.dir, user)
    }

    /// A bootstrap token for nodes to join with (`<id>.<secret>`, valid a day): a
    /// `bootstrap.kubernetes.io/token` Secret, and the bindings kubeadm also makes, which
    /// let the token's group `system:bootstrappers` ask for node client certificates
    /// that the controller manager approves and signs by itself.
    pub fn bootstrap_token(&self) -> Result<String> {
        let random = |n: usize| -> Result<String> {
            let mut bytes = vec![0u8; n];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
                .context("failed to read /dev/urandom")?;
            const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
            Ok(bytes
                .iter()
                .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
                .collect())
        };
        let (id, secret) = (random(6)?, random(16)?);
        let expires = time_in_a_day()?;
        // kubeadm's bindings: the token's group may ask for node client certificates
        // (and have them approved), nodes may renew their own.
        let binding = |name: &str, role: &str, group: &str| {
            format!(
                r#"{{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
    "metadata": {{"name": "{name}"}},
    "roleRef": {{"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "{role}"}},
    "subjects": [{{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "{group}"}}]}}"#
            )
        };
        let csr = "system:certificates.k8s.io:certificatesigningrequests";
        let bindings = [
            binding(
                "edgeos:node-bootstrapper",
                "system:node-bootstrapper",
                "system:bootstrappers",
            ),
            binding(
                "edgeos:node-autoapprove-bootstrap",
                &format!("{csr}:nodeclient"),
                "system:bootstrappers",
            ),
            binding(
                "edgeos:node-autoapprove-renewal",
                &format!("{csr}:selfnodeclient"),
                "system:nodes",
            ),
        ];
        self.apply(&format!(
            r#"{{"apiVersion": "v1", "kind": "List", "items": [
  {{"apiVersion": "v1", "kind": "Secret", "type": "bootstrap.kubernetes.io/token",
    "metadata": {{"name": "bootstrap-token-{id}", "namespace": "kube-system"}},
    "stringData": {{"token-id": "{id}", "token-secret": "{secret}",
      "expiration": "{expires}", "usage-bootstrap-authentication": "true",
      "description": "edgeos boxes join with this"}}}},
  {}]}}"#,
            bindings.join(",\n  ")
        ))?;
        Ok(format!("{id}.{secret}"))
    }

    /// A kubeconfig for another machine that joins with `token`: `server`, and the CA at
    /// `ca_path` there.
    pub fn bootstrap_kubeconfig(server: &str, ca_path: &Path, token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: core\n  cluster:\n    \
             server: {server}\n    certificate-authority: {}\nusers:\n- name: bootstrap\n  \
             user:\n    token: {token}\ncontexts:\n- name: core\n  context:\n    \
             cluster: core\n    user: bootstrap\ncurrent-context: core\n",
            ca_path.display()
        )
    }

    /// A box's provisioning for this control plane, which the guest reaches at
    /// 10.0.2.100:6443 and its tunnel at [`GUEST_TUNNEL`] (guest forwards): noded's
    /// `apiserver_file` (`noded-apiserver.toml`, with `zone`) and a bootstrap kubeconfig with `token`
    /// ([`ControlPlane::bootstrap_token`]) and the core's CA, under
    /// /var/lib/edge/provision/kube; the box asks for its own node certificate with them,
    /// for a key it makes in its TPM (`tpm_key`).
    pub fn provision_bundle(&self, zone: &str, token: &str) -> Result<String> {
        let mut bundle = crate::core::toml_string(
            "noded-apiserver.toml",
            &format!(
                "kubeconfig = \"/var/lib/edge/noded/kubeconfig\"\n\
                 bootstrap_kubeconfig = \"{GUEST_KUBE}/bootstrap.kubeconfig\"\nzone = \"{zone}\"\n\
                 tunnel = \"{GUEST_TUNNEL}\"\ntpm_key = true\n"
            ),
        );
        bundle.push_str(&self.kube_bundle(token)?);
        Ok(bundle)
    }

    /// The part of a provisioning bundle any node agent joins with: the bootstrap
    /// kubeconfig and the cluster's CA, in the guest's [`GUEST_KUBE`].
    pub fn kube_bundle(&self, token: &str) -> Result<String> {
        let mut bundle = crate::core::toml_string(
            "kube/bootstrap.kubeconfig",
            &ControlPlane::bootstrap_kubeconfig(
                "https://10.0.2.100:6443",
                &Path::new(GUEST_KUBE).join("ca.pem"),
                token,
            ),
        );
        bundle.push_str(&crate::core::toml_string(
            "kube/ca.pem",
            &std::fs::read_to_string(self.dir.join("ca.pem"))?,
        ));
        Ok(bundle)
    }

    /// A node's kubeconfig: a client certificate for `system:node:<node>` in the group
    /// `system:nodes`, which the Node authorizer limits to that node's objects.
    pub fn node_kubeconfig(&self, node: &str) -> Result<PathBuf> {
        let user = format!("node-{node}");
        issue(
            &self.dir,
            &user,
            &format!("/O=system:nodes/CN=system:node:{node}"),
            "client",
        )?;
        let path = self.dir.join(format!("{user}.kubeconfig"));
        std::fs::write(&path, self.kubeconfig(&user))?;
        Ok(path)
    }

    /// kubectl as the operator; its output, or its error output in the error.
    pub fn kubectl<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        run(self.kubectl_command().args(args))
    }

    /// kubectl as the operator, to be given its arguments and run (`kubectl logs -f`).
    pub fn kubectl_command(&self) -> Command {
        let mut c = Command::new(self.bin.join("kubectl"));
        c.arg(format!(
            "--kubeconfig={}",
            self.admin_kubeconfig().display()
        ));
        c
    }

    /// `kubectl apply` of `manifest` (YAML or JSON), through a file in the directory.
    pub fn apply(&self, manifest: &str) -> Result<String> {
        let file = self.dir.join("applied.yaml");
        std::fs::write(&file, manifest)?;
        self.kubectl([
            std::ffi::OsStr::new("apply"),
            "-f".as_ref(),
            file.as_os_str(),
        ])
    }

    /// `kubectl get <what> -o json`, parsed.
    pub fn get(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend(["-o", "json"]);
        let out = self.kubectl(&a)?;
        serde_json::from_str(&out).with_context(|| format!("kubectl get {args:?}: {out}"))
    }
}

/// RFC 3339, a day from now, as a bootstrap token's expiration.
fn time_in_a_day() -> Result<String> {
    let out = run(Command::new("date").args(["-u", "-d", "+1 day", "+%Y-%m-%dT%H:%M:%SZ"]))?;
    Ok(out.trim().to_string())
}

/// A kubeconfig for `server` with the CA `ca.pem` and the client certificate
/// `<user>.pem` / `<user>.key` in `files_dir`.
fn kubeconfig_text(server: &str, files_dir: &Path, user: &str) -> String {
    let f = |name: &str| files_dir.join(name).display().to_string();
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: core\n  cluster:\n    \
         server: {server}\n    certificate-authority: {}\nusers:\n- name: {user}\n  user:\n    \
         client-certificate: {}\n    client-key: {}\ncontexts:\n- name: core\n  context:\n    \
         cluster: core\n    user: {user}\ncurrent-context: core\n",
        f("ca.pem"),
        f(&format!("{user}.pem")),
        f(&format!("{user}.key")),
    )
}

impl ControlPlane {
    /// Leaves the processes running after this handle (`cargo xtask core up`): their
    /// process group ids, for `core down` to stop.
    pub fn detach(mut self) -> Vec<(String, u32)> {
        self.processes
            .drain(..)
            .map(|p| (p.name().to_string(), p.detach()))
            .collect()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The API server first, so nothing writes to etcd as it goes.
        for p in self.processes.iter_mut().rev() {
            p.kill();
        }
    }
}
