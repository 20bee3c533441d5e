//! Frozen weights held as the checkpoint stores them: FP8 e4m3 bytes with 128 x 128 block
//! scales, one byte per value on the device instead of two, and dequantised a layer at a time,
//! when the layer runs (`Model::layer`). The warm-up freezes the main model, so its
//! projections and experts are only ever read: at 671B that halves the largest term of a
//! device's memory (docs/scaling.md).
//!
//! Numerics: the loader's dequantisation, value = e4m3(b) * scale in f32 rounded once to the
//! model dtype (`fp8::dequantize_into` with the same conversion), so a layer built from the
//! FP8 bytes is the dense-loaded layer bit for bit. On a GPU the kernel
//! (kernels/fp8_dequant.cu) computes it; its twin is the host loop (`dequantize_plain`),
//! compared bit for bit in `gpu-selftest --only fp8-dequant`.
//!
//! The model's layer holds a placeholder (an empty tensor) where a weight is held in FP8; the
//! placeholder's id finds the bytes. A materialised layer lives while its caller holds it.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Tensor, TensorId};
use half::bf16;

use super::DecoderLayer;
use crate::fp8;
use crate::kernels::{Fused, KernelPolicy};

/// Values per side of a scale block (DeepSeek's checkpoints).
pub const BLOCK: usize = 128;

/// One frozen weight in FP8: e4m3 bytes [rows, cols] (u8) and block scales
/// [ceil(rows / 128), ceil(cols / 128)] (f32, multipliers), on the model's device; `dtype` is
/// what it dequantises to.
pub struct Fp8Weight {
    pub bytes: Tensor,
    pub scales: Tensor,
    pub dtype: DType,
}

impl Fp8Weight {
    /// Device bytes held (values and scales).
    pub fn held_bytes(&self) -> usize {
        self.bytes.elem_count() + 4 * self.scales.elem_count()
    }

    /// The weight [rows, cols] in `dtype`, as the loader gives it.
    pub fn dequantize(&self, kernels: KernelPolicy) -> Result<Tensor> {
        if kernels.uses(Fused::Fp8Dequant, self.bytes.device()) {
            crate::kernels::fp8_dequant::dequantize(&self.bytes, &self.scales, self.dtype)
        } else {
            dequantize_plain(&self.bytes, &self.scales, self.dtype)
        }
    }
}

/// The twin: the loader's host loop, the result moved to the bytes' device.
pub fn dequantize_plain(bytes: &Tensor, scales: &Tensor, dtype: DType) -> Result<Tensor> {
    let (rows, cols) = bytes.dims2()?;
    let w8: Vec<u8> = bytes.flatten_all()?.to_vec1()?;
    let s: Vec<f32> = scales.flatten_all()?.to_vec1()?;
    if s.len() != fp8::blocks(rows, BLOCK) * fp8::blocks(cols, BLOCK) {
        bail!(
            "fp8 weight [{rows}, {cols}]: {} scales, {} expected",
            s.len(),
            fp8::blocks(rows, BLOCK) * fp8::blocks(cols, BLOCK)
        );
    }
    let n = rows * cols;
    let device = bytes.device();
    match dtype {
        DType::BF16 => {
            let mut out: Vec<MaybeUninit<bf16>> = Vec::with_capacity(n);
            out.resize_with(n, MaybeUninit::uninit);
            fp8::dequantize_into(&w8, &s, rows, cols, BLOCK, &mut out, bf16::from_f32);
            // SAFETY: dequantize_into writes every element.
            let out: Vec<bf16> = out
                .into_iter()
                .map(|x| unsafe { x.assume_init() })
                .collect();
            Tensor::from_vec(out, (rows, cols), device)
        }
        _ => {
            let mut out: Vec<MaybeUninit<f32>> = Vec::with_capacity(n);
            out.resize_with(n, MaybeUninit::uninit);
            fp8::dequantize_into(&w8, &s, rows, cols, BLOCK, &mut out, |x| x);
            // SAFETY: dequantize_into writes every element.
            let out: Vec<f32> = out
                .into_iter()
                .map(|x| unsafe { x.assume_init() })
                .collect();
            Tensor::from_vec(out, (rows, cols), device)?.to_dtype(dtype)
        }
    }
}

/// The model's FP8-held weights, by the id of the placeholder its layers hold.
#[derive(Clone, Default)]
pub struct FrozenFp8 {
    by_placeholder: Arc<HashMap<TensorId, Fp8Weight>>,
}

impl FrozenFp8 {
    /// `weights` by tensor name; `placeholders` the tensors the model was built with (a name's
    /// placeholder must be there).
    pub fn new(
        weights: HashMap<String, Fp8Weight>,
        placeholders: &crate::weights::ParamSet,
    ) -> Result<Self> {
        let mut by_placeholder = HashMap::with_capacity(weights.len());
        for (name, w) in weights {
            let Some(p) = placeholders.get(&name) else {
                bail!("fp8 weight {name} has no placeholder in the model");
            };
            by_placeholder.insert(p.id(), w);
        }
        Ok(Self {
            by_placeholder: Arc::new(by_placeholder),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.by_placeholder.is_empty()
    }

    /// Tensors held in FP8 and their device bytes.
    pub fn held(&self) -> (usize, usize) {
        (
            self.by_placeholder.len(),
            self.by_placeholder
                .values()
                .map(Fp8Weight::held_bytes)
                .sum(),
        )
    }

    /// `layer` ready to run: itself when none of its weights is held here, else a copy with
    /// them dequantised (the other tensors shared, so trainable ones keep their identity).
    pub fn materialize<'a>(
        &self,
        layer: &'a DecoderLayer,
        kernels: KernelPolicy,
    ) -> Result<LayerToRun<'a>> {
        if self.is_empty() {
            return Ok(LayerToRun::Held(layer));
        }
        let mut any = false;
        let full = layer.map_tensors(&mut |t: &Tensor| match self.by_placeholder.get(&t.id()) {
            Some(w) => {
                any = true;
                w.dequantize(kernels)
            }
            None => Ok(t.clone()),
        })?;
        Ok(if any {
            LayerToRun::Dequantised(Box::new(full))
        } else {
            LayerToRun::Held(layer)
        })
    }
}

/// A layer as it runs: the model's own, or a copy with its FP8-held weights dequantised.
pub enum LayerToRun<'a> {
    Held(&'a DecoderLayer),
    Dequantised(Box<DecoderLayer>),
}

impl std::ops::Deref for LayerToRun<'_> {
    type Target = DecoderLayer;

    fn deref(&self) -> &DecoderLayer {
        match self {
            LayerToRun::Held(l) => l,
            LayerToRun::Dequantised(l) => l,
        }
    }
}

/// A placeholder for a weight held in FP8: one value (never an empty device buffer), the model
/// dtype, a fresh id.
pub fn placeholder(dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::zeros(1, dtype, device)
}
