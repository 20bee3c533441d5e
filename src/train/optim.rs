//! AdamW with f32 master weights and moments, per-group gradient clipping, and the learning-rate
//! schedule.
//!
//! Each trainable tensor is a candle `Var` in the compute dtype that the model reads; when the
//! compute dtype is not f32 an f32 master copy is kept and the Var is refreshed from it after
//! every step (one rounding per step, never accumulated). Moments are f32 whatever the compute
//! dtype. A parameter without a gradient in a step is left untouched (no decay either), as in
//! PyTorch. Update, per element, with t the parameter's own step count:
//!   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//!   w = w - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) - lr * wd * w   (wd only where decayed)

use std::collections::HashMap;
use std::ops::Range;

use anyhow::{Context, Result};
use candle_core::{backprop::GradStore, DType, Shape, Tensor, Var};

use super::accumulate::{GradSum, BLOCK_VALUES};
use crate::grad_rows::RowBlocks;
use crate::kernels::adamw::AdamWScalars;

use crate::recipe::{Schedule, TrainConfig};

/// Parameter groups: clipped separately and given their own learning rate. In the sparse
/// stage the two are trained by different losses, so one must not throttle the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    Main,
    Indexer,
}

/// Rows `rows` (along dim 0) of a tensor whose optimizer state this rank holds (ZeRO: see
/// `zero::slot_ranges`; a single process holds one piece covering the whole tensor).
pub struct Piece {
    pub rows: Range<usize>,
    /// f32 master of these rows; absent only when the piece is the whole tensor and the Var is
    /// f32 (the Var is then the master).
    pub master: Option<Tensor>,
    pub m: Tensor,
    pub v: Tensor,
}

pub struct Slot {
    pub name: String,
    /// The tensor the model reads; under ZeRO-3 (`shard`) a one-value placeholder whose id
    /// the model's layer holds, the values living in the pieces' masters.
    pub var: Var,
    /// The whole tensor's shape.
    shape: Shape,
    /// ZeRO-3: this rank holds only its pieces' rows (`var` is a placeholder).
    pub sharded: bool,
    /// The row ranges whose f32 master and Adam moments this rank holds and updates; empty
    /// where other ranks own the whole tensor (they send its new value after each step).
    pub pieces: Vec<Piece>,
    pub steps: u64,
    pub decay: bool,
    pub group: Group,
}

/// The name under which rows `rows` of tensor `name` (of `total` rows) are stored: the name
/// itself for the whole tensor, `{name}.rows.{start}-{end}` for a part.
pub fn piece_name(name: &str, rows: &Range<usize>, total: usize) -> String {
    if rows.start == 0 && rows.end == total {
        name.to_string()
    } else {
        format!("{name}.rows.{}-{}", rows.start, rows.end)
    }
}

impl Slot {
    /// A slot holding the optimizer state of every row.
    pub fn new(name: String, var: Var, decay: bool, group: Group) -> Result<Self> {
        let mut s = Self::without_state(name, var, decay, group);
        s.keep_rows(vec![0..s.rows()])?;
        Ok(s)
    }

    /// A slot holding no optimizer state yet: `keep_rows` gives it the rows it owns. (The
    /// trainer builds every slot this way, so a rank never holds the f32 masters and moments
    /// of whole tensors it owns a share of: 12 bytes a value, about 470 GiB for the 671B
    /// model's tensors held at ep 32.)
    pub fn without_state(name: String, var: Var, decay: bool, group: Group) -> Self {
        Self {
            name,
            shape: var.as_tensor().shape().clone(),
            sharded: false,
            var,
            pieces: vec![],
            steps: 0,
            decay,
            group,
        }
    }

    /// Rows along dim 0 (1 for a scalar).
    pub fn rows(&self) -> usize {
        self.shape.dims().first().copied().unwrap_or(1)
    }

