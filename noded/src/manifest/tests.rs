use super::checks::{parse_cpu, parse_memory};
use super::*;

const GOOD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: cam
  namespace: edge
  labels: {app: cam}
spec:
  hostNetwork: true
  restartPolicy: OnFailure
  terminationGracePeriodSeconds: 5
  volumes:
    - name: scratch
      emptyDir: {}
    - name: models
      hostPath: {path: /var/lib/models, type: DirectoryOrCreate}
  initContainers:
    - name: fetch
      image: edge.local/fetch:1
      command: [/fetch]
  containers:
    - name: cam
      image: edge.local/cam:2
      command: [/cam]
      args: ["--fps", "5"]
      env:
        - {name: SITE, value: north}
        - {name: EMPTY}
      resources:
        limits: {cpu: 500m, memory: 64Mi}
        requests: {cpu: 100m}
      ports:
        - {containerPort: 8080, hostPort: 18080}
        - {containerPort: 9000, protocol: UDP}
      volumeMounts:
        - {name: scratch, mountPath: /tmp}
        - {name: models, mountPath: /models, readOnly: true}
"#;

fn err(text: &str) -> String {
    parse("pods/cam.yaml", text).unwrap_err().to_string()
}

/// GOOD with one line replaced: bad manifests differ from a good one in one place.
fn with(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "{from}");
    GOOD.replacen(from, to, 1)
}

#[test]
fn a_full_manifest_is_read_into_typed_fields() {
    let pod = parse("pods/cam.yaml", GOOD).unwrap();
    assert_eq!(pod.name, "cam");
    assert_eq!(pod.namespace, "edge");
    assert_eq!(pod.labels.get("app").map(String::as_str), Some("cam"));
    assert!(pod.host_network);
    assert_eq!(pod.restart_policy, RestartPolicy::OnFailure);
    assert_eq!(pod.termination_grace_period_seconds, 5);
    assert_eq!(pod.init_containers.len(), 1);
    assert_eq!(pod.init_containers[0].command, ["/fetch"]);
    let c = &pod.containers[0];
    assert_eq!(c.image, "edge.local/cam:2");
    assert_eq!(c.args, ["--fps", "5"]);
    assert_eq!(
        c.env,
        [
            ("SITE".into(), "north".into()),
            ("EMPTY".into(), String::new())
        ]
    );
    assert_eq!(c.cpu_limit_millis, Some(500));
    assert_eq!(c.memory_limit_bytes, Some(64 << 20));
    assert_eq!(
        c.ports,
        [
            Port {
                container_port: 8080,
                host_port: Some(18080),
                protocol: Protocol::Tcp
            },
            Port {
                container_port: 9000,
                host_port: None,
                protocol: Protocol::Udp
            }
        ]
    );
    assert_eq!(c.volume_mounts[1].mount_path, "/models");
    assert!(c.volume_mounts[1].read_only);
    assert!(!c.volume_mounts[0].read_only);
    assert_eq!(pod.volumes[0].source, VolumeSource::EmptyDir);
    assert_eq!(
        pod.volumes[1].source,
        VolumeSource::HostPath {
            path: "/var/lib/models".into(),
            create: true
        }
    );
}

#[test]
fn defaults_are_kubernetes_defaults() {
    let pod = parse(
        "p.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  containers: [{name: a, image: edge.local/a:1}]\n",
    )
    .unwrap();
    assert_eq!(pod.namespace, "default");
    assert_eq!(pod.restart_policy, RestartPolicy::Always);
    assert_eq!(pod.termination_grace_period_seconds, 30);
    assert!(!pod.host_network);
    assert_eq!(pod.containers[0].pull_policy, PullPolicy::IfNotPresent);
}

