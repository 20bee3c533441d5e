//! TensorBoard event files: every step's metrics as scalars, beside metrics.jsonl, in
//! `<output_dir>/tensorboard/events.out.tfevents.<unix seconds>.<host>`.
//!
//! The format (TensorFlow's TFRecord of `Event` protocol buffers), written by hand: each record
//! is the data length (u64 LE), its masked CRC-32C (u32 LE), the data, the data's masked CRC-32C;
//! masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2^32). An `Event` is
//! `wall_time` (field 1, double), `step` (2, int64), and either `file_version` (3, string,
//! "brain.Event:2", the first record of a file), `summary` (5: repeated `value` (1) of `tag`
//! (1, string) and `simple_value` (2, float)) or `session_log` (7: `status` (1) = START).
//! A resumed run opens a new file whose first event after the version is a START at the
//! resumed step + 1: TensorBoard then drops the earlier files' points from that step on, as
//! metrics.jsonl drops its lines past the resumed step.
//!
//! A TensorBoard file that cannot be written costs a warning, never the run.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::metrics::StepMetrics;

pub struct EventWriter {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl EventWriter {
    /// A new event file in `<dir>/tensorboard/`; when the run resumes at `resumed_step`, or the
    /// folder holds earlier files, the file marks a restart at `resumed_step + 1`.
    pub fn create(dir: &Path, resumed_step: u64) -> Result<Self> {
        let folder = dir.join("tensorboard");
        std::fs::create_dir_all(&folder)
            .with_context(|| format!("cannot create {}", folder.display()))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut name = format!("events.out.tfevents.{now}.{}", super::run_dir::hostname());
        // Two runs in the same second (a quick resume) get distinct files.
        let mut n = 1;
        while folder.join(&name).exists() {
            name = format!(
                "events.out.tfevents.{now}.{}.{n}",
                super::run_dir::hostname()
            );
            n += 1;
        }
        let path = folder.join(name);
        let earlier = std::fs::read_dir(&folder).map(|d| d.count()).unwrap_or(0) > 0;
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = Self {
            path,
            file: Some(file),
        };
        w.record(&event(wall_time(), 0, Body::FileVersion))?;
        if resumed_step > 0 || earlier {
            // Earlier files may hold steps past the start (a run killed after logging them).
            w.record(&event(wall_time(), resumed_step + 1, Body::Start))?;
        }
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One step's scalars (`train/...`); a failed write is reported once and stops the file.
    pub fn append(&mut self, m: &StepMetrics) {
        let mut scalars: Vec<(&str, f64)> = vec![
            ("train/indexer_kl", m.indexer_kl),
            ("train/lr", m.lr),
            ("train/indexer_lr", m.indexer_lr),
            ("train/grad_norm", m.grad_norm),
            ("train/indexer_grad_norm", m.indexer_grad_norm),
            ("train/tokens", m.tokens as f64),
            ("perf/tokens_per_s", m.tokens_per_s),
            ("perf/step_s", m.elapsed_s),
            ("perf/comm_s", m.comm_s),
            ("perf/exchange_s", m.exchange_s),
            (
                "perf/exchange_gib",
                m.exchange_bytes as f64 / (1u64 << 30) as f64,
            ),
            (
                "perf/context_gib",
                m.context_bytes as f64 / (1u64 << 30) as f64,
            ),
            (
                "perf/weight_gather_gib",
                m.gather_bytes as f64 / (1u64 << 30) as f64,
            ),
        ];
        if let Some(l) = m.lm_loss {
            scalars.push(("train/lm_loss", l));
        }
        if let Some(e) = m.max_expert_load {
            scalars.push(("train/max_expert_load", e));
        }
        let data = event(wall_time(), m.step, Body::Scalars(&scalars));
        if let Err(e) = self.record(&data) {
            crate::elog!(
                "[train] warning: {e:#}; TensorBoard logging stops (metrics.jsonl goes on)"
            );
            self.file = None;
        }
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let Some(f) = self.file.as_mut() else {
            return Ok(());
        };
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        f.write_all(&rec)
            .and_then(|()| f.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

enum Body<'a> {
    FileVersion,
    Start,
    Scalars(&'a [(&'a str, f64)]),
}

/// An `Event` message, encoded.
fn event(wall_time: f64, step: u64, body: Body) -> Vec<u8> {
    let mut out = vec![0x09]; // field 1, 64-bit
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(0x10); // field 2, varint
    varint(&mut out, step);
    match body {
        Body::FileVersion => bytes_field(&mut out, 3, b"brain.Event:2"),
        Body::Start => bytes_field(&mut out, 7, &[0x08, 0x01]), // session_log: SessionLog { status: START }
        Body::Scalars(values) => {
            let mut summary = vec![];
            for (tag, v) in values {
                let mut value = vec![];
                bytes_field(&mut value, 1, tag.as_bytes());
                value.push(0x15); // field 2, 32-bit: simple_value
                value.extend_from_slice(&(*v as f32).to_le_bytes());
                bytes_field(&mut summary, 1, &value);
            }
            bytes_field(&mut out, 5, &summary);
        }
    }
    out
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u64, data: &[u8]) {
    varint(out, field << 3 | 2);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82f63b78), bitwise table built at compile time.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0x82f6_3b78 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// Read an event file back: (step, tag, value) of every scalar, checking both CRCs of every
/// record (tests, and a check that a file is whole).
pub fn read_scalars(path: &Path) -> Result<Vec<(u64, String, f32)>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = vec![];
    let mut at = 0;
    let bad = |what: &str, at: usize| anyhow::anyhow!("{}: {what} at byte {at}", path.display());
    while at < bytes.len() {
        let head = bytes
            .get(at..at + 12)
            .ok_or_else(|| bad("a torn record header", at))?;
        let len = u64::from_le_bytes(head[..8].try_into().expect("8 bytes")) as usize;
        if masked_crc32c(&head[..8]) != u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"))
        {
            return Err(bad("a bad length checksum", at));
        }
        let data = bytes
            .get(at + 12..at + 12 + len)
            .ok_or_else(|| bad("a torn record", at))?;
        let crc = bytes
            .get(at + 12 + len..at + 16 + len)
            .ok_or_else(|| bad("a torn record", at))?;
        if masked_crc32c(data) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(bad("a bad data checksum", at));
        }
        out.extend(decode_scalars(data).ok_or_else(|| bad("an event that does not decode", at))?);
        at += 16 + len;
    }
    Ok(out)
}

