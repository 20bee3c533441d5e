//! `WindowSampler`: training windows from a `TokenStream`, in a shuffled order that depends
//! only on (seed, epoch), with a two-number cursor that makes resumption exact.
//!
//! The stream is cut into `len / seq_len` non-overlapping windows (the remainder is dropped);
//! window `w` is tokens `[w * seq_len, (w + 1) * seq_len)`. Windows may cross document and
//! shard boundaries: documents are packed back to back with BOS/EOS between them.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::stream::TokenStream;
use crate::rng::SplitMix64;

/// Where the sampler stands: the next window handed out is `order(epoch)[index]`.
/// Saved with a training checkpoint; `restore` continues bit for bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DataCursor {
    pub epoch: u64,
    pub index: u64,
}

pub struct WindowSampler {
    stream: TokenStream,
    seq_len: usize,
    windows: u64,
    seed: u64,
    cursor: DataCursor,
    /// The visiting order of `order_epoch`, built when that epoch is first read.
    order: Vec<u32>,
    order_epoch: Option<u64>,
}

impl WindowSampler {
    pub fn new(stream: TokenStream, seq_len: usize, seed: u64) -> Result<Self> {
        if seq_len == 0 {
            bail!("seq_len must be positive");
        }
        let windows = stream.len() / seq_len as u64;
        if windows == 0 {
            bail!(
                "{} holds {} tokens, fewer than one window of seq_len {seq_len}",
                stream.path().display(),
                stream.len()
            );
        }
        // The order is stored as u32 to halve its memory (one entry per window).
        if windows > u32::MAX as u64 {
            bail!(
                "{} holds {windows} windows of seq_len {seq_len}, more than 2^32",
                stream.path().display()
            );
        }
        Ok(Self {
            stream,
            seq_len,
            windows,
            seed,
            cursor: DataCursor::default(),
            order: Vec::new(),
            order_epoch: None,
        })
    }

    pub fn windows(&self) -> u64 {
        self.windows
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    pub fn stream(&self) -> &TokenStream {
        &self.stream
    }

    pub fn cursor(&self) -> DataCursor {
        self.cursor
    }

    /// Continue from a saved cursor: the next batches are those an uninterrupted run would
    /// have returned after reaching it.
    pub fn restore(&mut self, cursor: DataCursor) -> Result<()> {
        if cursor.index >= self.windows {
            bail!(
                "data cursor index {} is past the {} windows of {} at seq_len {}: the cursor was saved for other data or another seq_len",
                cursor.index, self.windows, self.stream.path().display(), self.seq_len
            );
        }
        self.cursor = cursor;
        Ok(())
    }

    /// The visiting order of `epoch`: a permutation of `0..windows`.
    pub fn epoch_order(&self, epoch: u64) -> Vec<u32> {
        shuffled_order(self.windows as u32, self.seed, epoch)
    }

    /// The next `n` windows, rolling over into the next epoch as needed.
    pub fn next_batch(&mut self, n: usize) -> Result<Vec<Vec<u32>>> {
        let mut batch = Vec::with_capacity(n);
        for _ in 0..n {
            if self.order_epoch != Some(self.cursor.epoch) {
                self.order = self.epoch_order(self.cursor.epoch);
                self.order_epoch = Some(self.cursor.epoch);
            }
            let w = self.order[self.cursor.index as usize] as u64;
            let mut window = vec![0u32; self.seq_len];
            self.stream
                .copy_range(w * self.seq_len as u64, &mut window)?;
            batch.push(window);
            // Advance only after a successful read, so that a failed batch can be retried.
            self.cursor.index += 1;
            if self.cursor.index == self.windows {
                self.cursor = DataCursor {
                    epoch: self.cursor.epoch + 1,
                    index: 0,
                };
            }
        }
        Ok(batch)
    }
}

/// The seed of an epoch's shuffle: the seed's first splitmix64 output xor the epoch, so that
/// epochs draw from unrelated streams (splitmix64 states that differ by a few bits share no
/// outputs in practice) and every (seed, epoch) pair is reproducible.
fn epoch_seed(seed: u64, epoch: u64) -> u64 {
    SplitMix64::new(seed).next_u64() ^ epoch
}

/// Fisher–Yates over `0..n`. The bound is drawn by multiply-shift (Lemire): the bias is at
/// most n / 2^64, far below anything observable, and no rejection loop is needed.
fn shuffled_order(n: u32, seed: u64, epoch: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n).collect();
    let mut rng = SplitMix64::new(epoch_seed(seed, epoch));
    for i in (1..order.len()).rev() {
        let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_is_a_permutation_that_depends_on_seed_and_epoch() {
        let a = shuffled_order(1000, 7, 0);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, shuffled_order(1000, 7, 0));
        assert_ne!(a, shuffled_order(1000, 7, 1));
        assert_ne!(a, shuffled_order(1000, 8, 0));
        assert_ne!(a, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn shuffle_draws_every_order_of_four_windows_equally_often() {
        // 24000 epochs over the 24 orders: ~1000 each, standard deviation ~31, so +-200 never
        // fails by chance. A naive shuffle (j drawn from 0..n at every step) gives orders with
        // probabilities from 1/64 to 5/64, and Sattolo's off-by-one (j < i) only 6 orders.
        let mut counts = std::collections::HashMap::new();
        for epoch in 0..24000 {
            *counts.entry(shuffled_order(4, 3, epoch)).or_insert(0u32) += 1;
        }
        assert_eq!(counts.len(), 24);
        assert!(
            counts.values().all(|c| (800..1200).contains(c)),
            "{counts:?}"
        );
    }

    #[test]
    fn shuffle_of_zero_or_one_window_is_trivial() {
        assert!(shuffled_order(0, 1, 0).is_empty());
        assert_eq!(shuffled_order(1, 1, 5), vec![0]);
    }
}
