//! Gradient sums and the ZeRO optimizer sharding over the ranks that hold a tensor.
//!
//! Every row of every trainable tensor has one owner among the tensor's holders (all dp ranks
//! for replicated tensors, the dp/ep replicas for routed experts), which keeps its f32 master
//! and Adam moments and updates it (ZeRO-1). Ownership is by row ranges (`OwnedRange`,
//! `assign_row_ranges`): a tensor larger than its holders' fair share (the group's elements
//! over the number of holders) is cut along dim 0 into about equal contiguous ranges, each no
//! larger than the share, so no rank holds much more than the average (the 671B embedding is
//! 3x a rank's share at dp 2048); smaller tensors stay whole. One holder never splits.
//! Gradients go through two maps of `GradAccum`:
//! `pending` (this rank's local sum since the last reduction) and `grads` (summed over the
//! holders, what the optimizer reads).
//!
//! - ZeRO-1 (`parallel.zero = 1`): every rank keeps `pending` for the whole step and, after
//!   the last micro-batch, sums it over the holders into `grads` on every rank.
//! - ZeRO-2 (`parallel.zero = 2`): the trainer calls `Reducer::flush` for a layer as soon as
//!   that layer's backward has run (and for everything left at the end of each micro-batch);
//!   the sum lands in `grads` on the owner only (a split tensor's owners keep their rows,
//!   under `optim::piece_name`) and the other ranks free their copy. A rank
//!   then holds, besides the gradients it owns, at most one layer's unreduced gradients.
//!   Sums are reduced in place (`sum_in_place`): a tensor above `BUCKET` values goes in row
//!   chunks whose totals overwrite the rows they came from, so a reduction holds the sum and
//!   one chunk, not a second whole copy.
//!   The gradient norm for clipping is the rank-ordered sum of the owned ranges' squared norms.
//! - ZeRO-3 (`parallel.zero = 3`): ZeRO-2, and the tensors the decoder layers train are held
//!   only as the owned rows' f32 masters (`shard_layers`); a layer gathers them whole when it
//!   runs (`model::sharded`), so nothing is shared after the step.
//!
//! Numerics: sums are f32, added in rank order on every rank (the TCP backend) or by NCCL's
//! all-reduce (GPU ranks). ZeRO-1 adds a rank's micro-batches first and then the ranks; ZeRO-2
//! adds the ranks of each micro-batch first; the two differ only in rounding. A tensor that
//! has a gradient on any holder gets one on all of them (zeros where it had none), decided by
//! a summed presence flag per tensor, so every holder updates the same set of tensors.

use std::cell::RefCell;
use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Shape, Tensor};

use super::accumulate::GradSum;
use super::optim::{assign_owners, piece_name, GradAccum, Slot};
use crate::dist::expert::RowExchange;
use crate::dist::Collective;
use crate::model::sharded::{ShardedParams, ShardedWeight};
use crate::model::Model;
use crate::recipe::Layout;
use crate::weights;

/// About 2^24 f32 values (64 MiB) per collective call.
pub const BUCKET: usize = 1 << 24;

/// Is `name` a routed expert split over the expert-parallel ranks?
fn is_sharded_expert(layout: &Layout, name: &str) -> bool {
    layout.ep > 1 && weights::routed_expert(name).is_some()
}

/// Rows `rows` of tensor `slot` are owned by `owner`: that rank keeps their f32 master, Adam
/// moments and (ZeRO-2) summed gradient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRange {
    pub slot: usize,
    pub rows: Range<usize>,
    pub owner: usize,
}

/// Owners among `ranks` holders for a group of tensors, each given as (rows along dim 0,
/// elements per row): a tensor above the fair share (ceil(total elements / ranks)) is cut into
/// ceil(elements / share) ranges of about equal whole rows (at least one row each), then
/// every range or whole tensor goes, largest first, to the least-loaded rank (lowest index on
/// ties; `assign_owners`). Deterministic: every rank computes the same list. `slot` indexes
/// `tensors`, `owner` is 0..ranks; the ranges of a tensor are in row order and cover it once.
pub fn assign_row_ranges(tensors: &[(usize, usize)], ranks: usize) -> Vec<OwnedRange> {
    let ranks = ranks.max(1);
    let total: usize = tensors.iter().map(|&(r, c)| r * c).sum();
    let share = total.div_ceil(ranks).max(1);
    let mut pieces = vec![];
    for (slot, &(rows, cols)) in tensors.iter().enumerate() {
        let n = if ranks == 1 {
            1
        } else {
            (rows * cols).div_ceil(share).clamp(1, rows.max(1))
        };
        // Range j: rows [j rows / n, (j + 1) rows / n).
        pieces.extend((0..n).map(|j| OwnedRange {
            slot,
            rows: j * rows / n..(j + 1) * rows / n,
            owner: 0,
        }));
    }
    let sizes: Vec<usize> = pieces
        .iter()
        .map(|p| p.rows.len() * tensors[p.slot].1)
        .collect();
    for (p, owner) in pieces.iter_mut().zip(assign_owners(&sizes, ranks)) {
        p.owner = owner;
    }
    pieces
}

