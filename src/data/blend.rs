//! Blends: training windows drawn from several corpora in set proportions, deterministically
//! and with exact resume.
//!
//! Each source is its own `WindowSampler` (its own shuffled epochs, seeded from the run's seed
//! and the source's position in the list). Which source serves the next window is a weighted
//! round robin on counts alone: after n windows, source i has served `taken_i`, and window
//! n + 1 goes to the source with the largest deficit `w_i (n + 1) - taken_i` (weights
//! normalised to sum 1; the lower index on ties). So every source's share stays within one
//! window of `w_i n` at every n, the sequence depends only on the weights, and the cursor is
//! the sources' own cursors plus their counts.
//!
//! `Sampler` is what the trainer holds: one corpus (`data.path`) or a blend (`data.blend`).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::sampler::{DataCursor, WindowSampler};
use super::stream::TokenStream;

/// Where a blend stands: each source's cursor and how many windows it has served.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BlendCursor {
    pub sources: Vec<DataCursor>,
    pub taken: Vec<u64>,
}

pub struct BlendSampler {
    sources: Vec<WindowSampler>,
    /// Normalised to sum 1.
    weights: Vec<f64>,
    taken: Vec<u64>,
}

impl BlendSampler {
    /// `sources` with their (positive) weights.
    pub fn new(sources: Vec<(WindowSampler, f64)>) -> Result<Self> {
        if sources.is_empty() {
            bail!("a blend needs at least one source");
        }
        if let Some((s, w)) = sources.iter().find(|(_, w)| !(w.is_finite() && *w > 0.0)) {
            bail!(
                "{}: blend weight {w} must be a positive number",
                s.stream().path().display()
            );
        }
        let total: f64 = sources.iter().map(|(_, w)| w).sum();
        let n = sources.len();
        let (sources, weights) = sources.into_iter().map(|(s, w)| (s, w / total)).unzip();
        Ok(Self {
            sources,
            weights,
            taken: vec![0; n],
        })
    }

    /// The sources in recipe order.
    pub fn sources(&self) -> impl Iterator<Item = &WindowSampler> {
        self.sources.iter()
    }

    /// The source that serves the next window (largest deficit, lower index on ties).
    fn next_source(&self) -> usize {
        let n = self.taken.iter().sum::<u64>() as f64 + 1.0;
        let deficit = |i: usize| self.weights[i] * n - self.taken[i] as f64;
        (1..self.sources.len()).fold(
            0,
            |best, i| if deficit(i) > deficit(best) { i } else { best },
        )
    }

    pub fn next_batch(&mut self, n: usize) -> Result<Vec<Vec<u32>>> {
        let mut batch = Vec::with_capacity(n);
        for _ in 0..n {
            let i = self.next_source();
            batch.extend(self.sources[i].next_batch(1)?);
            // Counted only after a successful read, as the sources' cursors are.
            self.taken[i] += 1;
        }
        Ok(batch)
    }

    pub fn cursor(&self) -> BlendCursor {
        BlendCursor {
            sources: self.sources.iter().map(WindowSampler::cursor).collect(),
            taken: self.taken.clone(),
        }
    }

    pub fn restore(&mut self, cursor: &BlendCursor) -> Result<()> {
        if cursor.sources.len() != self.sources.len() || cursor.taken.len() != self.sources.len() {
            bail!(
                "the blend cursor has {} sources, data.blend lists {}",
                cursor.sources.len(),
                self.sources.len()
            );
        }
        for (s, c) in self.sources.iter_mut().zip(&cursor.sources) {
            s.restore(*c)?;
        }
        self.taken = cursor.taken.clone();
        Ok(())
    }
}

/// The trainer's windows: one corpus or a blend.
pub enum Sampler {
    One(WindowSampler),
    Blend(BlendSampler),
}

/// One source of a blend, from a recipe's `[[data.blend]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlendSource {
    /// A corpus as `data.path` takes it.
    pub path: String,
    /// Its share of the windows (any positive scale; normalised over the blend).
    pub weight: f64,
}

