//! Context parallelism: one sequence split over the `cp` ranks of a context group by query
//! rows. Everything in a decoder layer is per token except attention, and in MLA's absorbed
//! form a query reads only the shared latent row of each key (kv_lora_rank + rope values) and
//! the indexer's key (index_head_dim values). So a rank computes its own tokens end to end,
//! and per layer the group all-gathers the latent rows and indexer keys (`ContextShard::gather`);
//! the backward sends each key's gradient home and sums it there (`ContextShard::scatter_sum`).
//!
//! Load balance under the causal mask: the sequence is cut into 2 cp equal chunks and rank i
//! holds chunks i and 2 cp - 1 - i (a short-context chunk with a long-context one), so every
//! rank scores about the same number of (query, key) pairs. A rank's rows are its chunks in
//! position order; positions ascend along its rows.
//!
//! Numerics: a gather moves bits. A scatter-sum adds the members' f32 partial gradients in
//! group order (the same order on every rank, so every run gives the same bits); a single rank
//! sums the same terms in block order, so the two agree to f32 rounding, not bit for bit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Result, Tensor};

use super::expert::{all_to_all_rows_counted, RowExchange};

/// Bytes this process sent to the other ranks of its context group since the last
/// `take_context_bytes` (a measurement for the metrics; nothing numeric depends on it).
static CONTEXT_BYTES: AtomicU64 = AtomicU64::new(0);

/// Bytes of latent rows, indexer keys and their gradients this process sent since the last call.
pub fn take_context_bytes() -> u64 {
    CONTEXT_BYTES.swap(0, Ordering::Relaxed)
}

/// A run of consecutive query rows: `n` rows starting at local row `local` and at sequence
/// position `pos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowBlock {
    pub local: usize,
    pub pos: usize,
    pub n: usize,
}

/// The query rows a rank computes of each sequence: segments (first position, length) in
/// ascending position order. The whole sequence is one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryRows {
    segments: Vec<(usize, usize)>,
}

impl QueryRows {
    /// Every position of a sequence of `t` tokens.
    pub fn whole(t: usize) -> Self {
        Self {
            segments: vec![(0, t)],
        }
    }

    /// Chunks `index` and `2 parts - 1 - index` of 2 `parts` equal chunks of `t` positions.
    pub fn balanced(t: usize, parts: usize, index: usize) -> Self {
        let c = t / (2 * parts);
        Self {
            segments: vec![(index * c, c), ((2 * parts - 1 - index) * c, c)],
        }
    }

    /// Rows per sequence.
    pub fn len(&self) -> usize {
        self.segments.iter().map(|s| s.1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sequence position of each row.
    pub fn positions(&self) -> Vec<u32> {
        self.segments
            .iter()
            .flat_map(|&(p, n)| (p..p + n).map(|x| x as u32))
            .collect()
    }

    /// The rows at positions below `n` (a prefix of the sequence: the MTP module's).
    /// (A segment wholly beyond `n` is kept empty, so the segments still pair up across ranks.)
    pub fn below(&self, n: usize) -> Self {
        Self {
            segments: self
                .segments
                .iter()
                .map(|&(p, len)| (p.min(n), len.min(n.saturating_sub(p))))
                .collect(),
        }
    }

    /// The rows in blocks of `rows` (the last of a segment shorter; 0: a segment each), none
    /// crossing a segment.
    pub fn blocks(&self, rows: usize) -> Vec<RowBlock> {
        let mut out = vec![];
        let mut local = 0;
        for &(pos, len) in &self.segments {
            let step = if rows == 0 { len.max(1) } else { rows };
            for off in (0..len).step_by(step) {
                out.push(RowBlock {
                    local: local + off,
                    pos: pos + off,
                    n: step.min(len - off),
                });
            }
            local += len;
        }
        out
    }

    /// Segment i cut into `counts[i]` blocks of nearly equal size (the first ones one row
    /// longer when the length does not divide), in row order.
    fn blocks_per_segment(&self, counts: &[usize]) -> Vec<RowBlock> {
        let mut out = vec![];
        let mut local = 0;
        for (&(pos, len), &count) in self.segments.iter().zip(counts) {
            let count = count.clamp(1, len.max(1));
            let (base, extra) = (len / count, len % count);
            let mut off = 0;
            for i in 0..count {
                let n = base + usize::from(i < extra);
                out.push(RowBlock {
                    local: local + off,
                    pos: pos + off,
                    n,
                });
                off += n;
            }
            local += len;
        }
        out
    }

    /// The tokens `by` positions after the rows' own, from `tokens` [B, T] (every position):
    /// [B, m] for the first m rows, those whose position + `by` is below T (positions ascend
    /// along the rows, so the rows without such a token are the last ones).
    pub fn shifted(&self, tokens: &Tensor, by: usize) -> Result<Tensor> {
        let t = tokens.dim(1)?;
        let at: Vec<u32> = self
            .positions()
            .into_iter()
            .map(|p| p + by as u32)
            .filter(|&p| (p as usize) < t)
            .collect();
        let n = at.len();
        tokens.index_select(&Tensor::from_vec(at, n, tokens.device())?, 1)
    }

    /// The rows of `x` along `dim` that this rank holds, in row order (`x` covers every
    /// position along `dim`).
    pub fn take(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        if self.segments.len() == 1 && self.segments[0] == (0, x.dim(dim)?) {
            return Ok(x.clone());
        }
        let parts = self
            .segments
            .iter()
            .map(|&(p, n)| x.narrow(dim, p, n))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, dim)
    }
}

/// This rank's part of the sequences of a context group, and the channel to the other parts.
#[derive(Clone)]
pub struct ContextShard {
    /// Sequence length (the keys every query may read).
    pub t: usize,
    /// This rank's rows.
    pub rows: QueryRows,
    /// Every member's rows, by group index (the layout of a gather).
    members: Vec<QueryRows>,
    exchange: Arc<dyn RowExchange>,
}

impl ContextShard {
    /// The load-balanced split of sequences of `t` tokens over the members of `exchange`.
    pub fn balanced(t: usize, exchange: Arc<dyn RowExchange>) -> anyhow::Result<Self> {
        let cp = exchange.size();
        if !t.is_multiple_of(2 * cp) || t < 4 * cp {
            anyhow::bail!("data.seq_len = {t} must be a multiple of 2 x parallel.cp = {} and at least 4 x parallel.cp (each rank holds one chunk of at least 2 tokens from the front of a sequence and one from the back)", 2 * cp);
        }
        let members = (0..cp).map(|i| QueryRows::balanced(t, cp, i)).collect();
        Ok(Self {
            t,
            rows: QueryRows::balanced(t, cp, exchange.index()),
            members,
            exchange,
        })
    }