#[test]
fn images_are_pulled_as_kubernetes_pulls_them() {
    let policy = |image: &str, line: &str| {
        let text = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: a}}\nspec:\n  containers:\n  - name: a\n    image: {image}\n{line}"
        );
        parse("p.yaml", &text).unwrap().containers[0].pull_policy
    };
    // Untagged or `latest`: pulled each start; a tag or a digest: only when absent.
    for (image, want) in [
        ("edge.local/a", PullPolicy::Always),
        ("edge.local/a:latest", PullPolicy::Always),
        ("registry:5000/a", PullPolicy::Always),
        ("registry:5000/a:1.2", PullPolicy::IfNotPresent),
        ("edge.local/a:1", PullPolicy::IfNotPresent),
        ("edge.local/a@sha256:0123", PullPolicy::IfNotPresent),
    ] {
        assert_eq!(policy(image, ""), want, "{image}");
    }
    for (line, want) in [
        ("Always", PullPolicy::Always),
        ("IfNotPresent", PullPolicy::IfNotPresent),
        ("Never", PullPolicy::Never),
    ] {
        let given = policy("edge.local/a", &format!("    imagePullPolicy: {line}\n"));
        assert_eq!(given, want, "{line}");
    }
}

#[test]
fn unsupported_fields_are_named_by_path_and_file() {
    assert_eq!(
        err(&with(
            "      command: [/cam]\n",
            "      command: [/cam]\n      livenessProbe: {grpc: {port: 9000}}\n"
        )),
        "pods/cam.yaml: spec.containers[0].livenessProbe.grpc is not supported yet"
    );
    assert_eq!(
        err(&with(
            "      emptyDir: {}\n",
            "      persistentVolumeClaim: {claimName: x}\n"
        )),
        "pods/cam.yaml: spec.volumes[0].persistentVolumeClaim is not supported yet"
    );
    assert_eq!(
        err(&with(
            "      command: [/fetch]\n",
            "      command: [/fetch]\n      securityContext: {privileged: true}\n"
        )),
        "pods/cam.yaml: spec.initContainers[0].securityContext is not supported yet"
    );
    assert_eq!(
        err(&with(
            "  hostNetwork: true\n",
            "  hostNetwork: true\n  nodeSelector: {a: b}\n"
        )),
        "pods/cam.yaml: spec.nodeSelector is not supported yet"
    );
    assert!(
        err(&with("{name: EMPTY}", "{name: EMPTY, valueFrom: {x: y}}"))
            .ends_with("spec.containers[0].env[1].valueFrom is not supported yet")
    );
    assert!(
        err(&with("memory: 64Mi}", "memory: 64Mi, nvidia.com/gpu: 1}"))
            .ends_with("spec.containers[0].resources.limits.nvidia.com/gpu is not supported yet")
    );
}

#[test]
fn bad_values_are_named_by_path() {
    let cases = [
        (
            "cpu: 500m",
            "cpu: lots",
            "spec.containers[0].resources.limits.cpu",
        ),
        (
            "memory: 64Mi",
            "memory: 64Q",
            "spec.containers[0].resources.limits.memory",
        ),
        (
            "restartPolicy: OnFailure",
            "restartPolicy: Sometimes",
            "spec.restartPolicy",
        ),
        (
            "hostNetwork: true",
            "hostNetwork: yes please",
            "spec.hostNetwork",
        ),
        (
            "hostPort: 18080",
            "hostPort: 70000",
            "spec.containers[0].ports[0].hostPort",
        ),
        (
            "protocol: UDP",
            "protocol: QUIC",
            "spec.containers[0].ports[1].protocol",
        ),
        (
            "{name: models, mountPath",
            "{name: nope, mountPath",
            "spec.containers[0].volumeMounts[1].name",
        ),
        (
            "image: edge.local/cam:2",
            "image: \"\"",
            "spec.containers[0].image",
        ),
        (
            "name: cam\n  namespace",
            "name: Cam_1\n  namespace",
            "metadata.name",
        ),
        (
            "value: north",
            "value: 3",
            "spec.containers[0].env[0].value",
        ),
        ("kind: Pod", "kind: Deployment", "kind"),
        (
            "image: edge.local/cam:2",
            "image: edge.local/cam:2\n      imagePullPolicy: Sometimes",
            "spec.containers[0].imagePullPolicy",
        ),
        (
            "path: /var/lib/models",
            "path: models",
            "spec.volumes[1].hostPath.path",
        ),
    ];
    for (from, to, field) in cases {
        let e = err(&with(from, to));
        assert!(
            e.starts_with(&format!("pods/cam.yaml: {field} ")),
            "{from} -> {to}: {e}"
        );
    }
}