impl Sampler {
    /// `data.path` (with `blend` empty) or the `blend` sources, windows of `seq_len` tokens
    /// checked against `vocab_size`. Source i of a blend shuffles with `seed` + i.
    pub fn open(
        path: &str,
        blend: &[BlendSource],
        seq_len: usize,
        vocab_size: usize,
        seed: u64,
    ) -> Result<Self> {
        if blend.is_empty() {
            let stream = TokenStream::open(std::path::Path::new(path), vocab_size)?;
            return Ok(Sampler::One(WindowSampler::new(stream, seq_len, seed)?));
        }
        let sources = blend
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let stream = TokenStream::open(std::path::Path::new(&b.path), vocab_size)
                    .with_context(|| format!("data.blend[{i}]"))?;
                let s = WindowSampler::new(stream, seq_len, seed.wrapping_add(i as u64))
                    .with_context(|| format!("data.blend[{i}]"))?;
                Ok((s, b.weight))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Sampler::Blend(BlendSampler::new(sources)?))
    }

    /// The end-of-document token of every source, where its data says it (a prepared
    /// directory's index.json; None for raw token files and Megatron datasets), with the
    /// source's path.
    pub fn eos_ids(&self) -> Vec<(std::path::PathBuf, Option<u32>)> {
        let one = |s: &WindowSampler| {
            let stream = s.stream();
            (
                stream.path().to_path_buf(),
                stream.index().map(|i| i.eos_id),
            )
        };
        match self {
            Sampler::One(s) => vec![one(s)],
            Sampler::Blend(b) => b.sources().map(one).collect(),
        }
    }

    pub fn next_batch(&mut self, n: usize) -> Result<Vec<Vec<u32>>> {
        match self {
            Sampler::One(s) => s.next_batch(n),
            Sampler::Blend(b) => b.next_batch(n),
        }
    }

    /// The cursor a checkpoint saves: the one corpus's, or the blend's.
    pub fn cursor(&self) -> (DataCursor, Option<BlendCursor>) {
        match self {
            Sampler::One(s) => (s.cursor(), None),
            Sampler::Blend(b) => (DataCursor::default(), Some(b.cursor())),
        }
    }

    /// Continue from a checkpoint's cursor (the kind must match: one corpus or a blend).
    pub fn restore(&mut self, one: DataCursor, blend: Option<&BlendCursor>) -> Result<()> {
        match (self, blend) {
            (Sampler::One(s), None) => s.restore(one),
            (Sampler::Blend(b), Some(c)) => b.restore(c),
            (Sampler::One(_), Some(_)) => {
                bail!("the checkpoint was written by a blend run; this recipe reads one corpus")
            }
            (Sampler::Blend(_), None) => {
                bail!(
                    "the checkpoint was written by a run on one corpus; this recipe reads a blend"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw token file of `n` tokens whose values say which file and position they came from.
    fn corpus(dir: &std::path::Path, name: &str, tag: u32, n: u32) -> String {
        let p = dir.join(name);
        let bytes: Vec<u8> = (0..n)
            .flat_map(|i| (tag * 10_000 + i).to_le_bytes())
            .collect();
        std::fs::write(&p, bytes).unwrap();
        p.to_string_lossy().into_owned()
    }

    fn blend(dir: &std::path::Path) -> Vec<BlendSource> {
        vec![
            BlendSource {
                path: corpus(dir, "a.bin", 1, 400),
                weight: 3.0,
            },
            BlendSource {
                path: corpus(dir, "b.bin", 2, 120),
                weight: 1.0,
            },
        ]
    }

    #[test]
    fn a_blend_serves_each_source_its_share_at_every_point() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Sampler::open("", &blend(dir.path()), 8, 100_000, 5).unwrap();
        let (mut a, mut b) = (0usize, 0usize);
        for n in 1..=200 {
            let w = s.next_batch(1).unwrap().remove(0);
            if w[0] / 10_000 == 1 {
                a += 1
            } else {
                b += 1
            }
            // Within one window of 3/4 and 1/4 of n at every n.
            assert!(
                (a as f64 - 0.75 * n as f64).abs() <= 1.0,
                "n {n}: {a} from a"
            );
        }
        assert_eq!((a, b), (150, 50));
        // b has 15 windows of 8 tokens: its epochs roll over while a's continue.
        match &s {
            Sampler::Blend(bl) => assert_eq!(bl.cursor().sources[1].epoch, 3),
            Sampler::One(_) => unreachable!(),
        }
    }

    #[test]
    fn a_blend_resumes_bit_for_bit_from_its_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let src = blend(dir.path());
        let mut whole = Sampler::open("", &src, 8, 100_000, 7).unwrap();
        let first = whole.next_batch(37).unwrap();
        let (one, cursor) = whole.cursor();
        let rest = whole.next_batch(50).unwrap();
        let mut resumed = Sampler::open("", &src, 8, 100_000, 7).unwrap();
        resumed.restore(one, cursor.as_ref()).unwrap();
        assert_eq!(resumed.next_batch(50).unwrap(), rest);
        // The same seed and weights give the same windows; another seed others.
        let mut again = Sampler::open("", &src, 8, 100_000, 7).unwrap();
        assert_eq!(again.next_batch(37).unwrap(), first);
        let mut other = Sampler::open("", &src, 8, 100_000, 8).unwrap();
        assert_ne!(other.next_batch(37).unwrap(), first);
        // A cursor of the wrong kind or size is refused by name.
        let mut single = Sampler::open(&src[0].path, &[], 8, 100_000, 7).unwrap();
        let e = single
            .restore(one, cursor.as_ref())
            .unwrap_err()
            .to_string();
        assert!(e.contains("blend"), "{e}");
        let mut c = cursor.unwrap();
        c.taken.pop();
        let e = resumed.restore(one, Some(&c)).unwrap_err().to_string();
        assert!(e.contains("2"), "{e}");
    }

    #[test]
    fn a_bad_blend_weight_names_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = blend(dir.path());
        src[1].weight = 0.0;
        let e = Sampler::open("", &src, 8, 100_000, 1)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("b.bin") && e.contains("positive"), "{e}");
    }
}
