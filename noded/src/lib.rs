//! noded's parts, as a library so the integration tests drive the same code the
//! daemon runs: the CRI client and the local registry containerd pulls images from.

pub mod cri;
pub mod manifest;
pub mod registry;
