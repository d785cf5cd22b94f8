//! storaged's library: the pool on the claimed device, its catalog and its thin
//! volumes. The daemon (`main.rs`) and the light-VM test program (`bin/storaged-vmtest.rs`)
//! both use it.

pub mod catalog;
pub mod error;
pub mod pool;
pub mod superblock;
pub mod volumes;

pub use error::{Error, Result};
pub use pool::{Options, Pool};
