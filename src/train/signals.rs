//! Stop requests from the scheduler. SIGINT, SIGTERM (SLURM preemption and time limits) and
//! SIGUSR1 (sbatch --signal) set a flag that the training loop checks after every step; it
//! then writes a checkpoint and exits cleanly. A second SIGINT/SIGTERM exits at once.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only async-signal-safe operations here: an atomic swap and _exit.
    if STOP.swap(true, Ordering::SeqCst) {
        unsafe { libc::_exit(130) };
    }
}

/// Install the handlers (idempotent).
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: `on_signal` is an `extern "C" fn(c_int)` doing only async-signal-safe work.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
