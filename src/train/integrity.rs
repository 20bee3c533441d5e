//! Checkpoint integrity: the `COMPLETE` marker lists every file of a `step-N` folder with its
//! size and XXH3-64 checksum, so that a flipped byte, a truncated shard or an edited tensor is
//! found before the step is trusted.
//!
//! Marker format (JSON): `{"format_version": 1, "files": {"params.safetensors": {"bytes": N,
//! "xxh3_64": "<16 hex digits>"}, ...}}`. Sizes are compared first (a truncated file fails at
//! once); then each file is hashed, files in parallel, 8 MiB reads. The checksum is of the
//! bytes on disk after they were written and flushed, so it also catches a write that the
//! storage got wrong. XXH3-64 is not cryptographic: it finds damage, not tampering by someone
//! who means it. A marker written before checksums existed is empty; such a step is used with a
//! warning (it cannot be verified).
//!
//! What a reader checks (`Use`): resuming reads every file; using a step as a model (an overlay
//! of `model.path`, `eval`, `export`) reads only its parameters and metadata, so a chain's
//! hard-linked copy of a parent (params without optimizer state) verifies as a model.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub const MARKER: &str = "COMPLETE";
const MARKER_FORMAT: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSum {
    pub bytes: u64,
    #[serde(with = "hex64")]
    pub xxh3_64: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    pub format_version: u32,
    pub files: BTreeMap<String, FileSum>,
}

/// Which files of a step a reader relies on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Everything: parameters, optimizer state, metadata.
    Resume,
    /// Parameters and metadata, not the optimizer state.
    Model,
}

impl Use {
    fn needs(self, file: &str) -> bool {
        match self {
            Use::Resume => true,
            Use::Model => !file.starts_with("optimizer."),
        }
    }
}

/// Size and XXH3-64 of a file, read in 8 MiB pieces.
pub fn sum_file(path: &Path) -> Result<FileSum> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 8 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileSum {
        bytes,
        xxh3_64: hasher.digest(),
    })
}

/// Sums of the named files of `dir`, hashed in parallel.
pub fn sum_files(dir: &Path, names: &[String]) -> Result<BTreeMap<String, FileSum>> {
    names
        .par_iter()
        .map(|n| Ok((n.clone(), sum_file(&dir.join(n))?)))
        .collect()
}

/// Write `bytes` to `path` and flush them to the storage before returning.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Write the marker of `dir` (synced): the last file of a checkpoint.
pub fn write_marker(dir: &Path, files: BTreeMap<String, FileSum>) -> Result<()> {
    let text = serde_json::to_string_pretty(&Marker {
        format_version: MARKER_FORMAT,
        files,
    })?;
    write_synced(&dir.join(MARKER), text.as_bytes())
}

/// The marker of `dir`: `None` when it is the empty marker of a step written before checksums.
pub fn read_marker(dir: &Path) -> Result<Option<Marker>> {
    let path = dir.join(MARKER);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} is not a complete checkpoint (no {MARKER} marker)",
            dir.display()
        )
    })?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    let m: Marker = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: damaged marker ({e})", path.display()))?;
    if m.format_version != MARKER_FORMAT {
        bail!(
            "{}: marker format {} is not supported (this build reads {MARKER_FORMAT})",
            path.display(),
            m.format_version
        );
    }
    Ok(Some(m))
}

/// Check the files of `dir` that `what` needs against its marker: each must exist with its
/// recorded size and checksum. The error names the first damaged file.
pub fn verify(dir: &Path, what: Use) -> Result<()> {
    verify_share(dir, what, 0, 1)
}

