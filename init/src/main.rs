//! The appliance's PID 1. The same binary is `/init` in the initramfs (stage 1: open the
//! verified root and the data partition, switch into them) and `/sbin/init` on the root
//! (stage 2: supervise the system for its whole life).

fn main() {
    if std::path::Path::new("/etc/initrd-release").exists() {
        eprintln!("edgeos: stage 1 not implemented yet");
    } else {
        eprintln!("edgeos: stage 2 not implemented yet");
    }
}
