//! The harness: one disposable virtual machine per test.
//!
//! A [`Machine`] owns a temp dir with a copy-on-write overlay of the image, its own OVMF
//! variables and TPM state, and the swtpm and QEMU processes (killed, with their process
//! groups, when the machine is dropped). Tests talk to the guest only through the
//! console log, the control port and QMP: there is no shell in the appliance.

pub mod console;
pub mod control;
pub mod controlplane;
pub mod core;
pub mod cpio;
pub mod disk;
pub mod gpt;
pub mod interactive;
pub mod lightvm;
pub mod machine;
pub mod process;
pub mod qmp;

pub use machine::{
    all_ready, image_from_env, parse_ready, pod, pod_running, service, ConsoleMode, Machine,
    Options, Ready,
};