/// Rows and elements per row of a tensor of shape `shape` (a scalar is one row).
fn row_shape(shape: &Shape) -> (usize, usize) {
    match shape.dims().split_first() {
        Some((&rows, rest)) => (rows, rest.iter().product()),
        None => (1, 1),
    }
}

/// The owned ranges of every slot in the job as this rank sees it: replicated tensors spread
/// over all dp ranks, routed experts over the ranks holding the same experts; `slot` indexes
/// `slots`, `owner` is a rank of the job.
pub fn slot_ranges(slots: &[Slot], layout: &Layout, rank: usize) -> Vec<OwnedRange> {
    let named: Vec<(&str, &Shape)> = slots.iter().map(|s| (s.name.as_str(), s.shape())).collect();
    named_ranges(&named, layout, rank)
}

/// `slot_ranges` of the tensors `named` (name, whole shape), in slot order: what the trainer
/// computes from its slots, known before anything is loaded.
pub fn named_ranges(named: &[(&str, &Shape)], layout: &Layout, rank: usize) -> Vec<OwnedRange> {
    let mut out = vec![];
    let everyone: Vec<usize> = (0..layout.world).collect();
    for (experts, members) in [(false, everyone), (true, layout.expert_replicas(rank))] {
        let idx: Vec<usize> = (0..named.len())
            .filter(|&i| is_sharded_expert(layout, named[i].0) == experts)
            .collect();
        let shapes: Vec<(usize, usize)> = idx.iter().map(|&i| row_shape(named[i].1)).collect();
        out.extend(
            assign_row_ranges(&shapes, members.len())
                .into_iter()
                .map(|r| OwnedRange {
                    slot: idx[r.slot],
                    rows: r.rows,
                    owner: members[r.owner],
                }),
        );
    }
    out
}

/// ZeRO-3 holds trained tensor `name` as this rank's rows: a tensor of a decoder layer (the
/// main layers', and the MTP module's layer but not the module's own norms, input projection
/// and head), unless it is a routed expert whose ep group gives each expert one holder
/// (`expert_replicas` false: the holder keeps it whole). `main_layers`: config.json's
/// num_hidden_layers. The trainer loads these a rank's rows at a time; `shard_layers` checks
/// that they are the tensors its layers hold.
pub fn held_as_rows(
    name: &str,
    main_layers: usize,
    layout: &Layout,
    expert_replicas: bool,
) -> bool {
    let Some((l, tail)) = name
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once('.'))
    else {
        return false;
    };
    let Ok(l) = l.parse::<usize>() else {
        return false;
    };
    let mtp_own = [
        "enorm.",
        "hnorm.",
        "eh_proj.",
        "shared_head.",
        "embed_tokens.",
    ];
    let in_layer = l < main_layers || !mtp_own.iter().any(|p| tail.starts_with(p));
    in_layer && (!is_sharded_expert(layout, name) || expert_replicas)
}

