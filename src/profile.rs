//! `DSA_PROFILE=1`: where a training step's time goes, by named region.
//!
//! A region is timed on the host between two device synchronisations, so the GPU work it
//! queued is charged to it (and the synchronisations themselves slow the step a little: the
//! figures are for finding the large items, not for tokens/s). Regions nest; each one's time
//! is inclusive of the regions inside it. `bench step` prints the table after its steps.
//! Without the variable a region costs one relaxed atomic load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// 0 = not read yet, 1 = off, 2 = on.
static STATE: AtomicU8 = AtomicU8::new(0);
static TABLE: Mutex<BTreeMap<&'static str, (u64, f64)>> = Mutex::new(BTreeMap::new());

pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("DSA_PROFILE").is_ok_and(|v| v == "1");
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        s => s == 2,
    }
}

fn synchronize() {
    #[cfg(feature = "cuda")]
    let _ = candle_core::cuda_backend::cudarc::driver::result::ctx::synchronize();
}

/// Times `name` until the returned guard is dropped.
pub struct Region {
    name: &'static str,
    start: Option<Instant>,
}

pub fn region(name: &'static str) -> Region {
    let start = enabled().then(|| {
        synchronize();
        Instant::now()
    });
    Region { name, start }
}

impl Drop for Region {
    fn drop(&mut self) {
        if let Some(start) = self.start {
            synchronize();
            let s = start.elapsed().as_secs_f64();
            if let Ok(mut t) = TABLE.lock() {
                let e = t.entry(self.name).or_insert((0, 0.0));
                e.0 += 1;
                e.1 += s;
            }
        }
    }
}

/// Forget what was timed so far (e.g. the warm-up step).
pub fn reset() {
    if let Ok(mut t) = TABLE.lock() {
        t.clear();
    }
}

/// The regions timed so far, largest total first, per step of `steps`; empty when off.
pub fn report(steps: usize) -> String {
    let Ok(t) = TABLE.lock() else {
        return String::new();
    };
    if t.is_empty() {
        return String::new();
    }
    let mut rows: Vec<_> = t.iter().collect();
    rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    let steps = steps.max(1) as f64;
    let mut out = format!(
        "{:<44} {:>9} {:>12} {:>12}\n",
        "region (inclusive)", "calls", "s per step", "ms per call"
    );
    for (name, (calls, s)) in rows {
        out.push_str(&format!(
            "{name:<44} {:>9} {:>12.4} {:>12.3}\n",
            *calls as f64 / steps,
            s / steps,
            1e3 * s / *calls as f64
        ));
    }
    out
}

/// Median seconds of `f` over `reps` runs (at least one) after one warm-up, synchronising the
/// device. Every kernel family's `bench` uses it.
pub(crate) fn time_median(
    device: &candle_core::Device,
    reps: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    f()?;
    device.synchronize()?;
    let mut times = vec![];
    for _ in 0..reps.max(1) {
        let t0 = std::time::Instant::now();
        f()?;
        device.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// ", device memory in use after the steps X of Y GiB" on a GPU build, else nothing.
pub(crate) fn device_memory_in_use() -> String {
    // Freed blocks kept by the memory pools are not in use (`cuda_runtime`).
    crate::cuda_runtime::trim_pools();
    #[cfg(feature = "cuda")]
    if let Ok((free, total)) = candle_core::cuda_backend::cudarc::driver::result::mem_get_info() {
        return format!(
            ", device memory in use after the steps {:.1} of {:.1} GiB",
            (total - free) as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64
        );
    }
    String::new()
}

/// With DSA_MEM_LOG=1, print the time since the first call and the device memory in use at
/// `at` (after synchronising): where a step spends its time and what fills the GPU.
pub fn log_device_memory(at: &str) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var("DSA_MEM_LOG").is_ok_and(|v| v == "1")) {
        // Wait for queued device work so the timestamps split the step by phase.
        #[cfg(feature = "cuda")]
        let _ = candle_core::cuda_backend::cudarc::driver::result::ctx::synchronize();
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let t = START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs_f64();
        crate::elog!(
            "[mem] {t:9.3} s {at}{}",
            device_memory_in_use().replace(" after the steps", "")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_add_up_per_name_and_report_largest_first() {
        STATE.store(2, Ordering::Relaxed);
        reset();
        for _ in 0..3 {
            let _a = region("test: outer");
            let _b = region("test: inner");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let r = report(3);
        STATE.store(0, Ordering::Relaxed);
        // Other tests may run model code (and so regions) meanwhile: look at ours only.
        let lines: Vec<&str> = r.lines().filter(|l| l.starts_with("test: ")).collect();
        assert!(lines.len() == 2, "{r}");
        assert!(
            lines[0].starts_with("test: outer") && lines[1].starts_with("test: inner"),
            "{r}"
        );
        assert!(
            lines[0].split_whitespace().nth(2) == Some("1"),
            "one call per step: {r}"
        );
        let per_step = |l: &str| {
            l.split_whitespace()
                .nth(3)
                .and_then(|x| x.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        assert!(
            per_step(lines[1]) >= 0.002,
            "the inner region slept 2 ms per step: {r}"
        );
    }
}
