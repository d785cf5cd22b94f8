//! storaged's library: the pool on the claimed device, its catalog, its thin volumes,
//! their mounts on the node and the CSI endpoint that serves them. The daemon
//! (`main.rs`) and the light-VM guest programs (qemu-tests/storaged-guest) both use it.

pub mod catalog;
pub mod csi;
pub mod error;
pub mod metrics;
pub mod mounts;
pub mod partition;
pub mod pool;
pub mod superblock;
pub mod volumes;

pub use error::{Error, Result};
pub use pool::{Options, Pool};
