//! Stage 1, in the initramfs: open the slot's verified root and the data partition,
//! then switch into them.

pub fn run() -> ! {
    crate::say!("stage 1 not implemented yet");
    loop {
        std::thread::park();
    }
}
