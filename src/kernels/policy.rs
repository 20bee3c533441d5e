//! Which custom kernels a run uses, as a value.
//!
//! Every fused op and kernel has a plain twin (candle ops); which of the two runs is decided by
//! a `KernelPolicy` that the model's modules, the loss and the optimizer each hold, set from the
//! recipe's `[kernels]` section when the run starts (`Model::set_kernels`). No global switch or
//! environment variable changes a numeric path: two models in one process may run different
//! policies (the GPU checks run a kernel model beside a plain one).
//!
//! A kernel runs when the policy allows it AND the tensors are on a CUDA device of a build with
//! the `cuda` feature AND the kernel takes their shape and dtype (each kernel's `supported`).

use candle_core::Device;

/// The fused ops a policy can switch off one by one (`kernels.plain_ops` in a recipe), for
/// side-by-side runs of one binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fused {
    /// The sparse-stage KL's tensor-core scores at the selection (the f32 kernel instead).
    IndexerAt,
    /// The fused LM-head loss and gradient (`losses::nll_rows_and_grad_plain` instead).
    LmLoss,
    /// The fused AdamW step.
    Adamw,
    /// The dense attention's tensor-core backward (`dense_recompute::backward_blocks` instead).
    DenseBwd,
    /// The fused RMSNorm and its backward.
    RmsNorm,
    /// The fused rotary embeddings and their inverse.
    Rope,
    /// The fused silu(g) u and its backward.
    Swiglu,
    /// The strided row copy/join (candle's transpose + copy + cat instead).
    JoinRows,
    /// The sparse MLA's warpgroup (wgmma) kernels (the mma.sync kernels instead).
    SparseWgmma,
    /// The MoE combine's weighted row sums and their backward in one pass
    /// (`RowPlan::apply_weighted`, `RowPlan::gather_scaled_dot`; candle's products, casts and
    /// sums around the row maps instead).
    MoeCombine,
    /// Gradients added to their f32 sums in place in one pass (`kernels::grad_sum`; candle's
    /// cast, add and `slice_set` instead).
    GradSum,
    /// MoE routing and its sort by expert on the device (`kernels::moe_route`; the host's
    /// `route_token` per token and per-expert lists instead).
    MoeRoute,
    /// Frozen FP8 weights dequantised on the device (`kernels::fp8_dequant`; the loader's host
    /// loop and a copy instead).
    Fp8Dequant,
    /// The sparse MLA backward at up to 32 heads with 256 threads a block
    /// (`sparse_mla_tc::few_heads_backward`; the 64- or 128-thread kernel instead).
    SparseFewHeads,
    /// The sparse MLA backward at 8, 16 or 32 heads with neighbouring queries merged into one
    /// block of 64 rows over the union of their keys (`sparse_mla_tc::merged_queries`; one
    /// query a block instead).
    SparseMergeQueries,
    /// The main layers' explicit backward from saved activations (`model::blocks`, with
    /// `train.recompute = false`; candle's autograd of the layer forward instead). On every
    /// device: it is a way of computing, not a kernel.
    LayerBackward,
}

impl Fused {
    pub const ALL: [Fused; 16] = [
        Fused::IndexerAt,
        Fused::LmLoss,
        Fused::Adamw,
        Fused::DenseBwd,
        Fused::RmsNorm,
        Fused::Rope,
        Fused::Swiglu,
        Fused::JoinRows,
        Fused::SparseWgmma,
        Fused::MoeCombine,
        Fused::GradSum,
        Fused::MoeRoute,
        Fused::Fp8Dequant,
        Fused::SparseFewHeads,
        Fused::SparseMergeQueries,
        Fused::LayerBackward,
    ];

    /// Kernels built whose gpu-selftest checks have not yet passed on a GPU: off unless a recipe
    /// names them in `kernels.opt_in` (the merged-query sparse attention: written in a session
    /// that was lent no GPU).
    pub const OPT_IN: [Fused; 1] = [Fused::SparseMergeQueries];

    /// The name a recipe uses.
    pub fn name(self) -> &'static str {
        match self {
            Fused::IndexerAt => "indexer-at",
            Fused::LmLoss => "lm-loss",
            Fused::Adamw => "adamw",
            Fused::DenseBwd => "dense-bwd",
            Fused::RmsNorm => "rms-norm",
            Fused::Rope => "rope",
            Fused::Swiglu => "swiglu",
            Fused::JoinRows => "join-rows",
            Fused::SparseWgmma => "sparse-wg",
            Fused::MoeCombine => "moe-combine",
            Fused::GradSum => "grad-sum",
            Fused::MoeRoute => "moe-route",
            Fused::Fp8Dequant => "fp8-dequant",
            Fused::SparseFewHeads => "sparse-few-heads",
            Fused::SparseMergeQueries => "sparse-merge-queries",
            Fused::LayerBackward => "layer-backward",
        }
    }

    pub fn parse(name: &str) -> Option<Fused> {
        Fused::ALL.into_iter().find(|f| f.name() == name)
    }

    const fn bit(self) -> u32 {
        1 << (self as u32)
    }

    /// The bits of `OPT_IN`.
    const fn opt_in_bits() -> u32 {
        let mut bits = 0;
        let mut i = 0;
        while i < Self::OPT_IN.len() {
            bits |= Self::OPT_IN[i].bit();
            i += 1;
        }
        bits
    }
}

