//! The appliance's PID 1. The same binary is `/init` in the initramfs (stage 1: open the
//! verified root and the data partition, switch into them) and `/sbin/init` on the root
//! (stage 2: supervise the system for its whole life). Its one error type is in error.rs.

mod cgroups;
mod cmdline;
mod config;
mod console;
mod control;
mod data_journaling;
mod disk;
mod error;
mod esp;
mod ext4;
mod health;
mod listeners;
mod logs;
mod measurements;
mod metrics;
mod mounts;
mod net;
mod power;
mod provision;
mod rootexec;
mod sealed_data;
mod services;
mod stage1;
mod stage2;
mod standby;
mod status;
mod supervisor;
mod update;
mod verity;
mod watchdog;

use edge_dm as dm;

fn main() {
    if std::path::Path::new("/etc/initrd-release").exists() {
        stage1::run()
    } else {
        stage2::run()
    }
}
