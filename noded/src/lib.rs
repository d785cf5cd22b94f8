//! noded's parts, as a library so the integration tests drive the same code the
//! daemon runs: the CRI client, the local registry containerd pulls images from, the
//! image allowlist, pod manifests, the reconciler that runs them, their CSI volumes
//! from storaged, their probes and logs and the control socket that reports them, and
//! the optional Kubernetes API server path. Their failures are the one [`Error`] of
//! error.rs, each naming what it was about.

pub mod apiserver;
pub mod control;
pub mod cri;
pub mod error;
pub mod logs;
pub mod manifest;
pub mod metrics;
pub mod pods;
pub mod policy;
pub mod probes;
pub mod registry;
pub mod volumes;

pub use error::{Error, Result};