#[test]
fn structural_mistakes_are_reported() {
    assert!(err("a: [").contains("not valid YAML"));
    assert!(err("- 1\n").contains("manifest must be a mapping"));
    let no_containers = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: []}\n";
    assert!(err(no_containers).contains("spec.containers must list at least one"));
    let twice = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  initContainers: [{name: a, image: i}]\n  containers: [{name: a, image: i}]\n";
    assert!(err(twice).contains("names container \"a\" twice"));
}

#[test]
fn cpu_quantities() {
    assert_eq!(parse_cpu("500m").ok(), Some(500));
    assert_eq!(parse_cpu("2").ok(), Some(2000));
    assert_eq!(parse_cpu("0.5").ok(), Some(500));
    assert_eq!(parse_cpu("1.25").ok(), Some(1250));
    assert!(parse_cpu("0").is_err());
    assert!(parse_cpu("1.0001").is_err());
    assert!(parse_cpu("m").is_err());
    assert!(parse_cpu("-1").is_err());
    assert!(parse_cpu("2 cores").is_err());
}

#[test]
fn memory_quantities() {
    assert_eq!(parse_memory("64Mi").ok(), Some(64 << 20));
    assert_eq!(parse_memory("1G").ok(), Some(1_000_000_000));
    assert_eq!(parse_memory("1Gi").ok(), Some(1 << 30));
    assert_eq!(parse_memory("128974848").ok(), Some(128_974_848));
    assert_eq!(parse_memory("129e6").ok(), Some(129_000_000));
    assert_eq!(parse_memory("5k").ok(), Some(5000));
    assert!(parse_memory("64MB").is_err());
    assert!(parse_memory("Mi").is_err());
    assert!(parse_memory("0").is_err());
    assert!(parse_memory("99999999999Ti").is_err());
}

#[test]
fn numbers_are_accepted_as_quantities() {
    let pod = parse(
        "p.yaml",
        &with("cpu: 500m, memory: 64Mi", "cpu: 2, memory: 1048576"),
    )
    .unwrap();
    assert_eq!(pod.containers[0].cpu_limit_millis, Some(2000));
    assert_eq!(pod.containers[0].memory_limit_bytes, Some(1 << 20));
}

#[test]
fn restart_policy_decides_by_exit_code() {
    assert!(RestartPolicy::Always.restarts(0));
    assert!(RestartPolicy::OnFailure.restarts(1));
    assert!(!RestartPolicy::OnFailure.restarts(0));
    assert!(!RestartPolicy::Never.restarts(137));
}

#[test]
fn probes_are_read_with_kubernetes_defaults_and_named_ports() {
    let text = with(
        "      command: [/cam]\n",
        "      command: [/cam]\n      livenessProbe: {exec: {command: [/ok, -v]}, initialDelaySeconds: 2, failureThreshold: 1}\n      readinessProbe: {httpGet: {path: /ready, port: web, httpHeaders: [{name: X-A, value: b}]}, periodSeconds: 2, successThreshold: 2}\n      startupProbe: {tcpSocket: {port: 9000, host: 10.0.0.1}, timeoutSeconds: 3}\n",
    )
    .replace("- {containerPort: 8080, hostPort: 18080}", "- {containerPort: 8080, hostPort: 18080, name: web}");
    let pod = parse("pods/cam.yaml", &text).unwrap();
    let c = &pod.containers[0];
    assert_eq!(
        c.liveness_probe,
        Some(Probe {
            action: ProbeAction::Exec {
                command: vec!["/ok".into(), "-v".into()]
            },
            initial_delay_seconds: 2,
            period_seconds: 10,
            timeout_seconds: 1,
            success_threshold: 1,
            failure_threshold: 1,
        })
    );
    let r = c.readiness_probe.as_ref().unwrap();
    assert_eq!(
        r.action,
        ProbeAction::HttpGet {
            host: None,
            port: 8080,
            path: "/ready".into(),
            headers: vec![("X-A".into(), "b".into())]
        }
    );
    assert_eq!(
        (r.period_seconds, r.success_threshold, r.failure_threshold),
        (2, 2, 3)
    );
    let s = c.startup_probe.as_ref().unwrap();
    assert_eq!(
        s.action,
        ProbeAction::TcpSocket {
            host: Some("10.0.0.1".into()),
            port: 9000
        }
    );
    assert_eq!(s.timeout_seconds, 3);
    assert_eq!(pod.init_containers[0].liveness_probe, None);
}