/// ZeRO-3: registers the tensors the decoder layers train, loaded as this rank's rows
/// (`Slot::from_rows`, `held_as_rows`), with the model, whose layers hold their placeholders
/// and gather them (`model::sharded`) when a layer runs. The rows are the ZeRO ownership of
/// `slot_ranges`, so a rank holds the weights whose optimizer state it keeps and nothing else
/// of them. Holders: every rank (`everyone`) for the tensors outside the routed experts; an
/// expert's replicas (`replicas`, None when each expert has one holder, who keeps it whole)
/// for the experts. Tensors outside the layers (embedding, final norm, head, the MTP input
/// projection) stay whole. A layer tensor loaded whole, or rows no layer holds, is an error:
/// the loader and this walk must agree.
pub fn shard_layers(
    model: &mut Model,
    slots: &[Slot],
    layout: &Layout,
    rank: usize,
    everyone: Arc<dyn RowExchange>,
    replicas: Option<Arc<dyn RowExchange>>,
) -> Result<()> {
    let in_layers = model.layer_tensor_ids()?;
    let ranges = slot_ranges(slots, layout, rank);
    let all: Vec<usize> = (0..layout.world).collect();
    let expert_members = layout.expert_replicas(rank);
    let mut channels = vec![everyone];
    channels.extend(replicas.clone());
    let mut params = ShardedParams::new(channels);
    for (i, s) in slots.iter().enumerate() {
        let holders = match (is_sharded_expert(layout, &s.name), &replicas) {
            _ if !in_layers.contains(&s.var.as_tensor().id()) => None,
            (false, _) => Some((0, &all)),
            (true, Some(_)) => Some((1, &expert_members)),
            (true, None) => None,
        };
        let Some((group, members)) = holders else {
            if s.sharded {
                bail!("{}: loaded as this rank's rows, but ZeRO-3 does not shard it (a decoder layer does not hold it, or its expert has one holder)", s.name);
            }
            continue;
        };
        if !s.sharded {
            bail!(
                "{}: a decoder layer trains it under ZeRO-3, but it was loaded whole",
                s.name
            );
        }
        let mut owned = vec![];
        for r in ranges.iter().filter(|r| r.slot == i) {
            let Some(index) = members.iter().position(|&m| m == r.owner) else {
                bail!("{}: rows owned by rank {}, not a holder", s.name, r.owner);
            };
            owned.push((index, r.rows.clone()));
        }
        owned.sort_by_key(|(_, rows)| rows.start);
        let weight = ShardedWeight {
            name: s.name.clone(),
            dims: s.shape().dims().to_vec(),
            dtype: s.var.as_tensor().dtype(),
            ranges: owned,
            mine: s.masters_in_row_order()?,
            group,
        };
        params.insert(s.var.as_tensor().id(), weight)?;
    }
    model.sharded = params;
    Ok(())
}

/// ZeRO-3, after an optimizer step: the layers gather the owners' new masters from now on.
pub fn share_sharded_masters(model: &mut Model, slots: &[Slot]) -> Result<()> {
    for s in slots.iter().filter(|s| s.sharded) {
        model
            .sharded
            .set_mine(s.var.as_tensor().id(), s.masters_in_row_order()?)?;
    }
    Ok(())
}

