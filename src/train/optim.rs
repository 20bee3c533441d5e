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

use anyhow::Result;
use candle_core::{backprop::GradStore, DType, Tensor, Var};

use crate::recipe::TrainConfig;

/// Parameter groups: clipped separately and given their own learning rate. In the sparse
/// stage the two are trained by different losses, so one must not throttle the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    Main,
    Indexer,
}

pub struct Slot {
    pub name: String,
    pub var: Var,
    /// f32 master copy when the Var is not f32.
    pub master: Option<Tensor>,
    pub m: Tensor,
    pub v: Tensor,
    pub steps: u64,
    pub decay: bool,
    pub group: Group,
    /// This rank holds the tensor's optimizer state and updates it (ZeRO-1: every tensor has
    /// exactly one owner among the data-parallel ranks; the others receive its new value).
    pub owned: bool,
}

impl Slot {
    pub fn new(name: String, var: Var, decay: bool, group: Group) -> Result<Self> {
        let t = var.as_tensor();
        // Detached: converted from the Var, the copy would otherwise record that op, and each
        // update built from it would hold the previous step's tensors (a leak per step).
        let master = if t.dtype() == DType::F32 { None } else { Some(t.to_dtype(DType::F32)?.detach()) };
        let m = t.to_dtype(DType::F32)?.zeros_like()?;
        Ok(Self { name, m: m.clone(), v: m, master, var, steps: 0, decay, group, owned: true })
    }

    /// Hand the tensor's optimizer state to another rank: drop the moments and the f32 master
    /// (the memory ZeRO-1 saves).
    pub fn disown(&mut self) -> Result<()> {
        self.owned = false;
        self.m = Tensor::zeros(0, DType::F32, self.m.device())?;
        self.v = self.m.clone();
        self.master = None;
        Ok(())
    }

    /// The f32 value of the parameter.
    pub fn value_f32(&self) -> Result<Tensor> {
        Ok(match &self.master {
            Some(m) => m.clone(),
            None => self.var.as_tensor().clone(),
        })
    }

    /// Overwrite the parameter (and its master copy) from an f32 tensor, e.g. on resume.
    pub fn set_value(&mut self, value: &Tensor) -> Result<()> {
        let dtype = self.var.as_tensor().dtype();
        if self.master.is_some() {
            self.master = Some(value.detach().to_dtype(DType::F32)?.copy()?.detach());
        }
        self.var.set(&value.to_dtype(dtype)?)?;
        Ok(())
    }
}

/// Summed f32 gradients over the micro-batches of one step: `pending` holds this rank's own
/// sums not yet reduced over the ranks, `grads` the reduced sums the optimizer reads
/// (`zero::Reducer` moves one into the other; a single process just settles them).
///
/// Gradients are stored detached: a gradient candle's backward returns is itself the output of
/// tracked ops whose inputs include the activations, so keeping it attached would keep the
/// whole forward graph alive, and the Adam moments built from it would chain every step's
/// graph to the next (device memory growing by gigabytes per step).
#[derive(Default)]
pub struct GradAccum {
    pub grads: HashMap<String, Tensor>,
    pub pending: HashMap<String, Tensor>,
}

fn add_into(map: &mut HashMap<String, Tensor>, name: &str, g: Tensor) -> Result<()> {
    let sum = match map.remove(name) {
        Some(prev) => (prev + g)?,
        None => g,
    };
    map.insert(name.to_string(), sum);
    Ok(())
}

impl GradAccum {
    /// Add the gradients of `store` for every slot that has one (to `pending`).
    pub fn add(&mut self, slots: &[Slot], store: &GradStore) -> Result<()> {
        for s in slots {
            if let Some(g) = store.get(s.var.as_tensor()) {
                add_into(&mut self.pending, &s.name, g.detach().to_dtype(DType::F32)?)?;
            }
        }
        Ok(())
    }

    /// Add a reduced gradient to the final sums.
    pub fn settle(&mut self, name: &str, g: Tensor) -> Result<()> {
        add_into(&mut self.grads, name, g)
    }