#[test]
fn bad_probes_are_named_by_path() {
    let probe = |p: &str| {
        err(&with(
            "      command: [/cam]\n",
            &format!("      command: [/cam]\n      {p}\n"),
        ))
    };
    let cases = [
        ("livenessProbe: {grpc: {port: 1}}", "spec.containers[0].livenessProbe.grpc is not supported yet"),
        ("livenessProbe: {periodSeconds: 1}", "spec.containers[0].livenessProbe must have one of exec, httpGet or tcpSocket"),
        ("livenessProbe: {exec: {command: [a]}, tcpSocket: {port: 1}}", "spec.containers[0].livenessProbe must have only one of exec, tcpSocket"),
        ("livenessProbe: {exec: {command: [a]}, successThreshold: 2}", "spec.containers[0].livenessProbe.successThreshold must be 1"),
        ("startupProbe: {exec: {command: [a]}, successThreshold: 3}", "spec.containers[0].startupProbe.successThreshold must be 1"),
        ("readinessProbe: {exec: {command: [a]}, periodSeconds: 0}", "spec.containers[0].readinessProbe.periodSeconds must be at least 1"),
        ("readinessProbe: {exec: {command: []}}", "spec.containers[0].readinessProbe.exec.command is required"),
        ("readinessProbe: {httpGet: {port: 1, scheme: HTTPS}}", "spec.containers[0].readinessProbe.httpGet.scheme \"HTTPS\" is not supported yet (only HTTP)"),
        ("readinessProbe: {httpGet: {port: metrics}}", "spec.containers[0].readinessProbe.httpGet.port names port \"metrics\", which the container's ports do not list"),
        ("readinessProbe: {tcpSocket: {port: 70000}}", "spec.containers[0].readinessProbe.tcpSocket.port must be between 1 and 65535"),
        ("readinessProbe: {tcpSocket: {host: a}}", "spec.containers[0].readinessProbe.tcpSocket.port is required"),
        ("readinessProbe: {tcpSocket: {port: 1}, terminationGracePeriodSeconds: 3}", "spec.containers[0].readinessProbe.terminationGracePeriodSeconds is not supported yet"),
    ];
    for (p, want) in cases {
        assert_eq!(probe(p), format!("pods/cam.yaml: {want}"), "{p}");
    }
    assert_eq!(
        err(&with(
            "      command: [/fetch]\n",
            "      command: [/fetch]\n      livenessProbe: {exec: {command: [a]}}\n"
        )),
        "pods/cam.yaml: spec.initContainers[0].livenessProbe is not allowed on an init container"
    );
}

/// The pods the image ships must be accepted as they are, or the appliance boots
/// without them.
#[test]
fn the_images_static_pods_parse() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/overlay/etc/edge/pods");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let pod = parse(&path.display().to_string(), &text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        names.push(pod.name);
    }
    names.sort();
    assert_eq!(names, ["inference", "sensor"]);
}

/// GOOD with the hostPath volume replaced by a storaged volume with `csi` as its source.
fn with_csi(csi: &str) -> String {
    with(
        "hostPath: {path: /var/lib/models, type: DirectoryOrCreate}",
        &format!("csi: {csi}"),
    )
}