/// Sum over `members` one f32 tensor per item (`mine(k)`; None counts as zeros), flattened
/// into buckets of about `BUCKET` values, one collective call per bucket; `take(k, sum)` gets
/// each item's sum in its shape. Members call it with the same items in the same order.
pub fn bucketed_sum(
    comm: &mut dyn Collective,
    device: &Device,
    shapes: &[Shape],
    members: &[usize],
    mut mine: impl FnMut(usize) -> Result<Option<Tensor>>,
    mut take: impl FnMut(usize, Tensor) -> Result<()>,
) -> Result<()> {
    let mut start = 0;
    while start < shapes.len() {
        let mut end = start;
        let mut len = 0;
        while end < shapes.len() && (end == start || len + shapes[end].elem_count() <= BUCKET) {
            len += shapes[end].elem_count();
            end += 1;
        }
        let parts = (start..end)
            .map(|k| -> Result<Tensor> {
                Ok(match mine(k)? {
                    Some(t) => t.to_dtype(DType::F32)?.flatten_all()?,
                    None => Tensor::zeros(shapes[k].elem_count(), DType::F32, device)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let sum = comm.all_reduce_tensor_among(&Tensor::cat(&parts, 0)?, members)?;
        drop(parts);
        let mut at = 0;
        for (k, shape) in shapes.iter().enumerate().take(end).skip(start) {
            let n = shape.elem_count();
            take(k, sum.narrow(0, at, n)?.reshape(shape.clone())?)?;
            at += n;
        }
        start = end;
    }
    Ok(())
}

/// Consecutive items (by index into `shapes`) summed in one collective call: as many as fit
/// in `bucket` values together, or one larger item alone.
fn buckets(shapes: &[Shape], bucket: usize) -> Vec<Range<usize>> {
    let mut out = vec![];
    let mut start = 0;
    while start < shapes.len() {
        let (mut end, mut len) = (start, 0);
        while end < shapes.len() && (end == start || len + shapes[end].elem_count() <= bucket) {
            len += shapes[end].elem_count();
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// Sum `sums` (one bucket, as `buckets` forms them) element-wise over `members`, writing each
/// member's total back into its own buffers. Small sums travel together, flattened into one
/// collective call (one bucket-sized copy and the call's result in flight); a sum above
/// `bucket` values (`BUCKET` in the trainer) travels alone, in chunks of whole rows of at most `bucket` values, each
/// chunk's total written over the rows it came from (the rows were sent and are not needed
/// again): one chunk's result in flight instead of a second whole copy of the gradient.
/// Numerics: each element is the collective's sum of the members' values; with the TCP
/// backend that is an f32 sum in member order, whatever the bucketing or chunking. NCCL's
/// order may depend on the size of the call.
pub fn sum_in_place(
    comm: &mut dyn Collective,
    members: &[usize],
    sums: &mut [GradSum],
    bucket: usize,
) -> Result<()> {
    if members.len() <= 1 {
        return Ok(()); // a sum over one holder is itself (and the result would share its buffer)
    }
    let total: usize = sums.iter().map(GradSum::elem_count).sum();
    if let ([sum], true) = (&mut *sums, total > bucket) {
        // A second handle on the buffer, only to read rows that have not been overwritten yet
        // (chunk `start` is sent before its rows are written); dropped on return.
        let t = sum.as_tensor().clone();
        let (rows, per_row) = row_shape(t.shape());
        let chunk = (bucket / per_row.max(1)).max(1);
        for start in (0..rows).step_by(chunk) {
            let len = chunk.min(rows - start);
            let part = comm.all_reduce_tensor_among(&t.narrow(0, start, len)?, members)?;
            sum.write_rows(start, &part)?;
        }
        return Ok(());
    }
    let parts = sums
        .iter()
        .map(|s| Ok(s.as_tensor().flatten_all()?))
        .collect::<Result<Vec<_>>>()?;
    let total = comm.all_reduce_tensor_among(&Tensor::cat(&parts, 0)?, members)?;
    drop(parts);
    let mut at = 0;
    for s in sums.iter_mut() {
        let n = s.elem_count();
        s.write_flat(&total.narrow(0, at, n)?)?;
        at += n;
    }
    Ok(())
}

/// Sums gradients and shares updated parameters among the holders of each tensor.
pub struct Reducer {
    pub comm: RefCell<Box<dyn Collective>>,
    pub layout: Layout,
    pub device: Device,
    /// Seconds spent in collectives since the last `take_seconds`.
    seconds: std::cell::Cell<f64>,
}

impl Reducer {
    pub fn new(comm: Box<dyn Collective>, layout: Layout, device: Device) -> Self {
        Self {
            comm: RefCell::new(comm),
            layout,
            device,
            seconds: Default::default(),
        }
    }

    pub fn rank(&self) -> usize {
        self.comm.borrow().rank()
    }

    pub fn world(&self) -> usize {
        self.comm.borrow().world()
    }

    pub fn take_seconds(&self) -> f64 {
        self.seconds.replace(0.0)
    }

    fn timed<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let start = std::time::Instant::now();
        let r = f();
        self.seconds
            .set(self.seconds.get() + start.elapsed().as_secs_f64());
        r
    }

    /// The slot groups that are reduced together, each with its members: the replicated
    /// tensors over every rank, the routed experts held here over their replicas. Every rank
    /// gets the same number of groups, in the same order.
    fn groups(
        &self,
        slots: &[Slot],
        scope: &dyn Fn(&str) -> bool,
    ) -> Vec<(Vec<usize>, Vec<usize>)> {
        let l = &self.layout;
        let (experts, replicated): (Vec<usize>, Vec<usize>) = (0..slots.len())
            .filter(|&i| scope(&slots[i].name))
            .partition(|&i| is_sharded_expert(l, &slots[i].name));
        let mut out = vec![(replicated, (0..l.world).collect())];
        if l.ep > 1 {
            out.push((experts, l.expert_replicas(self.rank())));
        }
        out
    }

    /// ZeRO-2: sum the pending gradients of the slots in `scope` over their holders; the owner
    /// adds the sum to `accum.grads`, the others drop it. Single process: pending becomes
    /// final. ZeRO-1: nothing (the sums happen once per step, in `finish`).
    pub fn flush(
        &self,
        slots: &[Slot],
        accum: &mut GradAccum,
        scope: &dyn Fn(&str) -> bool,
    ) -> Result<()> {
        if self.world() == 1 {
            return accum.settle_pending(&|n| scope(n));
        }
        if self.layout.zero < 2 {
            return Ok(());
        }
        self.timed(|| {
            for (idx, members) in self.groups(slots, scope) {
                self.reduce(slots, accum, &idx, &members, true)?;
            }
            Ok(())
        })
    }

    /// After the last micro-batch of a step: every pending gradient summed over its holders
    /// (ZeRO-1: onto every holder; ZeRO-2: onto the owner; most were flushed already).
    pub fn finish(&self, slots: &[Slot], accum: &mut GradAccum) -> Result<()> {
        if self.world() == 1 {
            return accum.settle_pending(&|_| true);
        }
        let owners_only = self.layout.zero >= 2;
        self.timed(|| {
            for (idx, members) in self.groups(slots, &|_| true) {
                self.reduce(slots, accum, &idx, &members, owners_only)?;
            }
            Ok(())
        })
    }

    fn reduce(
        &self,
        slots: &[Slot],
        accum: &mut GradAccum,
        idx: &[usize],
        members: &[usize],
        owners_only: bool,
    ) -> Result<()> {
        let name = |i: usize| slots[i].name.as_str();
        if members.len() == 1 {
            // The only holder: its gradients are the sums.
            let names: HashSet<&str> = idx.iter().map(|&i| name(i)).collect();
            return accum.settle_pending(&|n| names.contains(n));
        }
        let mut comm = self.comm.borrow_mut();
        let mut present: Vec<f32> = idx
            .iter()
            .map(|&i| accum.has_pending(name(i)) as u8 as f32)
            .collect();
        comm.all_reduce_sum_among(&mut present, members)?;
        let chosen: Vec<usize> = idx
            .iter()
            .zip(&present)
            .filter(|(_, &p)| p > 0.0)
            .map(|(&i, _)| i)
            .collect();
        let shapes: Vec<Shape> = chosen.iter().map(|&i| slots[i].shape().clone()).collect();
        // A bucket of sums at a time: this rank's pending sums (zeros where it has none) are
        // summed over the members in place and settled before the next bucket is taken, so
        // besides the pending sums a reduction holds one bucket (or one row chunk) in flight.
        for bucket in buckets(&shapes, BUCKET) {
            let mut sums = bucket
                .clone()
                .map(|k| match accum.take_pending(name(chosen[k])) {
                    Some(sum) => Ok(sum),
                    None => GradSum::zeros(&shapes[k], &self.device),
                })
                .collect::<Result<Vec<_>>>()?;
            sum_in_place(comm.as_mut(), members, &mut sums, BUCKET)?;
            for (k, sum) in bucket.zip(sums) {
                let s = &slots[chosen[k]];
                if !owners_only || s.owns_whole() {
                    accum.settle_sum(&s.name, sum)?;
                } else {
                    // A split tensor: the owner keeps (a copy of) its rows; the sum is then freed.
                    for p in &s.pieces {
                        accum.settle(
                            &piece_name(&s.name, &p.rows, s.rows()),
                            &sum.as_tensor().narrow(0, p.rows.start, p.rows.len())?,
                        )?;
                    }
                }
            }
        }
        Ok(())
    }

    /// ZeRO: after the optimizer step the owners of each tensor's rows share their new values
    /// with the ranks holding it, as a sum in which each rank adds its owned rows and zeros
    /// elsewhere (exact: every row is x plus zeros). Every rank but a whole tensor's sole
    /// owner (which set its Var in the step) takes the sum.
    /// ZeRO-3 tensors are not shared: a layer gathers their owners' rows when it runs.
    pub fn gather_updated_params(&self, slots: &mut [Slot]) -> Result<()> {
        self.timed(|| {
            let sharded: HashSet<&str> = slots
                .iter()
                .filter(|s| s.sharded)
                .map(|s| s.name.as_str())
                .collect();
            let groups = self.groups(slots, &|n| !sharded.contains(n));
            let slots: &[Slot] = slots; // the Vars are set through shared references
            for (idx, members) in groups {
                if members.len() == 1 {
                    continue; // the only holder is the owner
                }
                let shapes: Vec<Shape> = idx.iter().map(|&i| slots[i].shape().clone()).collect();
                bucketed_sum(
                    self.comm.borrow_mut().as_mut(),
                    &self.device,
                    &shapes,
                    &members,
                    |k| {
                        let s = &slots[idx[k]];
                        if s.pieces.is_empty() {
                            Ok(None)
                        } else {
                            s.owned_rows_or_zeros().map(Some)
                        }
                    },
                    |k, v| {
                        let s = &slots[idx[k]];
                        if !s.owns_whole() {
                            // The owned rows' masters already hold these values.
                            s.var.set(&v.to_dtype(s.var.as_tensor().dtype())?)?;
                        }
                        Ok(())
                    },
                )?;
            }
            Ok(())
        })
    }

    /// The squared gradient norms per group of the whole model from what this rank holds, f64
    /// added in rank order. ZeRO-2: each rank holds the gradients of the rows it owns and every
    /// row has one owner in the job, so the ranks' norms add up. ZeRO-1: every rank holds the
    /// summed gradient of every tensor it holds; with expert parallelism that is its expert
    /// group's share of the routed experts, so the expert part adds up over the expert group
    /// (the rest is complete on each rank).
    pub fn whole_squared_norms(
        &self,
        slots: &[super::optim::Slot],
        accum: &super::optim::GradAccum,
    ) -> Result<std::collections::HashMap<super::optim::Group, f64>> {
        use super::optim::{AdamW, Group};
        let l = &self.layout;
        if self.world() == 1 || (l.zero < 2 && l.ep == 1) {
            return AdamW::squared_norms(slots, accum);
        }
        let (mut sq, shares, members) = if l.zero >= 2 {
            let all: Vec<usize> = (0..self.world()).collect();
            let none = std::collections::HashMap::new();
            (none, AdamW::squared_norms(slots, accum)?, all)
        } else {
            (
                AdamW::squared_norms_of(slots, accum, &|n| !is_sharded_expert(l, n))?,
                AdamW::squared_norms_of(slots, accum, &|n| is_sharded_expert(l, n))?,
                l.expert_group(self.rank()),
            )
        };
        let mine: Vec<u8> = [Group::Main, Group::Indexer]
            .iter()
            .flat_map(|g| shares.get(g).copied().unwrap_or(0.0).to_le_bytes())
            .collect();
        let all = self.timed(|| self.comm.borrow_mut().all_gather(&mine))?;
        for (j, g) in [Group::Main, Group::Indexer].into_iter().enumerate() {
            let shared: f64 = members
                .iter()
                .map(|&r| f64::from_le_bytes(all[r][8 * j..8 * j + 8].try_into().expect("8 bytes")))
                .sum();
            *sq.entry(g).or_insert(0.0) += shared;
        }
        Ok(sq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row of every tensor has exactly one owner; returns the elements each rank owns.
    fn loads(tensors: &[(usize, usize)], ranges: &[OwnedRange], ranks: usize) -> Vec<usize> {
        for (i, &(rows, _)) in tensors.iter().enumerate() {
            let mut count = vec![0; rows];
            for r in ranges.iter().filter(|r| r.slot == i) {
                assert!(!r.rows.is_empty() && r.owner < ranks, "{r:?}");
                r.rows.clone().for_each(|x| count[x] += 1);
            }
            assert!(
                count.iter().all(|&c| c == 1),
                "tensor {i}: rows owned {count:?} times"
            );
        }
        let mut load = vec![0; ranks];
        ranges
            .iter()
            .for_each(|r| load[r.owner] += r.rows.len() * tensors[r.slot].1);
        load
    }

    #[test]
    fn a_tensor_above_the_fair_share_is_split_into_row_ranges_owned_once_each() {
        // One [1000, 10] "embedding" beside six [5, 10] tensors over 4 ranks: the fair share is
        // 10300 / 4 = 2575 values; whole, the embedding's owner would hold 10000.
        let mut tensors = vec![(1000, 10)];
        tensors.extend([(5, 10); 6]);
        let ranges = assign_row_ranges(&tensors, 4);
        let big: Vec<&OwnedRange> = ranges.iter().filter(|r| r.slot == 0).collect();
        assert!(big.len() > 1, "not split: {big:?}");
        let owners: std::collections::BTreeSet<usize> = big.iter().map(|r| r.owner).collect();
        assert_eq!(owners.len(), big.len(), "two ranges on one rank: {big:?}");
        assert!(
            ranges
                .iter()
                .filter(|r| r.slot > 0)
                .all(|r| r.rows == (0..5)),
            "small tensors stay whole"
        );
        let load = loads(&tensors, &ranges, 4);
        assert!(
            *load.iter().max().unwrap() <= 2575 + 50,
            "unbalanced: {load:?}"
        );
        // Deterministic, and one holder (or a group with nothing large) never splits.
        assert_eq!(assign_row_ranges(&tensors, 4), ranges);
        assert_eq!(assign_row_ranges(&tensors, 1).len(), tensors.len());
        assert_eq!(assign_row_ranges(&[(3, 3), (3, 3), (3, 3)], 3).len(), 3);
        // At least one row per range: a tensor of 3 rows over 8 ranks splits into 3 at most.
        let few = assign_row_ranges(&[(3, 100), (1, 1)], 8);
        assert_eq!(few.iter().filter(|r| r.slot == 0).count(), 3);
        loads(&[(3, 100), (1, 1)], &few, 8);
        // Awkward sizes: rows not divisible by the number of ranges.
        for ranks in [2, 3, 5, 7] {
            let t = [(97, 3), (13, 1), (1, 1), (50, 2)];
            loads(&t, &assign_row_ranges(&t, ranks), ranks);
        }
    }

    #[test]
    fn sums_in_place_by_buckets_and_row_chunks_equal_the_whole_tensor_sums_bit_for_bit() {
        use crate::dist::{launch::Launch, tcp::TcpCollective};
        let dev = Device::Cpu;
        // Small tensors that share buckets, one that fills a bucket alone, and tensors above the
        // bucket (rows 1, 97 and 1025, one row larger than the bucket) summed in row chunks.
        let shapes: Vec<Shape> = [
            vec![3usize, 2],
            vec![],
            vec![5],
            vec![16],
            vec![97, 5],
            vec![1, 40],
            vec![1025, 3],
            vec![2, 2],
        ]
        .iter()
        .map(|d| Shape::from_dims(d))
        .collect();
        let bucket = 16;
        let value = |rank: usize, k: usize| {
            crate::rng::randn(
                shapes[k].dims(),
                (10 * rank + k) as u64,
                [1.0, 1e-3, 3e4][k % 3],
                &dev,
            )
            .unwrap()
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let totals: Vec<Vec<Vec<u32>>> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let (shapes, value) = (&shapes, &value);
                    sc.spawn(move || {
                        let launch = Launch {
                            rank,
                            world: 2,
                            local_rank: rank,
                            master_addr: "127.0.0.1".into(),
                            master_port: port,
                        };
                        let mut comm = TcpCollective::rendezvous(
                            &launch,
                            std::time::Duration::from_secs(30),
                            vec![],
                        )
                        .unwrap();
                        let mut out = vec![];
                        for b in buckets(shapes, bucket) {
                            let mut sums: Vec<GradSum> = b
                                .clone()
                                .map(|k| {
                                    GradSum::copy_of(
                                        &value(rank, k),
                                        &Device::Cpu,
                                        7,
                                        crate::kernels::KernelPolicy::KERNELS,
                                    )
                                    .unwrap()
                                })
                                .collect();
                            sum_in_place(&mut comm, &[0, 1], &mut sums, bucket).unwrap();
                            out.extend(sums.iter().map(|s| {
                                s.as_tensor()
                                    .flatten_all()
                                    .unwrap()
                                    .to_vec1::<f32>()
                                    .unwrap()
                                    .iter()
                                    .map(|x| x.to_bits())
                                    .collect::<Vec<u32>>()
                            }));
                        }
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(totals[0], totals[1], "both ranks hold the same sums");
        for (k, got) in totals[0].iter().enumerate() {
            let want: Vec<u32> = (value(0, k) + value(1, k))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            assert_eq!(got, &want, "tensor {k} of shape {:?}", shapes[k]);
        }
        assert_eq!(
            buckets(&shapes, bucket),
            vec![0..3, 3..4, 4..5, 5..6, 6..7, 7..8]
        );
    }
}