    /// This rank's rows in blocks of at most `rows` (0: a segment each), as many blocks per
    /// segment as the group member that needs the most: every member runs the same number of
    /// blocks, so the collectives inside a block (the expert exchange) pair up across ranks
    /// whose rows differ in number (the MTP module's prefix leaves the ranks holding a
    /// sequence's end a row or more short).
    pub fn blocks(&self, rows: usize) -> anyhow::Result<Vec<RowBlock>> {
        let counts: Vec<usize> = (0..self.rows.segments.len())
            .map(|i| {
                self.members
                    .iter()
                    .map(|m| match (m.segments.get(i), rows) {
                        (None, _) => 1,
                        (Some(_), 0) => 1,
                        (Some(&(_, len)), r) => len.div_ceil(r),
                    })
                    .max()
                    .unwrap_or(1)
            })
            .collect();
        // Checked over every member (each rank knows them all), so all fail together.
        for (m, member) in self.members.iter().enumerate() {
            for (i, (&(_, len), &count)) in member.segments.iter().zip(&counts).enumerate() {
                if len < count {
                    anyhow::bail!("context parallelism: segment {i} of group rank {m} has {len} rows for the {count} blocks another rank of the group runs (train.block_rows too small for data.seq_len / (2 parallel.cp))");
                }
            }
        }
        Ok(self.rows.blocks_per_segment(&counts))
    }

    /// Ranks in the group.
    pub fn size(&self) -> usize {
        self.exchange.size()
    }

    /// The same split of the first `n` positions (the MTP module's sequence).
    pub fn prefix(&self, n: usize) -> Self {
        Self {
            t: n,
            rows: self.rows.below(n),
            members: self.members.iter().map(|m| m.below(n)).collect(),
            exchange: self.exchange.clone(),
        }
    }

    /// Every position's row of `x` [B, rows, C] gathered from the group: [B, T, C], the same
    /// bits on every member.
    pub fn gather(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        if n != self.rows.len() {
            candle_core::bail!(
                "context gather: {n} rows, the rank holds {}",
                self.rows.len()
            );
        }
        let cp = self.size();
        // Rows first ([n, B C]) so that a row block is contiguous; my rows to every member.
        let mine = x.transpose(0, 1)?.contiguous()?.reshape((n, b * c))?;
        let send = vec![n; cp];
        let recv: Vec<usize> = self.members.iter().map(QueryRows::len).collect();
        let copies = vec![mine; cp];
        let got = all_to_all_rows_counted(
            &Tensor::cat(&copies, 0)?,
            &self.exchange,
            &send,
            &recv,
            &CONTEXT_BYTES,
        )?; // [T, B C], members' rows in group order
        let order = self.position_order(x.device())?;
        got.index_select(&order, 0)?
            .reshape((self.t, b, c))?
            .transpose(0, 1)?
            .contiguous()
    }