    /// Move the pending gradients whose names satisfy `pick` to the final sums unchanged.
    pub fn settle_pending(&mut self, pick: &dyn Fn(&str) -> bool) -> Result<()> {
        let names: Vec<String> = self.pending.keys().filter(|n| pick(n)).cloned().collect();
        for n in names {
            let g = self.pending.remove(&n).expect("listed");
            self.settle(&n, g)?;
        }
        Ok(())
    }
}

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub clip: f64,
}

/// What one optimizer step did, for the logs.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepReport {
    /// Gradient norms before clipping.
    pub main_grad_norm: f64,
    pub indexer_grad_norm: f64,
}

impl AdamW {
    pub fn from_recipe(t: &TrainConfig) -> Self {
        Self { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay, clip: t.grad_clip }
    }

    pub fn step(&self, slots: &mut [Slot], accum: &GradAccum, lr: impl Fn(Group) -> f64) -> Result<StepReport> {
        let sq = Self::squared_norms(slots, accum)?;
        self.step_with_norms(slots, accum, &sq, lr)
    }

    /// Squared norm per group of the gradients in `accum.grads`: squared sums added on the
    /// device, one host sync per group.
    pub fn squared_norms(slots: &[Slot], accum: &GradAccum) -> Result<HashMap<Group, f64>> {
        let mut sq_dev: HashMap<Group, Tensor> = HashMap::new();
        for s in slots.iter() {
            if let Some(g) = accum.grads.get(&s.name) {
                let part = g.sqr()?.sum_all()?;
                let sum = match sq_dev.remove(&s.group) {
                    Some(prev) => (prev + part)?,
                    None => part,
                };
                sq_dev.insert(s.group, sum);
            }
        }
        let mut sq: HashMap<Group, f64> = HashMap::new();
        for (group, t) in sq_dev {
            sq.insert(group, t.to_dtype(DType::F64)?.to_scalar::<f64>()?);
        }
        Ok(sq)
    }

