//! A container: image, command, env, ports, resources, volume mounts and devices, and
//! its probes.

use serde_yaml::{Mapping, Value};

use super::checks::{check_dns_label, join, parse_cpu, parse_memory, quantity_text};
use super::walker::Walker;
use super::{
    Container, Port, Probe, ProbeAction, Protocol, PullPolicy, Volume, VolumeDevice, VolumeMount,
    VolumeSource,
};
use crate::error::Result;

impl Walker<'_> {
    pub(super) fn container(
        &self,
        v: &Value,
        path: &str,
        init: bool,
        volumes: &[Volume],
    ) -> Result<Container> {
        let known: &[&str] = &[
            "name",
            "image",
            "imagePullPolicy",
            "command",
            "args",
            "env",
            "resources",
            "ports",
            "volumeMounts",
            "volumeDevices",
            "livenessProbe",
            "readinessProbe",
            "startupProbe",
        ];
        let m = self.map(v, path, known)?;
        let name = self.required(m, path, "name")?;
        check_dns_label(&name).map_err(self.bad(&join(path, "name")))?;
        let image = self.required(m, path, "image")?;
        let pull_policy = match self.string(m, path, "imagePullPolicy")?.as_deref() {
            None => PullPolicy::default_for(&image),
            Some("Always") => PullPolicy::Always,
            Some("IfNotPresent") => PullPolicy::IfNotPresent,
            Some("Never") => PullPolicy::Never,
            Some(other) => {
                return Err(self.err(
                    &join(path, "imagePullPolicy"),
                    &format!("is {other:?}, not Always, IfNotPresent or Never"),
                ))
            }
        };
        let command = self.strings(m, path, "command")?;
        let args = self.strings(m, path, "args")?;

        let mut env = Vec::new();
        for (i, e) in self.list(m, path, "env")?.iter().enumerate() {
            let p = format!("{path}.env[{i}]");
            let em = self.map(e, &p, &["name", "value"])?;
            let key = self.required(em, &p, "name")?;
            let value = match em.get("value") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                // YAML turns `value: 3` into a number; Kubernetes rejects it, and so do we,
                // rather than guess at its spelling.
                Some(_) => return Err(self.err(&join(&p, "value"), "must be a string")),
            };
            env.push((key, value));
        }

        let (mut cpu_limit_millis, mut memory_limit_bytes) = (None, None);
        if let Some(r) = m.get("resources") {
            let rp = join(path, "resources");
            let rm = self.map(r, &rp, &["limits", "requests"])?;
            // Requests only place pods on nodes; on a single node they change nothing.
            if let Some(req) = rm.get("requests") {
                self.map(req, &join(&rp, "requests"), &["cpu", "memory"])?;
            }
            if let Some(l) = rm.get("limits") {
                let lp = join(&rp, "limits");
                let lm = self.map(l, &lp, &["cpu", "memory"])?;
                if let Some(q) = lm.get("cpu") {
                    let s = quantity_text(q)
                        .ok_or_else(|| self.err(&join(&lp, "cpu"), "must be a quantity"))?;
                    cpu_limit_millis = Some(parse_cpu(&s).map_err(self.bad(&join(&lp, "cpu")))?);
                }
                if let Some(q) = lm.get("memory") {
                    let s = quantity_text(q)
                        .ok_or_else(|| self.err(&join(&lp, "memory"), "must be a quantity"))?;
                    memory_limit_bytes =
                        Some(parse_memory(&s).map_err(self.bad(&join(&lp, "memory")))?);
                }
            }
        }

        let mut ports = Vec::new();
        let mut port_names = Vec::new();
        let port_list = self.list(m, path, "ports")?;
        if init && !port_list.is_empty() {
            return Err(self.err(&join(path, "ports"), "is not allowed on an init container"));
        }
        for (i, p) in port_list.iter().enumerate() {
            let pp = format!("{path}.ports[{i}]");
            let pm = self.map(p, &pp, &["containerPort", "hostPort", "protocol", "name"])?;
            let container_port = self
                .int(pm, &pp, "containerPort")?
                .ok_or_else(|| self.err(&join(&pp, "containerPort"), "is required"))?;
            let host_port = self.int(pm, &pp, "hostPort")?;
            let port_range = |v: i64, key: &str| {
                if (1..=65535).contains(&v) {
                    Ok(v as i32)
                } else {
                    Err(self.err(&join(&pp, key), "must be between 1 and 65535"))
                }
            };
            let protocol = match self.string(pm, &pp, "protocol")?.as_deref() {
                None | Some("TCP") => Protocol::Tcp,
                Some("UDP") => Protocol::Udp,
                Some("SCTP") => Protocol::Sctp,
                Some(other) => {
                    return Err(self.err(
                        &join(&pp, "protocol"),
                        &format!("is {other:?}, not TCP, UDP or SCTP"),
                    ))
                }
            };
            if let Some(name) = self.string(pm, &pp, "name")? {
                port_names.push((name, port_range(container_port, "containerPort")?));
            }
            ports.push(Port {
                container_port: port_range(container_port, "containerPort")?,
                host_port: host_port.map(|h| port_range(h, "hostPort")).transpose()?,
                protocol,
            });
        }

        let mut volume_mounts = Vec::new();
        for (i, vm) in self.list(m, path, "volumeMounts")?.iter().enumerate() {
            let p = format!("{path}.volumeMounts[{i}]");
            let mm = self.map(vm, &p, &["name", "mountPath", "readOnly"])?;
            let mount_path = self.required(mm, &p, "mountPath")?;
            if !mount_path.starts_with('/') {
                return Err(self.err(&join(&p, "mountPath"), "must be an absolute path"));
            }
            let name = self.required(mm, &p, "name")?;
            match volumes.iter().find(|v| v.name == name).map(|v| &v.source) {
                None => {
                    return Err(self.err(
                        &join(&p, "name"),
                        &format!("names volume {name:?}, which spec.volumes does not list"),
                    ))
                }
                Some(VolumeSource::Csi(c)) if c.block => {
                    return Err(self.err(
                        &join(&p, "name"),
                        &format!(
                        "names volume {name:?}, a Block volume, which has no filesystem to mount"
                    ),
                    ))
                }
                Some(_) => {}
            }
            volume_mounts.push(VolumeMount {
                name,
                mount_path,
                read_only: self.boolean(mm, &p, "readOnly")?,
            });
        }

        let mut volume_devices: Vec<VolumeDevice> = Vec::new();
        for (i, vd) in self.list(m, path, "volumeDevices")?.iter().enumerate() {
            let p = format!("{path}.volumeDevices[{i}]");
            let dm = self.map(vd, &p, &["name", "devicePath"])?;
            let device_path = self.required(dm, &p, "devicePath")?;
            if !device_path.starts_with('/') {
                return Err(self.err(&join(&p, "devicePath"), "must be an absolute path"));
            }
            if volume_devices.iter().any(|d| d.device_path == device_path)
                || volume_mounts.iter().any(|m| m.mount_path == device_path)
            {
                return Err(self.err(
                    &join(&p, "devicePath"),
                    &format!("{device_path:?} is already used by another volume of the container"),
                ));
            }
            let name = self.required(dm, &p, "name")?;
            match volumes.iter().find(|v| v.name == name).map(|v| &v.source) {
                None => {
                    return Err(self.err(
                        &join(&p, "name"),
                        &format!("names volume {name:?}, which spec.volumes does not list"),
                    ))
                }
                Some(VolumeSource::Csi(c)) if c.block => {}
                Some(_) => {
                    return Err(self.err(
                        &join(&p, "name"),
                        &format!(
                            "names volume {name:?}, which is not a Block csi volume \
                             (volumeAttributes.volumeMode: Block); mount it with volumeMounts"
                        ),
                    ))
                }
            }
            volume_devices.push(VolumeDevice { name, device_path });
        }

        let mut probes = [None, None, None];
        for (slot, key) in
            probes
                .iter_mut()
                .zip(["livenessProbe", "readinessProbe", "startupProbe"])
        {
            let Some(v) = m.get(key) else { continue };
            let pp = join(path, key);
            if init {
                return Err(self.err(&pp, "is not allowed on an init container"));
            }
            // Kubernetes: liveness and startup probes must succeed once to count.
            let single_success = key != "readinessProbe";
            *slot = Some(self.probe(v, &pp, single_success, &port_names)?);
        }
        let [liveness_probe, readiness_probe, startup_probe] = probes;

        Ok(Container {
            liveness_probe,
            readiness_probe,
            startup_probe,
            name,
            image,
            pull_policy,
            command,
            args,
            env,
            cpu_limit_millis,
            memory_limit_bytes,
            ports,
            volume_mounts,
            volume_devices,
        })
    }

    pub(super) fn probe(
        &self,
        v: &Value,
        path: &str,
        single_success: bool,
        port_names: &[(String, i32)],
    ) -> Result<Probe> {
        let m = self.map(
            v,
            path,
            &[
                "exec",
                "httpGet",
                "tcpSocket",
                "initialDelaySeconds",
                "periodSeconds",
                "timeoutSeconds",
                "successThreshold",
                "failureThreshold",
            ],
        )?;
        let seconds = |key: &str, default: u32, min: i64| -> Result<u32> {
            match self.int(m, path, key)? {
                None => Ok(default),
                Some(n) if n >= min && n <= i64::from(u32::MAX) => Ok(n as u32),
                Some(_) => Err(self.err(&join(path, key), &format!("must be at least {min}"))),
            }
        };
        let success_threshold = seconds("successThreshold", 1, 1)?;
        if single_success && success_threshold != 1 {
            return Err(self.err(&join(path, "successThreshold"), "must be 1"));
        }
        let handlers: Vec<&str> = ["exec", "httpGet", "tcpSocket"]
            .into_iter()
            .filter(|k| m.contains_key(*k))
            .collect();
        let action = match handlers.as_slice() {
            ["exec"] => {
                let ep = join(path, "exec");
                let em = self.map(&m["exec"], &ep, &["command"])?;
                let command = self.strings(em, &ep, "command")?;
                if command.is_empty() {
                    return Err(self.err(&join(&ep, "command"), "is required"));
                }
                ProbeAction::Exec { command }
            }
            ["httpGet"] => {
                let hp = join(path, "httpGet");
                let hm = self.map(
                    &m["httpGet"],
                    &hp,
                    &["path", "port", "host", "scheme", "httpHeaders"],
                )?;
                match self.string(hm, &hp, "scheme")?.as_deref() {
                    None | Some("HTTP") => {}
                    Some(other) => {
                        return Err(self.err(
                            &join(&hp, "scheme"),
                            &format!("{other:?} is not supported yet (only HTTP)"),
                        ))
                    }
                }
                let probe_path = self.string(hm, &hp, "path")?.unwrap_or_else(|| "/".into());
                if !probe_path.starts_with('/') || probe_path.contains(|c: char| c.is_whitespace())
                {
                    return Err(
                        self.err(&join(&hp, "path"), "must start with / and have no spaces")
                    );
                }
                let mut headers = Vec::new();
                for (i, h) in self.list(hm, &hp, "httpHeaders")?.iter().enumerate() {
                    let p = format!("{hp}.httpHeaders[{i}]");
                    let hm = self.map(h, &p, &["name", "value"])?;
                    let name = self.required(hm, &p, "name")?;
                    let value = self.string(hm, &p, "value")?.unwrap_or_default();
                    if name.contains(|c: char| c == ':' || c.is_control() || c.is_whitespace())
                        || value.contains(|c: char| c.is_control())
                    {
                        return Err(self.err(&p, "is not a valid HTTP header"));
                    }
                    headers.push((name, value));
                }
                ProbeAction::HttpGet {
                    host: self.probe_host(hm, &hp)?,
                    port: self.probe_port(hm, &hp, port_names)?,
                    path: probe_path,
                    headers,
                }
            }
            ["tcpSocket"] => {
                let tp = join(path, "tcpSocket");
                let tm = self.map(&m["tcpSocket"], &tp, &["port", "host"])?;
                ProbeAction::TcpSocket {
                    host: self.probe_host(tm, &tp)?,
                    port: self.probe_port(tm, &tp, port_names)?,
                }
            }
            [] => return Err(self.err(path, "must have one of exec, httpGet or tcpSocket")),
            _ => {
                return Err(self.err(
                    path,
                    &format!("must have only one of {}", handlers.join(", ")),
                ))
            }
        };
        Ok(Probe {
            action,
            initial_delay_seconds: seconds("initialDelaySeconds", 0, 0)?,
            period_seconds: seconds("periodSeconds", 10, 1)?,
            timeout_seconds: seconds("timeoutSeconds", 1, 1)?,
            success_threshold,
            failure_threshold: seconds("failureThreshold", 3, 1)?,
        })
    }

    pub(super) fn probe_host(&self, m: &Mapping, path: &str) -> Result<Option<String>> {
        match self.string(m, path, "host")? {
            Some(h) if h.is_empty() => Ok(None),
            Some(h) if h.contains(|c: char| c.is_whitespace() || c == '/') => {
                Err(self.err(&join(path, "host"), "is not a host name or address"))
            }
            h => Ok(h),
        }
    }

    /// A port number, or the name of one of the container's ports.
    pub(super) fn probe_port(
        &self,
        m: &Mapping,
        path: &str,
        names: &[(String, i32)],
    ) -> Result<u16> {
        let p = join(path, "port");
        match m.get("port") {
            Some(Value::Number(n)) => n
                .as_u64()
                .filter(|n| (1..=65535).contains(n))
                .map(|n| n as u16)
                .ok_or_else(|| self.err(&p, "must be between 1 and 65535")),
            Some(Value::String(name)) => names
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, port)| *port as u16)
                .ok_or_else(|| {
                    self.err(
                        &p,
                        &format!("names port {name:?}, which the container's ports do not list"),
                    )
                }),
            None | Some(Value::Null) => Err(self.err(&p, "is required")),
            Some(_) => Err(self.err(&p, "must be a port number or name")),
        }
    }
}
