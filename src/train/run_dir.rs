//! The run folder (`run.output_dir`): one run owns it, and a run never writes over another's.
//!
//! - `RunLock`: an exclusive `flock` on `<output_dir>/LOCK`, held for the life of the process
//!   (the kernel releases it when the process dies, however it dies, so a requeued job takes it
//!   over). The file names the holder (host, pid, start time) for the message a second process
//!   gets. On NFS, Linux emulates flock with POSIX locks, which work across clients; Lustre needs
//!   the `flock` mount option.
//! - `start_point`: which checkpoint a run starts from, refusing to start over a folder that
//!   holds another run, or to resume anything but that folder's newest step into it.
//! - `clear_leftovers`: temporary folders of saves that a killed process left behind.

use std::fs::File;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::ckpt;
use super::Resume;

pub const LOCK_FILE: &str = "LOCK";

pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Take `<dir>/LOCK` or fail with one line naming the holder.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                bail!(
                    "run.output_dir {} is in use by another dsa-train process ({}); one run per folder: wait for it to end, stop it, or choose another run.output_dir",
                    dir.display(),
                    if holder.is_empty() { "holder unknown" } else { holder }
                );
            }
            return Err(err).with_context(|| format!("cannot lock {}", path.display()));
        }
        let since = utc_time(std::time::SystemTime::now());
        let text = format!(
            "host {}, pid {}, since {since}\n",
            hostname(),
            std::process::id()
        );
        file.set_len(0)
            .and_then(|()| file.write_all(text.as_bytes()))
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self { _file: file })
    }
}

/// What of a run `dir` holds, in words, or None: complete checkpoints or logged steps.
pub fn existing_run(dir: &Path) -> Option<String> {
    let steps = ckpt::step_entries(dir);
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .map(|t| t.lines().filter(|l| !l.trim().is_empty()).count())
        .unwrap_or(0);
    let mut parts = vec![];
    match (steps.first(), steps.last()) {
        (Some(a), Some(b)) if a.0 != b.0 => {
            parts.push(format!("checkpoints step-{} to step-{}", a.0, b.0))
        }
        (Some(a), _) => parts.push(format!("checkpoint step-{}", a.0)),
        _ => {}
    }
    if metrics > 0 {
        parts.push(format!("{metrics} logged steps in metrics.jsonl"));
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// The checkpoint a run into `out` resumes from, or None for a fresh start. Refused: a fresh
/// start over a folder that holds a run (its metrics and checkpoints would be lost), and a
/// resume into such a folder from anything but its newest step (the newer steps would be
/// overwritten). `log`: the rank that says what was decided.
pub fn start_point(out: &Path, resume: Option<&Resume>, log: bool) -> Result<Option<PathBuf>> {
    let newest = ckpt::complete_checkpoints(out).pop().map(|(_, d)| d);
    let held = existing_run(out);
    if resume.is_some() {
        // The newest step must be complete: a `step-N` without its marker was not written by a
        // finished save (ours are renamed into place only once marked), so it was damaged or
        // put there; continuing from an older step would silently drop it.
        if let Some((_, last)) = ckpt::step_entries(out).pop() {
            if newest.as_ref() != Some(&last) {
                bail!(
                    "{} has no {} marker (damaged, or not written by dsa-train), and it is the newest step of run.output_dir {}: restore or remove it, or resume an older step into a new run.output_dir",
                    last.display(), super::integrity::MARKER, out.display()
                );
            }
        }
    }
    match resume {
        None => {
            if let Some(what) = held {
                bail!(
                    "run.output_dir {} already holds a run ({what}); continue it with --resume auto, or set a new run.output_dir",
                    out.display()
                );
            }
            Ok(None)
        }
        Some(Resume::Auto) => {
            if newest.is_none() && log {
                crate::elog!(
                    "[train] --resume auto: no complete checkpoint in {}; starting at step 0",
                    out.display()
                );
            }
            Ok(newest)
        }
        Some(Resume::Path(p)) => {
            if !ckpt::is_checkpoint(p) {
                bail!("--resume {}: not a checkpoint (no state.json)", p.display());
            }
            if let Some(what) = held {
                let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
                    (Ok(x), Ok(y)) => x == y,
                    _ => false,
                };
                if !newest.as_deref().is_some_and(|n| same(n, p)) {
                    bail!(
                        "--resume {}: run.output_dir {} already holds a run ({what}) that this would overwrite; resume into a new run.output_dir, or use --resume auto to continue that run",
                        p.display(), out.display()
                    );
                }
            }
            Ok(Some(p.clone()))
        }
    }
}

/// Remove what killed saves left behind: `.step-N.tmp` folders and unfinished `base/` links.
pub fn clear_leftovers(out: &Path) {
    for dir in [out.to_path_buf(), out.join("base")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".tmp") && e.path().is_dir() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// This machine's host name (for the lock's holder line and TensorBoard file names).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is ours and its length is passed; gethostname NUL-terminates within it
    // when the name fits.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if ok {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "unknown host".into()
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` (days to civil date: Howard Hinnant's algorithm).
pub fn utc_time(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_time_formats_known_instants() {
        let at = |s: u64| utc_time(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(at(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(at(1_796_515_200 + 3661), "2026-12-06 01:01:01 UTC");
    }

    #[test]
    fn a_second_lock_on_the_same_folder_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        let err = RunLock::acquire(dir.path())
            .err()
            .expect("the folder is locked")
            .to_string();
        assert!(
            err.contains("in use") && err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        RunLock::acquire(dir.path()).unwrap();
    }
}