const CSI: &str = "{driver: storaged.edgeos, fsType: ext4, readOnly: true, volumeAttributes: {volume: model-v1, size: 2Gi, accessMode: ReadWriteMany, volumeMode: Filesystem}}";

#[test]
fn csi_volumes_are_read_in_kubernetes_inline_shape() {
    let pod = parse("cam.yaml", &with_csi(CSI)).unwrap();
    assert_eq!(
        pod.volumes[1].source,
        VolumeSource::Csi(CsiVolume {
            volume: "model-v1".into(),
            size_bytes: 2 << 30,
            access_mode: AccessMode::ReadWriteMany,
            block: false,
            fs_type: "ext4".into(),
            read_only: true,
        })
    );
    // Defaults: ReadWriteOnce, Filesystem, read-write; sizes may be YAML numbers.
    let pod = parse(
        "cam.yaml",
        &with_csi("{driver: storaged.edgeos, volumeAttributes: {volume: db, size: 1048576}}"),
    )
    .unwrap();
    assert_eq!(
        pod.volumes[1].source,
        VolumeSource::Csi(CsiVolume {
            volume: "db".into(),
            size_bytes: 1 << 20,
            access_mode: AccessMode::ReadWriteOnce,
            block: false,
            fs_type: "ext4".into(),
            read_only: false,
        })
    );
    // XFS on request; a Block volume has no filesystem.
    let pod = parse(
        "cam.yaml",
        &with_csi(
            "{driver: storaged.edgeos, fsType: xfs, volumeAttributes: {volume: db, size: 1Gi}}",
        ),
    )
    .unwrap();
    assert!(matches!(&pod.volumes[1].source, VolumeSource::Csi(c) if c.fs_type == "xfs"));
}

#[test]
fn bad_csi_volumes_are_named_by_path() {
    let attrs = |a: &str| {
        with_csi(&format!(
            "{{driver: storaged.edgeos, volumeAttributes: {a}}}"
        ))
    };
    let cases: Vec<(String, &str)> = vec![
        (
            with_csi("{driver: ebs.csi.aws.com, volumeAttributes: {volume: a, size: 1Gi}}"),
            "spec.volumes[1].csi.driver \"ebs.csi.aws.com\" is not a driver of this node",
        ),
        (
            with_csi("{driver: storaged.edgeos}"),
            "spec.volumes[1].csi.volumeAttributes is required",
        ),
        (
            attrs("{volume: a}"),
            "spec.volumes[1].csi.volumeAttributes.size is required",
        ),
        (
            attrs("{volume: a, size: lots}"),
            "spec.volumes[1].csi.volumeAttributes.size \"lots\" is not a memory quantity",
        ),
        (
            attrs("{volume: a, size: 0}"),
            "spec.volumes[1].csi.volumeAttributes.size \"0\" must be more than zero",
        ),
        (
            attrs("{volume: a, size: 1Gi, storageClass: fast}"),
            "spec.volumes[1].csi.volumeAttributes.storageClass is not supported yet",
        ),
        (
            attrs("{size: 1Gi}"),
            "spec.volumes[1].csi.volumeAttributes.volume is required",
        ),
        (
            attrs("{volume: ../etc, size: 1Gi}"),
            "spec.volumes[1].csi.volumeAttributes.volume \"../etc\" must be 1-64 of a-z",
        ),
        (
            attrs("{volume: a, size: 1Gi, accessMode: ReadWriteOncePod}"),
            "spec.volumes[1].csi.volumeAttributes.accessMode is \"ReadWriteOncePod\"",
        ),
        (
            attrs("{volume: a, size: 1Gi, volumeMode: Raw}"),
            "spec.volumes[1].csi.volumeAttributes.volumeMode is \"Raw\"",
        ),
        (
            with_csi("{driver: storaged.edgeos, fsType: btrfs, volumeAttributes: {volume: a, size: 1Gi}}"),
            "spec.volumes[1].csi.fsType \"btrfs\" is not supported (ext4 or xfs)",
        ),
        (
            with_csi("{driver: storaged.edgeos, nodePublishSecretRef: {name: s}, volumeAttributes: {volume: a, size: 1Gi}}"),
            "spec.volumes[1].csi.nodePublishSecretRef is not supported yet",
        ),
        (
            with(
                "hostPath: {path: /var/lib/models, type: DirectoryOrCreate}",
                "hostPath: {path: /m}\n      csi: {driver: storaged.edgeos}",
            ),
            "spec.volumes[1] must have only one of hostPath, csi",
        ),
        (
            attrs("{volume: a, size: 1Gi, volumeMode: Block, accessMode: ReadWriteMany}"),
            "spec.volumes[1].csi.volumeAttributes.accessMode must be ReadWriteOnce for a Block volume",
        ),
        (
            // GOOD mounts the `models` volume into the container: a Block one cannot be.
            attrs("{volume: a, size: 1Gi, volumeMode: Block}"),
            "spec.containers[0].volumeMounts[1].name names volume \"models\", a Block volume",
        ),
    ];
    for (text, want) in cases {
        let e = err(&text);
        assert!(
            e.starts_with(&format!("pods/cam.yaml: {want}")),
            "want {want:?}, got {e:?}"
        );
    }
}