    /// The whole tensor's shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// ZeRO-3, loaded a rank's rows at a time: the slot of a tensor of `shape` whose model
    /// tensor is `placeholder`, holding `rows` (each range with its values in the model dtype,
    /// as the whole tensor would have them) as f32 masters with fresh moments: what `new` and
    /// `keep_rows` make of the whole tensor, without it.
    pub fn from_rows(
        name: String,
        placeholder: Var,
        shape: Shape,
        rows: Vec<(Range<usize>, Tensor)>,
        decay: bool,
        group: Group,
    ) -> Result<Self> {
        let pieces = rows
            .into_iter()
            .map(|(rows, values)| -> Result<Piece> {
                let master = values.to_dtype(DType::F32)?.copy()?.detach();
                let m = master.zeros_like()?;
                Ok(Piece {
                    rows,
                    master: Some(master),
                    m: m.clone(),
                    v: m,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            name,
            var: placeholder,
            shape,
            sharded: true,
            pieces,
            steps: 0,
            decay,
            group,
        })
    }

    /// The f32 masters of the owned rows, in row order (what a ZeRO-3 layer gathers).
    pub fn masters_in_row_order(&self) -> Result<Vec<Tensor>> {
        let mut pieces: Vec<&Piece> = self.pieces.iter().collect();
        pieces.sort_by_key(|p| p.rows.start);
        pieces.iter().map(|p| self.piece_value(p)).collect()
    }

    /// Does this rank own every row?
    pub fn owns_whole(&self) -> bool {
        self.pieces.len() == 1 && self.pieces[0].rows == (0..self.rows())
    }

    /// Hold optimizer state for `ranges` only (fresh moments, masters from the current value):
    /// ZeRO hands the other rows to other ranks, which is the memory it saves.
    pub fn keep_rows(&mut self, ranges: Vec<Range<usize>>) -> Result<()> {
        if self.sharded {
            anyhow::bail!("{}: the rows of a ZeRO-3 tensor are chosen once", self.name);
        }
        let t = self.var.as_tensor();
        let whole_f32 =
            ranges.len() == 1 && ranges[0] == (0..self.rows()) && t.dtype() == DType::F32;
        self.pieces = ranges
            .into_iter()
            .map(|rows| -> Result<Piece> {
                let part = if t.rank() == 0 {
                    t.clone()
                } else {
                    t.narrow(0, rows.start, rows.len())?
                };
                // Detached copies: converted from the Var, the copy would otherwise record that op,
                // and each update built from it would hold the previous step's tensors (a leak per step).
                let master = if whole_f32 {
                    None
                } else {
                    Some(part.to_dtype(DType::F32)?.copy()?.detach())
                };
                let m = part.to_dtype(DType::F32)?.zeros_like()?.detach();
                Ok(Piece {
                    rows,
                    master,
                    m: m.clone(),
                    v: m,
                })
            })
            .collect::<Result<_>>()?;
        Ok(())
    }

    /// The f32 value of a piece's rows.
    pub fn piece_value(&self, p: &Piece) -> Result<Tensor> {
        Ok(match &p.master {
            Some(m) => m.clone(),
            None => self.var.as_tensor().clone(),
        })
    }

    /// The f32 value of the whole tensor: the owned rows from their masters, zeros elsewhere
    /// (what each rank adds to the sum that shares the new values; exact: x + 0 = x).
    pub fn owned_rows_or_zeros(&self) -> Result<Tensor> {
        if self.owns_whole() {
            return self.piece_value(&self.pieces[0]);
        }
        let t = self.var.as_tensor();
        let row_shape = |n: usize| -> Vec<usize> {
            std::iter::once(n)
                .chain(self.shape.dims().iter().skip(1).copied())
                .collect()
        };
        let mut pieces: Vec<&Piece> = self.pieces.iter().collect();
        pieces.sort_by_key(|p| p.rows.start);
        let (mut parts, mut at) = (vec![], 0);
        for p in pieces {
            if p.rows.start > at {
                parts.push(Tensor::zeros(
                    row_shape(p.rows.start - at),
                    DType::F32,
                    t.device(),
                )?);
            }
            parts.push(self.piece_value(p)?);
            at = p.rows.end;
        }
        if at < self.rows() {
            parts.push(Tensor::zeros(
                row_shape(self.rows() - at),
                DType::F32,
                t.device(),
            )?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Overwrite the parameter (and the masters of the owned rows) from an f32 tensor of the
    /// whole shape, e.g. on resume.
    pub fn set_value(&mut self, value: &Tensor) -> Result<()> {
        let value = value.detach().to_dtype(DType::F32)?;
        for p in self.pieces.iter_mut().filter(|p| p.master.is_some()) {
            let rows = if value.rank() == 0 {
                value.clone()
            } else {
                value.narrow(0, p.rows.start, p.rows.len())?
            };
            p.master = Some(rows.copy()?.detach());
        }
        if !self.sharded {
            self.var
                .set(&value.to_dtype(self.var.as_tensor().dtype())?)?;
        }
        Ok(())
    }
}

/// Summed f32 gradients over the micro-batches of one step: `pending` holds this rank's own
/// sums not yet reduced over the ranks, `grads` the reduced sums the optimizer reads
/// (`zero::Reducer` moves one into the other; a single process just settles them). Keys are
/// tensor names; under ZeRO-2 the owner of rows of a split tensor keeps just those rows, under
/// their `piece_name`.
///
/// Every sum is a `GradSum`: a buffer the accumulator allocated and alone holds, added to in
/// place a block of rows at a time (`accumulate`), so adding a gradient costs two f32 blocks,
/// not two whole copies; the sums are bit for bit those of `old + g` out of place. They are
/// never attached to a graph: a gradient candle's backward returns is itself the output of
/// tracked ops whose inputs include the activations, so keeping it would keep the whole
/// forward graph alive, and the Adam moments built from it would chain every step's graph to
/// the next (device memory growing by gigabytes per step); the sums only copy its values.
pub struct GradAccum {
    grads: HashMap<String, GradSum>,
    pending: HashMap<String, GradSum>,
    /// Values per block of rows added at once (`accumulate::BLOCK_VALUES`; smaller in tests).
    block_values: usize,
    /// The in-place sum kernel or its plain twin (`kernels::grad_sum`).
    kernels: crate::kernels::KernelPolicy,
}

impl Default for GradAccum {
    fn default() -> Self {
        Self::with_block_values(BLOCK_VALUES)
    }
}

/// map[name] += g in place, or a new sum holding a copy of g.
fn add_into(
    map: &mut HashMap<String, GradSum>,
    name: &str,
    g: &dyn RowBlocks,
    device: &candle_core::Device,
    (block_values, kernels): (usize, crate::kernels::KernelPolicy),
) -> Result<()> {
    match map.get_mut(name) {
        Some(sum) => sum
            .add(g, block_values, kernels)
            .with_context(|| format!("adding to the gradient sum of {name}")),
        None => {
            map.insert(
                name.to_string(),
                GradSum::copy_of(g, device, block_values, kernels)
                    .with_context(|| format!("starting the gradient sum of {name}"))?,
            );
            Ok(())
        }
    }
}

impl GradAccum {
    pub fn with_block_values(block_values: usize) -> Self {
        Self {
            grads: HashMap::new(),
            pending: HashMap::new(),
            block_values: block_values.max(1),
            kernels: crate::kernels::KernelPolicy::KERNELS,
        }
    }

    /// This accumulator with the sums added by `kernels`' choice (the in-place kernel on a GPU
    /// unless the policy asks for the plain twin).
    pub fn with_kernels(mut self, kernels: crate::kernels::KernelPolicy) -> Self {
        self.kernels = kernels;
        self
    }

    /// Add the gradients of `store` for every slot that has one (to `pending`).
    pub fn add(&mut self, slots: &[Slot], store: &GradStore) -> Result<()> {
        for s in slots {
            if let Some(g) = store.get(s.var.as_tensor()) {
                add_into(
                    &mut self.pending,
                    &s.name,
                    &g.detach(),
                    g.device(),
                    (self.block_values, self.kernels),
                )?;
            }
        }
        Ok(())
    }

    /// Add one tensor's gradient `g` (any float dtype, shaped like the tensor) to `pending[name]`.
    pub fn add_one(&mut self, name: &str, g: &Tensor) -> Result<()> {
        add_into(
            &mut self.pending,
            name,
            g,
            g.device(),
            (self.block_values, self.kernels),
        )
    }

    /// Add a gradient that its source produces a block of rows at a time (the LM head's and
    /// the embedding's, `grad_rows`) to `pending[name]`: only one block of it exists at once.
    pub fn add_rows(
        &mut self,
        name: &str,
        g: &dyn RowBlocks,
        device: &candle_core::Device,
    ) -> Result<()> {
        add_into(
            &mut self.pending,
            name,
            g,
            device,
            (self.block_values, self.kernels),
        )
    }

    /// Add a reduced gradient to the final sums (a copy of `g`'s values: `g` may be a view of
    /// a buffer that is about to be freed).
    pub fn settle(&mut self, name: &str, g: &Tensor) -> Result<()> {
        add_into(
            &mut self.grads,
            name,
            g,
            g.device(),
            (self.block_values, self.kernels),
        )
    }

    /// Add a reduced sum to the final sums: moved in when there is none yet.
    pub fn settle_sum(&mut self, name: &str, sum: GradSum) -> Result<()> {
        match self.grads.get_mut(name) {
            Some(total) => total
                .add(sum.as_tensor(), self.block_values, self.kernels)
                .with_context(|| format!("adding to the summed gradient of {name}")),
            None => {
                self.grads.insert(name.to_string(), sum);
                Ok(())
            }
        }
    }

    /// Move the pending gradients whose names satisfy `pick` to the final sums unchanged.
    pub fn settle_pending(&mut self, pick: &dyn Fn(&str) -> bool) -> Result<()> {
        let names: Vec<String> = self.pending.keys().filter(|n| pick(n)).cloned().collect();
        for n in names {
            let g = self.pending.remove(&n).expect("listed");
            self.settle_sum(&n, g)?;
        }
        Ok(())
    }

    /// Hand this rank's pending sum of `name` to the reducer (which sums it over the ranks in
    /// place and settles it).
    pub fn take_pending(&mut self, name: &str) -> Option<GradSum> {
        self.pending.remove(name)
    }

    pub fn has_pending(&self, name: &str) -> bool {
        self.pending.contains_key(name)
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// The final sum of `name` (a whole tensor or a `piece_name`), for reading.
    pub fn grad(&self, name: &str) -> Option<&Tensor> {
        self.grads.get(name).map(GradSum::as_tensor)
    }

    /// The final sums, for reading.
    pub fn grads(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.grads.iter().map(|(n, s)| (n.as_str(), s.as_tensor()))
    }

    /// Set a final sum directly (a copy of `g`), replacing any.
    pub fn set_grad(&mut self, name: &str, g: &Tensor) -> Result<()> {
        self.grads.insert(
            name.to_string(),
            GradSum::copy_of(g, g.device(), self.block_values, self.kernels)?,
        );
        Ok(())
    }

    /// The final sums as plain tensors (the accumulator is done with them).
    pub fn into_grads(self) -> HashMap<String, Tensor> {
        self.grads
            .into_iter()
            .map(|(n, s)| (n, s.into_tensor()))
            .collect()
    }
}

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub clip: f64,
    /// The fused update kernel or its plain twin.
    pub kernels: crate::kernels::KernelPolicy,
}

/// What one optimizer step did, for the logs.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepReport {
    /// Gradient norms before clipping.
    pub main_grad_norm: f64,
    pub indexer_grad_norm: f64,
}

impl AdamW {
    pub fn from_recipe(t: &TrainConfig, kernels: crate::kernels::KernelPolicy) -> Self {
        Self {
            kernels,
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
            clip: t.grad_clip,
        }
    }

    pub fn step(
        &self,
        slots: &mut [Slot],
        accum: &GradAccum,
        lr: impl Fn(Group) -> f64,
    ) -> Result<StepReport> {
        let sq = Self::squared_norms(slots, accum)?;
        self.step_with_norms(slots, accum, &sq, lr)
    }

    /// Squared norm per group of the gradients in `accum.grads` (whole tensors, or under ZeRO-2
    /// the owned row ranges): squared sums added on the device, one host sync per group.
    /// Numerics: each row (along dim 0) is summed in f32, the rows and tensors in f64, so a
    /// tensor split into row ranges gives the same row sums as whole and the norm does not
    /// depend on the split (one f32 sum over a 3M-value tensor would be off by ~1e-5).
    pub fn squared_norms(slots: &[Slot], accum: &GradAccum) -> Result<HashMap<Group, f64>> {
        Self::squared_norms_of(slots, accum, &|_| true)
    }

    /// `squared_norms` over the slots whose name `include` accepts.
    pub fn squared_norms_of(
        slots: &[Slot],
        accum: &GradAccum,
        include: &dyn Fn(&str) -> bool,
    ) -> Result<HashMap<Group, f64>> {
        let mut sq_dev: HashMap<Group, Tensor> = HashMap::new();
        for s in slots.iter().filter(|s| include(&s.name)) {
            let parts: Vec<&Tensor> = match accum.grad(&s.name) {
                Some(g) => vec![g],
                None => s
                    .pieces
                    .iter()
                    .filter_map(|p| accum.grad(&piece_name(&s.name, &p.rows, s.rows())))
                    .collect(),
            };
            for g in parts {
                let part = match g.rank() {
                    0 | 1 => g.to_dtype(DType::F64)?.sqr()?.sum_all()?,
                    _ => g
                        .sqr()?
                        .flatten_from(1)?
                        .sum(1)?
                        .to_dtype(DType::F64)?
                        .sum_all()?, // [rows] f32 -> f64
                };
                let sum = match sq_dev.remove(&s.group) {
                    Some(prev) => (prev + part)?,
                    None => part,
                };
                sq_dev.insert(s.group, sum);
            }
        }
        let mut sq: HashMap<Group, f64> = HashMap::new();
        for (group, t) in sq_dev {
            sq.insert(group, t.to_scalar::<f64>()?);
        }
        Ok(sq)
    }

    /// The update of the owned rows, clipping each group to `clip` by the global norms whose
    /// squares are `sq`. A piece's gradient is its own entry (ZeRO-2) or the rows of the whole
    /// tensor's (single process, ZeRO-1). A wholly owned tensor's Var is refreshed here; a part
    /// only in its master, the Var after `Reducer::gather_updated_params`.
    pub fn step_with_norms(
        &self,
        slots: &mut [Slot],
        accum: &GradAccum,
        sq: &HashMap<Group, f64>,
        lr: impl Fn(Group) -> f64,
    ) -> Result<StepReport> {
        let norm = |g: Group| sq.get(&g).copied().unwrap_or(0.0).sqrt();
        // As torch.nn.utils.clip_grad_norm_ and Megatron-LM scale: clip / (norm + 1e-6) where
        // that is below 1.
        let scale = |g: Group| {
            let c = self.clip / (norm(g) + 1e-6);
            if self.clip > 0.0 && c < 1.0 {
                c
            } else {
                1.0
            }
        };
        for s in slots.iter_mut() {
            let (total, whole) = (s.rows(), s.owns_whole());
            let t = s.steps as i32 + 1;
            let lr = lr(s.group);
            let mut stepped = false;
            let mut next_whole = None;
            for p in s.pieces.iter_mut() {
                let g = match (
                    accum.grad(&s.name),
                    accum.grad(&piece_name(&s.name, &p.rows, total)),
                ) {
                    (_, Some(g)) => g.clone(),
                    (Some(g), None) => g.narrow(0, p.rows.start, p.rows.len())?,
                    (None, None) => continue,
                };
                stepped = true;
                // An f32 model's Var: detached, so as not to record the update.
                let w = match &p.master {
                    Some(m) => m.clone(),
                    None => s.var.as_tensor().detach(),
                };
                let decays = s.decay && self.weight_decay > 0.0;
                let scalars = AdamWScalars {
                    grad_scale: scale(s.group),
                    beta1: self.beta1,
                    beta2: self.beta2,
                    eps: self.eps,
                    t,
                    lr,
                    decay: decays.then_some(lr * self.weight_decay),
                };
                let (m, v, next) =
                    if crate::kernels::adamw::supported(self.kernels, &g, &p.m, &p.v, &w) {
                        // The same roundings in two fused passes (bit for bit the plain twin).
                        crate::kernels::adamw::step(&g, &p.m, &p.v, &w, &scalars)?
                    } else {
                        adamw_update_plain(&g, &p.m, &p.v, &w, &scalars)?
                    };
                (p.m, p.v) = (m, v);
                if whole {
                    next_whole = Some(next);
                } else {
                    p.master = Some(next.detach());
                }
            }
            if let Some(next) = next_whole {
                s.set_value(&next)?;
            }
            if stepped {
                s.steps += 1;
            }
        }
        Ok(StepReport {
            main_grad_norm: norm(Group::Main),
            indexer_grad_norm: norm(Group::Indexer),
        })
    }
}

/// One tensor's AdamW update with candle ops: (m', v', w') from the gradient g, the moments m,
/// v and the weights w (f32). The reference of `kernels::adamw::step`, which rounds each of
/// these operations the same way.
pub fn adamw_update_plain(
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    w: &Tensor,
    s: &AdamWScalars,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let g = (g * s.grad_scale)?;
    let m = ((m * s.beta1)? + (&g * (1.0 - s.beta1))?)?;
    let v = ((v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
    let m_hat = (&m / (1.0 - s.beta1.powi(s.t)))?;
    let v_hat = (&v / (1.0 - s.beta2.powi(s.t)))?;
    let update = (m_hat / (v_hat.sqrt()? + s.eps)?)?;
    let mut next = (w - (update * s.lr)?)?;
    if let Some(decay) = s.decay {
        next = (next - (w * decay)?)?;
    }
    Ok((m, v, next))
}

/// Owner rank of each tensor: largest first to the least-loaded rank (lowest rank on ties), so
/// optimizer memory is balanced and every rank computes the same assignment.
pub fn assign_owners(sizes: &[usize], ranks: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]).then(a.cmp(&b)));
    let mut load = vec![0usize; ranks.max(1)];
    let mut owner = vec![0; sizes.len()];
    for i in order {
        let r = (0..load.len())
            .min_by_key(|&r| (load[r], r))
            .expect("at least one rank");
        owner[i] = r;
        load[r] += sizes[i];
    }
    owner
}

/// Learning rate at `step` (0-based): linear warm-up from 0 over `warmup_steps`, then constant
/// or cosine from `peak` to `min_lr` at `total` steps.
pub fn lr_at(step: u64, peak: f64, t: &TrainConfig) -> f64 {
    if step < t.warmup_steps {
        return peak * (step + 1) as f64 / t.warmup_steps as f64;
    }
    match t.schedule {
        Schedule::Cosine => {
            let span = t.steps.saturating_sub(t.warmup_steps).max(1) as f64;
            let progress = ((step - t.warmup_steps) as f64 / span).min(1.0);
            let min = t.min_lr.min(peak);
            min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * progress).cos())
        }
        Schedule::Constant => peak,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_a_scalar_f64_reference_including_decay_and_clipping() {
        let dev = Device::Cpu;
        let w0 = [0.5f32, -1.0, 2.0];
        let mut slots =
            vec![Slot::new("w".into(), Var::new(&w0, &dev).unwrap(), true, Group::Main).unwrap()];
        let opt = AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            clip: 1.0,
            kernels: Default::default(),
        };
        let grads = [[3.0f32, 4.0, 0.0], [0.1, -0.2, 0.3]];
        let (mut w, mut m, mut v) = ([0.5f64, -1.0, 2.0], [0f64; 3], [0f64; 3]);
        for (step, g) in grads.iter().enumerate() {
            let mut acc = GradAccum::default();
            acc.set_grad("w", &Tensor::new(g, &dev).unwrap()).unwrap();
            let rep = opt.step(&mut slots, &acc, |_| 0.01).unwrap();
            let n = g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            assert!((rep.main_grad_norm - n).abs() < 1e-6);
            let c = if n > 1.0 { 1.0 / (n + 1e-6) } else { 1.0 };
            let t = step as i32 + 1;
            for i in 0..3 {
                let gi = g[i] as f64 * c;
                m[i] = 0.9 * m[i] + 0.1 * gi;
                v[i] = 0.95 * v[i] + 0.05 * gi * gi;
                let upd = (m[i] / (1.0 - 0.9f64.powi(t)))
                    / ((v[i] / (1.0 - 0.95f64.powi(t))).sqrt() + 1e-8);
                w[i] = w[i] - 0.01 * upd - 0.01 * 0.1 * w[i];
            }
        }
        let got: Vec<f32> = slots[0].var.as_tensor().to_vec1().unwrap();
        for i in 0..3 {
            assert!(
                (got[i] as f64 - w[i]).abs() < 1e-6,
                "{i}: {} vs {}",
                got[i],
                w[i]
            );
        }
    }

    #[test]
    fn bf16_parameters_keep_an_f32_master_and_no_grad_means_no_change() {
        let dev = Device::Cpu;
        let var = Var::from_tensor(
            &Tensor::new(&[1.0f32, 1.0], &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        )
        .unwrap();
        let idle = Var::new(&[7.0f32], &dev).unwrap();
        let mut slots = vec![
            Slot::new("a".into(), var, false, Group::Indexer).unwrap(),
            Slot::new("b".into(), idle, true, Group::Main).unwrap(),
        ];
        let opt = AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            clip: 0.0,
            kernels: Default::default(),
        };
        let mut acc = GradAccum::default();
        acc.set_grad("a", &Tensor::new(&[1.0f32, -1.0], &dev).unwrap())
            .unwrap();
        // Steps of 1e-4 are below bf16 resolution at 1.0, but the master accumulates them.
        for _ in 0..10 {
            opt.step(&mut slots, &acc, |_| 1e-4).unwrap();
        }
        let master: Vec<f32> = slots[0].pieces[0]
            .master
            .as_ref()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            (master[0] - 0.999).abs() < 1e-5 && (master[1] - 1.001).abs() < 1e-5,
            "{master:?}"
        );
        assert_eq!(
            slots[1].var.as_tensor().to_vec1::<f32>().unwrap(),
            vec![7.0]
        );
        assert_eq!(slots[1].steps, 0);
    }

    #[test]
    fn schedule_warms_up_linearly_then_follows_cosine() {
        let mut t = TrainConfig {
            warmup_steps: 4,
            steps: 14,
            schedule: Schedule::Cosine,
            min_lr: 0.1,
            ..Default::default()
        };
        assert!((lr_at(0, 1.0, &t) - 0.25).abs() < 1e-12);
        assert!((lr_at(3, 1.0, &t) - 1.0).abs() < 1e-12);
        assert!((lr_at(9, 1.0, &t) - 0.55).abs() < 1e-12);
        assert!((lr_at(14, 1.0, &t) - 0.1).abs() < 1e-12);
        t.schedule = Schedule::Constant;
        assert_eq!(lr_at(100, 1.0, &t), 1.0);
    }
}
