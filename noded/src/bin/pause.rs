//! The pod sandbox's first process: holds the pod's namespaces open, reaps the
//! orphans that land on it as PID 1, and exits 0 on SIGTERM or SIGINT.
//!
//! It must run in an image that holds nothing else, so it is built statically. To
//! keep that build a single `rustc` call (no crate graph), the four libc calls it
//! needs are declared here rather than taken from the libc crate.

use std::ffi::c_int;

/// glibc's `sigset_t` on x86_64: 1024 bits.
#[repr(C)]
struct SigSet([u64; 16]);

const SIG_BLOCK: c_int = 0;
const SIGINT: c_int = 2;
const SIGTERM: c_int = 15;
const SIGCHLD: c_int = 17;
const WNOHANG: c_int = 1;

extern "C" {
    fn sigemptyset(set: *mut SigSet) -> c_int;
    fn sigaddset(set: *mut SigSet, sig: c_int) -> c_int;
    fn sigprocmask(how: c_int, set: *const SigSet, old: *mut SigSet) -> c_int;
    fn sigwait(set: *const SigSet, sig: *mut c_int) -> c_int;
    fn waitpid(pid: c_int, status: *mut c_int, options: c_int) -> c_int;
}

fn main() {
    let mut set = SigSet([0; 16]);
    // SAFETY: `set` is a properly sized, owned sigset; the calls only write into it
    // and the out-parameters below, which live for the duration of each call.
    unsafe {
        sigemptyset(&mut set);
        for sig in [SIGINT, SIGTERM, SIGCHLD] {
            sigaddset(&mut set, sig);
        }
        // Blocked signals stay pending for sigwait instead of taking their default
        // action, which for PID 1 would be to ignore them.
        if sigprocmask(SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            eprintln!(
                "pause: sigprocmask failed: {}",
                std::io::Error::last_os_error()
            );
            std::process::exit(1);
        }
        loop {
            let mut sig: c_int = 0;
            if sigwait(&set, &mut sig) != 0 {
                continue;
            }
            match sig {
                SIGINT | SIGTERM => std::process::exit(0),
                _ => {
                    let mut status = 0;
                    while waitpid(-1, &mut status, WNOHANG) > 0 {}
                }
            }
        }
    }
}