/// GOOD with `models` a Block volume given to the container as a device.
fn with_block_device(device: &str) -> String {
    with_csi("{driver: storaged.edgeos, readOnly: true, volumeAttributes: {volume: raw, size: 1Gi, volumeMode: Block}}")
        .replacen(
            "        - {name: models, mountPath: /models, readOnly: true}\n",
            &format!("      volumeDevices:\n        - {device}\n"),
            1,
        )
}

#[test]
fn block_volumes_are_given_to_containers_as_devices() {
    let pod = parse(
        "cam.yaml",
        &with_block_device("{name: models, devicePath: /dev/xvda}"),
    )
    .unwrap();
    let c = &pod.containers[0];
    assert_eq!(
        c.volume_devices,
        [VolumeDevice {
            name: "models".into(),
            device_path: "/dev/xvda".into()
        }]
    );
    assert_eq!(c.volume_mounts.len(), 1);
    assert!(GOOD.contains("volumeMounts") && !GOOD.contains("volumeDevices"));
    assert!(parse("cam.yaml", GOOD).unwrap().containers[0]
        .volume_devices
        .is_empty());
}

#[test]
fn bad_volume_devices_are_named_by_path() {
    let dev = "spec.containers[0].volumeDevices[0]";
    let cases: Vec<(String, String)> = vec![
        (
            with_block_device("{name: nothing, devicePath: /dev/xvda}"),
            format!("{dev}.name names volume \"nothing\", which spec.volumes does not list"),
        ),
        (
            with_block_device("{name: scratch, devicePath: /dev/xvda}"),
            format!("{dev}.name names volume \"scratch\", which is not a Block csi volume"),
        ),
        (
            with_block_device("{name: models, devicePath: dev/xvda}"),
            format!("{dev}.devicePath must be an absolute path"),
        ),
        (
            with_block_device("{name: models, devicePath: /tmp}"),
            format!("{dev}.devicePath \"/tmp\" is already used by another volume"),
        ),
        (
            with_block_device("{name: models}"),
            format!("{dev}.devicePath is required"),
        ),
        (
            with_block_device("{name: models, devicePath: /dev/xvda, readOnly: true}"),
            format!("{dev}.readOnly is not supported yet"),
        ),
        (
            // A filesystem csi volume is mounted, not given as a device.
            with_csi(CSI).replacen(
                "        - {name: models, mountPath: /models, readOnly: true}\n",
                "      volumeDevices:\n        - {name: models, devicePath: /dev/xvda}\n",
                1,
            ),
            format!("{dev}.name names volume \"models\", which is not a Block csi volume"),
        ),
    ];
    for (text, want) in cases {
        let e = err(&text);
        assert!(
            e.starts_with(&format!("pods/cam.yaml: {want}")),
            "want {want:?}, got {e:?}"
        );
    }
}