    /// The adjoint of `gather`: `dx` [B, T, C], this member's gradient of every position's
    /// row, summed over the group onto the rank that holds the row: [B, rows, C] f32, the
    /// members' terms added in group order.
    pub fn scatter_sum(&self, dx: &Tensor) -> Result<Tensor> {
        let (b, t, c) = dx.dims3()?;
        if t != self.t {
            candle_core::bail!(
                "context scatter: {t} positions, the sequence has {}",
                self.t
            );
        }
        let cp = self.size();
        let rows = dx
            .to_dtype(DType::F32)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((t, b * c))?;
        // Grouped by the member that holds each row.
        let by_member = Tensor::from_vec(
            self.members
                .iter()
                .flat_map(QueryRows::positions)
                .collect::<Vec<u32>>(),
            t,
            dx.device(),
        )?;
        let send: Vec<usize> = self.members.iter().map(QueryRows::len).collect();
        let n = self.rows.len();
        let got = all_to_all_rows_counted(
            &rows.index_select(&by_member, 0)?,
            &self.exchange,
            &send,
            &vec![n; cp],
            &CONTEXT_BYTES,
        )?; // [cp n, B C]
        let mut sum = got.narrow(0, 0, n)?;
        for i in 1..cp {
            sum = (sum + got.narrow(0, i * n, n)?)?;
        }
        sum.reshape((n, b, c))?.transpose(0, 1)?.contiguous()
    }

    /// `v` summed element-wise over the group, in group order (the same bits on every member).
    pub fn sum_host(&self, v: &[f32]) -> anyhow::Result<Vec<f32>> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let got = self.exchange.host(vec![bytes; self.size()])?;
        let mut out = vec![0f32; v.len()];
        for (i, part) in got.iter().enumerate() {
            if part.len() != 4 * v.len() {
                anyhow::bail!(
                    "context sum: group rank {i} sent {} values, expected {}",
                    part.len() / 4,
                    v.len()
                );
            }
            for (o, c) in out.iter_mut().zip(part.chunks_exact(4)) {
                *o += f32::from_le_bytes(c.try_into().expect("4 bytes"));
            }
        }
        Ok(out)
    }

    /// For each position, its row in the members' rows concatenated in group order.
    fn position_order(&self, device: &candle_core::Device) -> Result<Tensor> {
        let mut order = vec![0u32; self.t];
        for (row, p) in self
            .members
            .iter()
            .flat_map(QueryRows::positions)
            .enumerate()
        {
            order[p as usize] = row as u32;
        }
        Tensor::from_vec(order, self.t, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_rows_cover_every_position_once_and_blocks_stay_in_segments() {
        for (t, cp) in [(32, 2), (32, 4), (24, 3), (8, 1)] {
            let mut seen = vec![0; t];
            for i in 0..cp {
                let rows = QueryRows::balanced(t, cp, i);
                assert_eq!(rows.len(), t / cp);
                for p in rows.positions() {
                    seen[p as usize] += 1;
                }
                let blocks = rows.blocks(3);
                assert_eq!(blocks.iter().map(|b| b.n).sum::<usize>(), rows.len());
                let pos = rows.positions();
                for b in &blocks {
                    for r in 0..b.n {
                        assert_eq!(pos[b.local + r] as usize, b.pos + r);
                    }
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "t {t} cp {cp}: {seen:?}");
        }
        // A prefix drops the last positions (the rank holding the sequence's end).
        let rows = QueryRows::balanced(16, 2, 0); // [0, 4) and [12, 16)
        assert_eq!(rows.below(15).positions(), vec![0, 1, 2, 3, 12, 13, 14]);
        assert_eq!(QueryRows::balanced(16, 2, 1).below(15).len(), 8);
    }

    /// A group of `size` seen from member `index` (blocks and prefixes only: no traffic).
    struct Quiet(usize, usize);

    impl RowExchange for Quiet {
        fn size(&self) -> usize {
            self.0
        }
        fn index(&self) -> usize {
            self.1
        }
        fn host(&self, _: Vec<Vec<u8>>) -> anyhow::Result<Vec<Vec<u8>>> {
            anyhow::bail!("no traffic in this test")
        }
    }

    #[test]
    fn every_member_runs_as_many_blocks_of_a_prefix() {
        for (t, cp, rows, cut) in [(32, 4, 3, 1), (32, 2, 5, 1), (64, 2, 16, 2), (24, 3, 0, 1)] {
            let shards: Vec<ContextShard> = (0..cp)
                .map(|i| {
                    ContextShard::balanced(t, Arc::new(Quiet(cp, i)))
                        .unwrap()
                        .prefix(t - cut)
                })
                .collect();
            let blocks: Vec<Vec<RowBlock>> =
                shards.iter().map(|s| s.blocks(rows).unwrap()).collect();
            for (s, b) in shards.iter().zip(&blocks) {
                assert_eq!(b.len(), blocks[0].len(), "t {t} cp {cp} rows {rows}");
                assert_eq!(b.iter().map(|x| x.n).sum::<usize>(), s.rows.len());
                assert!(b.iter().all(|x| x.n >= 1 && (rows == 0 || x.n <= rows)));
                let pos = s.rows.positions();
                for x in b {
                    assert_eq!(pos[x.local] as usize, x.pos);
                }
            }
            // Every position below the prefix once.
            let mut seen: Vec<u32> = shards.iter().flat_map(|s| s.rows.positions()).collect();
            seen.sort();
            assert_eq!(seen, (0..(t - cut) as u32).collect::<Vec<_>>());
        }
        // Blocks of one row cannot pair up a member a row short: an error, not a hang.
        let short = ContextShard::balanced(16, Arc::new(Quiet(2, 0)))
            .unwrap()
            .prefix(15);
        assert!(short.blocks(1).is_err());
    }
}