/// The scalars of one encoded `Event` (none for other kinds of event).
fn decode_scalars(data: &[u8]) -> Option<Vec<(u64, String, f32)>> {
    fn read_varint(d: &[u8], at: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *d.get(*at)?;
            *at += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }
    // (field, wire type 0/1/2/5 payload) pairs of one message.
    fn fields(d: &[u8]) -> Option<Vec<(u64, &[u8], u64)>> {
        let mut at = 0;
        let mut out = vec![];
        while at < d.len() {
            let key = read_varint(d, &mut at)?;
            match key & 7 {
                0 => out.push((key >> 3, &d[0..0], read_varint(d, &mut at)?)),
                1 => {
                    out.push((key >> 3, d.get(at..at + 8)?, 0));
                    at += 8;
                }
                2 => {
                    let n = read_varint(d, &mut at)? as usize;
                    out.push((key >> 3, d.get(at..at + n)?, 0));
                    at += n;
                }
                5 => {
                    out.push((key >> 3, d.get(at..at + 4)?, 0));
                    at += 4;
                }
                _ => return None,
            }
        }
        Some(out)
    }
    let ev = fields(data)?;
    let step = ev.iter().find(|f| f.0 == 2).map_or(0, |f| f.2);
    let mut out = vec![];
    for (_, summary, _) in ev.iter().filter(|f| f.0 == 5) {
        for (_, value, _) in fields(summary)?.iter().filter(|f| f.0 == 1) {
            let v = fields(value)?;
            let tag = String::from_utf8(v.iter().find(|f| f.0 == 1)?.1.to_vec()).ok()?;
            let x = f32::from_le_bytes(v.iter().find(|f| f.0 == 2)?.1.try_into().ok()?);
            out.push((step, tag, x));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        // RFC 3720 / iSCSI: CRC-32C of "123456789" and of 32 zero bytes.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
    }

    #[test]
    fn scalars_round_trip_and_a_flipped_byte_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), 0).unwrap();
        let m = StepMetrics {
            step: 3,
            stage: "sparse".into(),
            lm_loss: Some(2.5),
            indexer_kl: 0.25,
            lr: 1e-3,
            indexer_lr: 1e-3,
            grad_norm: 1.5,
            indexer_grad_norm: 0.5,
            tokens: 4096,
            tokens_per_s: 1000.0,
            elapsed_s: 4.0,
            comm_s: 0.0,
            exchange_s: 0.0,
            exchange_bytes: 3 << 29,
            context_bytes: 1 << 29,
            gather_bytes: 1 << 28,
            max_expert_load: Some(1.25),
        };
        w.append(&m);
        let got = read_scalars(w.path()).unwrap();
        assert!(got.contains(&(3, "train/lm_loss".into(), 2.5)));
        assert!(got.contains(&(3, "train/max_expert_load".into(), 1.25)));
        assert!(got.contains(&(3, "perf/exchange_gib".into(), 1.5)));
        assert!(got.contains(&(3, "perf/context_gib".into(), 0.5)));
        assert!(got.contains(&(3, "perf/weight_gather_gib".into(), 0.25)));
        assert_eq!(got.len(), 15);
        let mut bytes = std::fs::read(w.path()).unwrap();
        let n = bytes.len();
        bytes[n - 10] ^= 1;
        std::fs::write(w.path(), bytes).unwrap();
        assert!(read_scalars(w.path())
            .unwrap_err()
            .to_string()
            .contains("checksum"));
    }
}