/// Kernels or plain twins, per op. `Default` is every kernel where it can run, but those of
/// `Fused::OPT_IN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelPolicy {
    /// false: the plain twins everywhere (candle ops only, CUDA or not).
    kernels: bool,
    /// Fused ops switched off one by one (a bit per `Fused`).
    plain_ops: u32,
    /// The sparse MLA backward sums dkv in a fixed order (bit-identical from run to run, about
    /// twice its time) instead of f32 atomics.
    pub deterministic: bool,
}

impl Default for KernelPolicy {
    fn default() -> Self {
        Self::KERNELS
    }
}

impl KernelPolicy {
    /// Every kernel where it can run, but those of `Fused::OPT_IN`.
    pub const KERNELS: Self = Self {
        kernels: true,
        plain_ops: Fused::opt_in_bits(),
        deterministic: false,
    };
    /// The plain twins everywhere.
    pub const PLAIN: Self = Self {
        kernels: false,
        plain_ops: 0,
        deterministic: false,
    };

    /// From a recipe's `[kernels]` section: `plain` (every twin), the names in `opt_in` (of
    /// `Fused::OPT_IN`: on) and in `plain_ops` (off, whatever `opt_in` says); an unknown name
    /// is an error naming the key and the valid names.
    pub fn from_recipe(
        plain: bool,
        plain_ops: &[String],
        opt_in: &[String],
        deterministic: bool,
    ) -> anyhow::Result<Self> {
        let mut p = if plain { Self::PLAIN } else { Self::KERNELS };
        for name in opt_in {
            match Fused::parse(name.trim()).filter(|op| Fused::OPT_IN.contains(op)) {
                Some(op) => p = p.with(op),
                None => anyhow::bail!(
                    "kernels.opt_in: `{name}` is not an opt-in op (opt-in ops: {}; every other op is on unless named in kernels.plain_ops)",
                    Fused::OPT_IN.map(Fused::name).join(", ")
                ),
            }
        }
        for name in plain_ops {
            match Fused::parse(name.trim()) {
                Some(op) => p = p.without(op),
                None => anyhow::bail!(
                    "kernels.plain_ops: unknown op `{name}` (ops: {})",
                    Fused::ALL.map(Fused::name).join(", ")
                ),
            }
        }
        p.deterministic = deterministic;
        Ok(p)
    }

    /// This policy with `op`'s plain twin.
    pub fn without(mut self, op: Fused) -> Self {
        self.plain_ops |= op.bit();
        self
    }

    /// This policy with `op`'s kernel (an opt-in op on, or a switched-off one back on).
    pub fn with(mut self, op: Fused) -> Self {
        self.plain_ops &= !op.bit();
        self
    }

    /// This policy with the deterministic sparse MLA backward on or off.
    pub fn with_deterministic(mut self, on: bool) -> Self {
        self.deterministic = on;
        self
    }

    /// May custom kernels run on `device` (a CUDA device, a CUDA build, not all twins)?
    pub fn on(&self, device: &Device) -> bool {
        cfg!(feature = "cuda") && device.is_cuda() && self.kernels
    }

    /// May the fused `op` run on `device`?
    pub fn uses(&self, op: Fused, device: &Device) -> bool {
        self.on(device) && self.plain_ops & op.bit() == 0
    }

    /// Is `op` switched off by name (whatever the device)?
    pub fn is_plain(&self, op: Fused) -> bool {
        !self.kernels || self.plain_ops & op.bit() != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for op in Fused::ALL {
            assert_eq!(Fused::parse(op.name()), Some(op));
        }
        let p = KernelPolicy::from_recipe(false, &["rope".into(), "lm-loss".into()], &[], true)
            .unwrap();
        assert!(p.is_plain(Fused::Rope) && p.is_plain(Fused::LmLoss) && !p.is_plain(Fused::Adamw));
        assert!(p.deterministic);
        // Opt-in ops are off by default, on where named, and plain_ops still wins.
        let merge = || vec![Fused::SparseMergeQueries.name().to_string()];
        assert!(KernelPolicy::default().is_plain(Fused::SparseMergeQueries));
        let on = KernelPolicy::from_recipe(false, &[], &merge(), false).unwrap();
        assert!(!on.is_plain(Fused::SparseMergeQueries));
        let off = KernelPolicy::from_recipe(false, &merge(), &merge(), false).unwrap();
        assert!(off.is_plain(Fused::SparseMergeQueries));
        let e = KernelPolicy::from_recipe(false, &[], &["rope".into()], false).unwrap_err();
        assert!(
            e.to_string().contains("kernels.opt_in")
                && e.to_string().contains("sparse-merge-queries"),
            "{e}"
        );
        // Off the GPU nothing runs a kernel, whatever the policy.
        assert!(!KernelPolicy::KERNELS.uses(Fused::Adamw, &Device::Cpu));
        assert!(KernelPolicy::PLAIN.is_plain(Fused::Adamw));
        let e = KernelPolicy::from_recipe(false, &["ropes".into()], &[], false).unwrap_err();
        assert!(
            e.to_string().contains("kernels.plain_ops") && e.to_string().contains("rope"),
            "{e}"
        );
    }
}
