//! Taking over the sandboxes an earlier noded left: after a noded restart its pods keep
//! running; after a reboot their remains are removed.

use std::collections::{BTreeMap, BTreeSet};

use super::lifecycle::{PodRun, BACKOFF_MAX};
use super::runtime::stop_sandbox;
use super::sources::Scanned;
use super::spec::{LABEL_FILE, LABEL_HASH, LABEL_MANAGED, MANAGER};
use super::Reconciler;
use crate::cri::api::*;
use crate::error::Result;
use crate::manifest;

impl Reconciler {
    /// Takes over the sandboxes an earlier noded left running. One whose manifest is
    /// unchanged keeps running with its containers; the rest are stopped and removed.
    pub(super) async fn adopt(&mut self, scanned: &BTreeMap<String, Scanned>) -> Result<()> {
        let listed = self
            .driver
            .cri
            .list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    label_selector: [(LABEL_MANAGED.to_string(), MANAGER.to_string())].into(),
                    ..Default::default()
                }),
            })
            .await?;
        for sb in listed.items {
            let file = sb.labels.get(LABEL_FILE).cloned().unwrap_or_default();
            let hash = sb.labels.get(LABEL_HASH).cloned().unwrap_or_default();
            let ready = sb.state == PodSandboxState::SandboxReady as i32;
            let matching = scanned
                .get(&file)
                .filter(|f| f.hash == hash && ready && !self.pods.contains_key(&file));
            let pod = matching.and_then(|f| {
                let pod = manifest::parse(&f.path, &f.text).ok()?;
                // Two files of one pod: only the first adopted keeps its sandbox.
                let taken = self
                    .pods
                    .values()
                    .any(|r| r.pod.name == pod.name && r.pod.namespace == pod.namespace);
                (!taken).then_some(pod)
            });
            let Some(pod) = pod else {
                if ready {
                    tracing::info!(sandbox = %sb.id, file = %file, "removing a pod left by an earlier noded whose manifest is gone or changed");
                } else {
                    // After a reboot or power cut every sandbox is here, with its
                    // processes gone; the pod starts again below if its manifest is.
                    tracing::info!(sandbox = %sb.id, file = %file, "removing a pod sandbox an earlier noded left that is no longer running");
                }
                stop_sandbox(&self.driver.cri, &sb.id, &[], 0).await;
                continue;
            };
            let source = matching.map(|f| f.path.clone()).unwrap_or_default();
            let mut run = PodRun::new(file.clone(), source, hash, pod);
            run.sandbox = Some(sb.id.clone());
            let containers = self
                .driver
                .cri
                .list_containers(ListContainersRequest {
                    filter: Some(ContainerFilter {
                        pod_sandbox_id: sb.id.clone(),
                        ..Default::default()
                    }),
                })
                .await?
                .containers;
            let app_started = containers.iter().any(|c| {
                let name = c.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or("");
                run.containers
                    .iter()
                    .any(|r| !r.init && r.spec.name == name)
            });
            for ctr in &mut run.containers {
                let latest = containers
                    .iter()
                    .filter_map(|c| c.metadata.as_ref().map(|m| (m, c)))
                    .filter(|(m, _)| m.name == ctr.spec.name)
                    .max_by_key(|(m, _)| m.attempt);
                if ctr.init && app_started {
                    ctr.done = true;
                    ctr.state = "completed";
                    ctr.exit_code = Some(0);
                }
                if let Some((m, c)) = latest {
                    ctr.attempt = m.attempt + 1;
                    ctr.restarts = m.attempt;
                    if !ctr.done {
                        ctr.id = Some(c.id.clone());
                    }
                }
            }
            self.driver.volumes.adopt(&run.hash, &run.pod).await;
            tracing::info!(pod = %run.pod.name, file = %file, sandbox = %sb.id, "adopted a running pod");
            self.pods.insert(file, run);
        }
        // Volumes still published for pods that went while no noded watched (their
        // sandboxes were just removed, or a reboot took them): released in the
        // background, like any other pod's after its teardown.
        let live: BTreeSet<String> = scanned.values().map(|f| f.hash.clone()).collect();
        for (uid, pod) in self.driver.volumes.orphans(&live).await {
            tracing::info!(pod = %pod, uid = %uid, "releasing the csi volumes of a pod that is gone");
            let volumes = self.driver.volumes.clone();
            let base = self.settings.backoff_base;
            tokio::spawn(
                async move { volumes.detach_retrying(&uid, &pod, base, BACKOFF_MAX).await },
            );
        }
        Ok(())
    }
}
