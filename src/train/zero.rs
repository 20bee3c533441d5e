//! Gradient sums and the ZeRO optimizer sharding over the ranks that hold a tensor.
//!
//! Every trainable tensor has one owner among its holders (all dp ranks for replicated
//! tensors, the dp/ep replicas for routed experts; `slot_owners`), which keeps its f32 master
//! and Adam moments and updates it (ZeRO-1). Gradients go through two maps of `GradAccum`:
//! `pending` (this rank's local sum since the last reduction) and `grads` (summed over the
//! holders, what the optimizer reads).
//!
//! - ZeRO-1 (`parallel.zero = 1`): every rank keeps `pending` for the whole step and, after
//!   the last micro-batch, sums it over the holders into `grads` on every rank.
//! - ZeRO-2 (`parallel.zero = 2`): the trainer calls `Reducer::flush` for a layer as soon as
//!   that layer's backward has run (and for everything left at the end of each micro-batch);
//!   the sum lands in `grads` on the owner only and the other ranks free their copy. A rank
//!   then holds, besides the gradients it owns, at most one layer's unreduced gradients.
//!   The gradient norm for clipping is the rank-ordered sum of the owners' squared norms.
//!
//! Numerics: sums are f32, added in rank order on every rank (the TCP backend) or by NCCL's
//! all-reduce (GPU ranks). ZeRO-1 adds a rank's micro-batches first and then the ranks; ZeRO-2
//! adds the ranks of each micro-batch first; the two differ only in rounding. A tensor that
//! has a gradient on any holder gets one on all of them (zeros where it had none), decided by
//! a summed presence flag per tensor, so every holder updates the same set of tensors.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};

use anyhow::Result;
use candle_core::{DType, Device, Shape, Tensor};

use super::optim::{assign_owners, GradAccum, Slot};
use crate::dist::Collective;
use crate::recipe::Layout;
use crate::weights;

/// About 2^24 f32 values (64 MiB) per collective call.
const BUCKET: usize = 1 << 24;

/// Is `name` a routed expert split over the expert-parallel ranks?
fn is_sharded_expert(layout: &Layout, name: &str) -> bool {
    layout.ep > 1 && weights::routed_expert(name).is_some()
}

