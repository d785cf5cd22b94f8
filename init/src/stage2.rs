//! Stage 2, PID 1 on the root for the life of the system.

pub fn run() -> ! {
    crate::say!("stage 2 not implemented yet");
    loop {
        std::thread::park();
    }
}
