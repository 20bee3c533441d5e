//! Stop requests. SIGINT, SIGTERM (SLURM preemption and time limits), SIGUSR1 (sbatch
//! --signal) and SIGHUP (the terminal went away) set a flag that the training loop checks after
//! every step; it then writes a checkpoint and exits cleanly. A second one of these exits at
//! once. SIGPIPE (whoever read our output is gone: `| head`, a killed `tee`) sets the flag too
//! but never counts as the second signal: every later write to the closed pipe raises it again,
//! and the checkpoint must still be written. `data prepare` checks the same flag to remove its
//! partial output.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only async-signal-safe operations here: an atomic swap and _exit.
    if STOP.swap(true, Ordering::SeqCst) {
        unsafe { libc::_exit(130) };
    }
}

extern "C" fn on_broken_pipe(_sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Install the handlers (idempotent).
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1, libc::SIGHUP] {
        // SAFETY: `on_signal` is an `extern "C" fn(c_int)` doing only async-signal-safe work.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    // SAFETY: as above; an atomic store only.
    unsafe {
        libc::signal(
            libc::SIGPIPE,
            on_broken_pipe as *const () as libc::sighandler_t,
        )
    };
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