/// `verify` of every `world`-th needed file starting at `rank` (sorted by name): the ranks of
/// a job split the reading of a large checkpoint among them.
pub fn verify_share(dir: &Path, what: Use, rank: usize, world: usize) -> Result<()> {
    let Some(marker) = read_marker(dir)? else {
        // Only steps of format 1 were written with an empty marker; a newer step with one has
        // lost its checksums (damaged, or emptied by hand) and is not trusted.
        let state = dir.join("state.json");
        let format = std::fs::read_to_string(&state)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["format_version"].as_u64());
        if format != Some(1) {
            bail!("{}: the marker is empty but {} is not of format 1 (a step written before checksums): the step is damaged; this checkpoint cannot be used", dir.join(MARKER).display(), state.display());
        }
        if rank == 0 {
            crate::elog!("[checkpoint] warning: {} was written without checksums (an older dsa-train); it cannot be verified", dir.display());
        }
        return Ok(());
    };
    // A tensor or layout file the marker does not list was added afterwards: readers go by the
    // marker, but such a file means someone changed the step.
    if rank == 0 {
        for e in std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .filter_map(|e| e.ok())
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let ours = name.ends_with(".safetensors")
                || name == "manifest.json"
                || name == "state.json"
                || name == "recipe.toml";
            if ours && !marker.files.contains_key(&name) {
                bail!("{}: not listed in the checkpoint's marker (added after the checkpoint was written); this checkpoint cannot be used", e.path().display());
            }
        }
    }
    let needed: Vec<(&String, &FileSum)> =
        marker.files.iter().filter(|(n, _)| what.needs(n)).collect();
    let mine: Vec<(&String, &FileSum)> = needed
        .into_iter()
        .skip(rank)
        .step_by(world.max(1))
        .collect();
    // Sizes first: a truncated or missing file is reported without hashing anything.
    for (name, want) in &mine {
        let path = dir.join(name);
        let meta = std::fs::metadata(&path).with_context(|| {
            format!(
                "{}: missing, but the checkpoint's marker lists it",
                path.display()
            )
        })?;
        if meta.len() != want.bytes {
            bail!("{}: {} bytes, but the checkpoint recorded {} (truncated or replaced); this checkpoint cannot be used", path.display(), meta.len(), want.bytes);
        }
    }
    let bad: Vec<String> = mine
        .par_iter()
        .map(|(name, want)| -> Result<Option<String>> {
            let got = sum_file(&dir.join(name))?;
            Ok((got != **want).then(|| name.to_string()))
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    if let Some(first) = bad.first() {
        bail!(
            "{}: checksum mismatch (the file changed after the checkpoint was written: damaged or edited); this checkpoint cannot be used",
            dir.join(first).display()
        );
    }
    Ok(())
}

/// u64 as 16 lower-case hex digits in JSON (readable, and exact where a JSON number is not).
mod hex64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        u64::from_str_radix(&s, 16).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flipped_byte_a_truncation_and_a_missing_file_are_each_named() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("params.safetensors"), vec![7u8; 100_000]).unwrap();
        std::fs::write(d.join("optimizer.safetensors"), vec![1u8; 5000]).unwrap();
        let names = vec![
            "params.safetensors".to_string(),
            "optimizer.safetensors".to_string(),
        ];
        write_marker(d, sum_files(d, &names).unwrap()).unwrap();
        verify(d, Use::Resume).unwrap();

        std::fs::write(d.join("params.rank-00001.safetensors"), b"stray").unwrap();
        let err = verify(d, Use::Model).unwrap_err().to_string();
        assert!(
            err.contains("params.rank-00001.safetensors") && err.contains("not listed"),
            "{err}"
        );
        std::fs::remove_file(d.join("params.rank-00001.safetensors")).unwrap();

        let mut bytes = std::fs::read(d.join("optimizer.safetensors")).unwrap();
        bytes[4321] ^= 0x10;
        std::fs::write(d.join("optimizer.safetensors"), &bytes).unwrap();
        let err = verify(d, Use::Resume).unwrap_err().to_string();
        assert!(
            err.contains("optimizer.safetensors") && err.contains("checksum mismatch"),
            "{err}"
        );
        // A model reader does not need the optimizer state.
        verify(d, Use::Model).unwrap();

        std::fs::write(d.join("params.safetensors"), vec![7u8; 99_999]).unwrap();
        let err = verify(d, Use::Model).unwrap_err().to_string();
        assert!(
            err.contains("params.safetensors")
                && err.contains("99999 bytes")
                && err.contains("100000"),
            "{err}"
        );
        std::fs::remove_file(d.join("params.safetensors")).unwrap();
        assert!(verify(d, Use::Model)
            .unwrap_err()
            .to_string()
            .contains("missing"));

        // The split among ranks covers every file once.
        std::fs::write(d.join("params.safetensors"), vec![7u8; 100_000]).unwrap();
        let fails: Vec<bool> = (0..2)
            .map(|r| verify_share(d, Use::Resume, r, 2).is_err())
            .collect();
        assert_eq!(
            fails.iter().filter(|&&f| f).count(),
            1,
            "exactly one rank reads the damaged file"
        );
    }

    #[test]
    fn the_empty_marker_of_an_older_build_is_accepted_and_a_torn_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MARKER), b"").unwrap();
        std::fs::write(dir.path().join("state.json"), br#"{"format_version": 1}"#).unwrap();
        verify(dir.path(), Use::Resume).unwrap();
        // An emptied marker of a step that had checksums is damage.
        std::fs::write(dir.path().join("state.json"), br#"{"format_version": 2}"#).unwrap();
        assert!(verify(dir.path(), Use::Resume)
            .unwrap_err()
            .to_string()
            .contains("the marker is empty"));
        std::fs::write(dir.path().join(MARKER), b"{\"format_version\": 1, \"fi").unwrap();
        assert!(verify(dir.path(), Use::Resume)
            .unwrap_err()
            .to_string()
            .contains("damaged marker"));
    }
}
