//! What the reconciler reports of each pod: the control socket's `pods`, the metrics,
//! the API server's pod status and the node's health all read these.

use std::sync::{Arc, Mutex};

pub use edge_node_api::{ContainerReport, PodReport};

use crate::error::{Error, Result};

pub type Status = Arc<Mutex<Vec<PodReport>>>;

/// Rings when a step published a pod's new report, for whoever passes reports on
/// (the API server's pod status) to do so now rather than at its next round. One per
/// process, as the reconciler is.
static REPORTED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Waits until a step publishes a report (at once if one did since the last wait).
pub async fn reported() {
    REPORTED.notified().await;
}

/// Whether every pod of the image's own manifests (`files`, the static directory's
/// manifest files) is up: a box whose static pods do not run is not healthy.
pub fn static_pods_up(files: &[String], reports: &[PodReport]) -> Result<()> {
    let down: Vec<String> = files
        .iter()
        .filter(|f| !reports.iter().any(|r| &r.file == *f && r.is_up()))
        .cloned()
        .collect();
    if down.is_empty() {
        Ok(())
    } else {
        Err(Error::NotUp { files: down })
    }
}

/// Replaces the report of one pod (same file and uid) in the published status; a pod
/// no longer there (its manifest went during the step) is not brought back.
pub(super) fn update_report(status: &Status, report: PodReport) {
    let Ok(mut reports) = status.lock() else {
        return;
    };
    if let Some(r) = reports
        .iter_mut()
        .find(|r| r.file == report.file && r.uid == report.uid)
    {
        if *r != report {
            *r = report;
            REPORTED.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::is_manifest_file;

    #[test]
    fn a_node_is_healthy_once_every_static_pod_is_up() {
        let report = |file: &str, state: &str, ready: bool| PodReport {
            file: file.into(),
            name: file.trim_end_matches(".yaml").into(),
            namespace: "default".into(),
            uid: String::new(),
            state: state.into(),
            error: None,
            containers: vec![
                ContainerReport {
                    name: "setup".into(),
                    init: true,
                    state: "completed".into(),
                    restarts: 0,
                    exit_code: Some(0),
                    last_error: None,
                    ready: false,
                },
                ContainerReport {
                    name: "main".into(),
                    init: false,
                    state: "running".into(),
                    restarts: 0,
                    exit_code: None,
                    last_error: None,
                    ready,
                },
            ],
            ip: None,
            image_refused: false,
        };
        let files = vec!["a.yaml".to_string(), "b.yaml".to_string()];
        // Before the first pass nothing is reported: not up.
        let up = |files: &[String], reports: &[PodReport]| {
            static_pods_up(files, reports).map_err(|e| e.to_string())
        };
        assert_eq!(up(&files, &[]), Err("not up: a.yaml, b.yaml".into()));
        let mut reports = vec![
            report("a.yaml", "running", true),
            report("b.yaml", "running", false),
            // Pods of the other sources do not count.
            report("downlink/c.yaml", "failed", false),
        ];
        assert_eq!(up(&files, &reports), Err("not up: b.yaml".into()));
        reports[1] = report("b.yaml", "succeeded", false);
        assert_eq!(up(&files, &reports), Ok(()));
        reports[0] = report("a.yaml", "pending", false);
        assert!(static_pods_up(&files, &reports).is_err());
        assert_eq!(up(&[], &[]), Ok(()));
        assert!(is_manifest_file("a.yml") && !is_manifest_file(".a.yaml.part"));
        assert!(!is_manifest_file("a.json"));
    }
}