/// The rank owning each slot's optimizer state: replicated tensors are spread over all dp
/// ranks, routed experts over the ranks holding the same experts (largest first to the
/// least-loaded rank, so every rank computes the same assignment).
pub fn slot_owners(slots: &[Slot], layout: &Layout, rank: usize) -> Vec<usize> {
    let mut owners = vec![0; slots.len()];
    let everyone: Vec<usize> = (0..layout.dp).collect();
    for (experts, members) in [(false, everyone), (true, layout.expert_replicas(rank))] {
        let idx: Vec<usize> = (0..slots.len()).filter(|&i| is_sharded_expert(layout, &slots[i].name) == experts).collect();
        let sizes: Vec<usize> = idx.iter().map(|&i| slots[i].var.as_tensor().elem_count()).collect();
        for (&i, o) in idx.iter().zip(assign_owners(&sizes, members.len())) {
            owners[i] = members[o];
        }
    }
    owners
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
        Self { comm: RefCell::new(comm), layout, device, seconds: Default::default() }
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
        self.seconds.set(self.seconds.get() + start.elapsed().as_secs_f64());
        r
    }

    /// The slot groups that are reduced together, each with its members: the replicated
    /// tensors over every rank, the routed experts held here over their replicas. Every rank
    /// gets the same number of groups, in the same order.
    fn groups(&self, slots: &[Slot], scope: &dyn Fn(&str) -> bool) -> Vec<(Vec<usize>, Vec<usize>)> {
        let l = &self.layout;
        let (experts, replicated): (Vec<usize>, Vec<usize>) =
            (0..slots.len()).filter(|&i| scope(&slots[i].name)).partition(|&i| is_sharded_expert(l, &slots[i].name));
        let mut out = vec![(replicated, (0..l.world).collect())];
        if l.ep > 1 {
            out.push((experts, l.expert_replicas(self.rank())));
        }
        out
    }

    /// ZeRO-2: sum the pending gradients of the slots in `scope` over their holders; the owner
    /// adds the sum to `accum.grads`, the others drop it. Single process: pending becomes
    /// final. ZeRO-1: nothing (the sums happen once per step, in `finish`).
    pub fn flush(&self, slots: &[Slot], accum: &mut GradAccum, scope: &dyn Fn(&str) -> bool) -> Result<()> {
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

    fn reduce(&self, slots: &[Slot], accum: &mut GradAccum, idx: &[usize], members: &[usize], owners_only: bool) -> Result<()> {
        let name = |i: usize| slots[i].name.as_str();
        if members.len() == 1 {
            // The only holder: its gradients are the sums.
            let names: HashSet<&str> = idx.iter().map(|&i| name(i)).collect();
            return accum.settle_pending(&|n| names.contains(n));
        }
        let mut comm = self.comm.borrow_mut();
        let mut present: Vec<f32> = idx.iter().map(|&i| accum.pending.contains_key(name(i)) as u8 as f32).collect();
        comm.all_reduce_sum_among(&mut present, members)?;
        let chosen: Vec<usize> = idx.iter().zip(&present).filter(|(_, &p)| p > 0.0).map(|(&i, _)| i).collect();
        let mut pending: BTreeMap<String, Tensor> = BTreeMap::new();
        for &i in idx {
            if let Some(g) = accum.pending.remove(name(i)) {
                pending.insert(name(i).to_string(), g);
            }
        }
        let shapes: Vec<Shape> = chosen.iter().map(|&i| slots[i].var.as_tensor().shape().clone()).collect();
        bucketed_sum(
            comm.as_mut(),
            &self.device,
            &shapes,
            members,
            |k| Ok(pending.remove(name(chosen[k]))),
            |k, sum| {
                let s = &slots[chosen[k]];
                if !owners_only || s.owned {
                    accum.settle(&s.name, sum)?;
                }
                Ok(())
            },
        )
    }

    /// ZeRO: after the optimizer step each tensor's owner shares its new value with the ranks
    /// holding it, as a sum in which every other rank adds zeros (exact: x + 0 = x).
    pub fn gather_updated_params(&self, slots: &mut [Slot]) -> Result<()> {
        self.timed(|| {
            let groups = self.groups(slots, &|_| true);
            let slots = RefCell::new(slots);
            for (idx, members) in groups {
                if members.len() == 1 {
                    continue; // the only holder is the owner
                }
                let shapes: Vec<Shape> = idx.iter().map(|&i| slots.borrow()[i].var.as_tensor().shape().clone()).collect();
                bucketed_sum(
                    self.comm.borrow_mut().as_mut(),
                    &self.device,
                    &shapes,
                    &members,
                    |k| {
                        let s = &slots.borrow()[idx[k]];
                        if s.owned { s.value_f32().map(Some) } else { Ok(None) }
                    },
                    |k, v| {
                        let s = &mut slots.borrow_mut()[idx[k]];
                        if !s.owned {
                            s.set_value(&v)?;
                        }
                        Ok(())
                    },
                )?;
            }
            Ok(())
        })
    }

    /// Squared gradient norms per group summed over the ranks (ZeRO-2: each rank holds only
    /// the gradients it owns, and every tensor has exactly one owner in the job). f64, added
    /// in rank order.
    pub fn sum_squared_norms(&self, local: &mut std::collections::HashMap<super::optim::Group, f64>) -> Result<()> {
        if self.world() == 1 || self.layout.zero < 2 {
            return Ok(());
        }
        use super::optim::Group;
        let mine: Vec<u8> = [Group::Main, Group::Indexer].iter().flat_map(|g| local.get(g).copied().unwrap_or(0.0).to_le_bytes()).collect();
        let all = self.timed(|| self.comm.borrow_mut().all_gather(&mine))?;
        for (j, g) in [Group::Main, Group::Indexer].into_iter().enumerate() {
            let total: f64 = all.iter().map(|p| f64::from_le_bytes(p[8 * j..8 * j + 8].try_into().expect("8 bytes"))).sum();
            local.insert(g, total);
        }
        Ok(())
    }
}