    /// The update, clipping each group to `clip` by the global norms whose squares are `sq`.
    pub fn step_with_norms(&self, slots: &mut [Slot], accum: &GradAccum, sq: &HashMap<Group, f64>, lr: impl Fn(Group) -> f64) -> Result<StepReport> {
        let norm = |g: Group| sq.get(&g).copied().unwrap_or(0.0).sqrt();
        let scale = |g: Group| if self.clip > 0.0 && norm(g) > self.clip { self.clip / (norm(g) + 1e-6) } else { 1.0 };
        for s in slots.iter_mut().filter(|s| s.owned) {
            let Some(g) = accum.grads.get(&s.name) else { continue };
            let g = (g * scale(s.group))?;
            s.steps += 1;
            let t = s.steps as i32;
            s.m = ((&s.m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            s.v = ((&s.v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let m_hat = (&s.m / (1.0 - self.beta1.powi(t)))?;
            let v_hat = (&s.v / (1.0 - self.beta2.powi(t)))?;
            let lr = lr(s.group);
            let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
            let w = s.value_f32()?.detach(); // an f32 model's Var: do not record the update
            let mut next = (&w - (update * lr)?)?;
            if s.decay && self.weight_decay > 0.0 {
                next = (next - (&w * (lr * self.weight_decay))?)?;
            }
            s.set_value(&next)?;
        }
        Ok(StepReport { main_grad_norm: norm(Group::Main), indexer_grad_norm: norm(Group::Indexer) })
    }
}

/// Owner rank of each tensor: largest first to the least-loaded rank (lowest rank on ties), so
/// optimizer memory is balanced and every rank computes the same assignment.
pub fn assign_owners(sizes: &[usize], ranks: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]).then(a.cmp(&b)));
    let mut load = vec![0usize; ranks.max(1)];
    let mut owner = vec![0; sizes.len()];
    for i in order {
        let r = (0..load.len()).min_by_key(|&r| (load[r], r)).expect("at least one rank");
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
    match t.schedule.as_str() {
        "cosine" => {
            let span = t.steps.saturating_sub(t.warmup_steps).max(1) as f64;
            let progress = ((step - t.warmup_steps) as f64 / span).min(1.0);
            let min = t.min_lr.min(peak);
            min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * progress).cos())
        }
        _ => peak,
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
        let mut slots = vec![Slot::new("w".into(), Var::new(&w0, &dev).unwrap(), true, Group::Main).unwrap()];
        let opt = AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, clip: 1.0 };
        let grads = [[3.0f32, 4.0, 0.0], [0.1, -0.2, 0.3]];
        let (mut w, mut m, mut v) = ([0.5f64, -1.0, 2.0], [0f64; 3], [0f64; 3]);
        for (step, g) in grads.iter().enumerate() {
            let mut acc = GradAccum::default();
            acc.grads.insert("w".into(), Tensor::new(g, &dev).unwrap());
            let rep = opt.step(&mut slots, &acc, |_| 0.01).unwrap();
            let n = g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            assert!((rep.main_grad_norm - n).abs() < 1e-6);
            let c = if n > 1.0 { 1.0 / (n + 1e-6) } else { 1.0 };
            let t = step as i32 + 1;
            for i in 0..3 {
                let gi = g[i] as f64 * c;
                m[i] = 0.9 * m[i] + 0.1 * gi;
                v[i] = 0.95 * v[i] + 0.05 * gi * gi;
                let upd = (m[i] / (1.0 - 0.9f64.powi(t))) / ((v[i] / (1.0 - 0.95f64.powi(t))).sqrt() + 1e-8);
                w[i] = w[i] - 0.01 * upd - 0.01 * 0.1 * w[i];
            }
        }
        let got: Vec<f32> = slots[0].var.as_tensor().to_vec1().unwrap();
        for i in 0..3 {
            assert!((got[i] as f64 - w[i]).abs() < 1e-6, "{i}: {} vs {}", got[i], w[i]);
        }
    }

    #[test]
    fn bf16_parameters_keep_an_f32_master_and_no_grad_means_no_change() {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, 1.0], &dev).unwrap().to_dtype(DType::BF16).unwrap()).unwrap();
        let idle = Var::new(&[7.0f32], &dev).unwrap();
        let mut slots = vec![
            Slot::new("a".into(), var, false, Group::Indexer).unwrap(),
            Slot::new("b".into(), idle, true, Group::Main).unwrap(),
        ];
        let opt = AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, clip: 0.0 };
        let mut acc = GradAccum::default();
        acc.grads.insert("a".into(), Tensor::new(&[1.0f32, -1.0], &dev).unwrap());
        // Steps of 1e-4 are below bf16 resolution at 1.0, but the master accumulates them.
        for _ in 0..10 {
            opt.step(&mut slots, &acc, |_| 1e-4).unwrap();
        }
        let master: Vec<f32> = slots[0].master.as_ref().unwrap().to_vec1().unwrap();
        assert!((master[0] - 0.999).abs() < 1e-5 && (master[1] - 1.001).abs() < 1e-5, "{master:?}");
        assert_eq!(slots[1].var.as_tensor().to_vec1::<f32>().unwrap(), vec![7.0]);
        assert_eq!(slots[1].steps, 0);
    }

    #[test]
    fn schedule_warms_up_linearly_then_follows_cosine() {
        let mut t = TrainConfig { warmup_steps: 4, steps: 14, schedule: "cosine".into(), min_lr: 0.1, ..Default::default() };
        assert!((lr_at(0, 1.0, &t) - 0.25).abs() < 1e-12);
        assert!((lr_at(3, 1.0, &t) - 1.0).abs() < 1e-12);
        assert!((lr_at(9, 1.0, &t) - 0.55).abs() < 1e-12);
        assert!((lr_at(14, 1.0, &t) - 0.1).abs() < 1e-12);
        t.schedule = "constant".into();
        assert_eq!(lr_at(100, 1.0, &t), 1.0);
    }
}
