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
//! placeholder's id finds the bytes (`model::materialize`). A materialised layer lives while
//! its caller holds it.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Tensor, TensorId};
use half::bf16;

use crate::dist::expert::RowExchange;
use crate::fp8;
use crate::kernels::{Fused, KernelPolicy};

/// Values per side of a scale block (DeepSeek's checkpoints).
pub const BLOCK: usize = 128;

/// One frozen weight in FP8: e4m3 bytes [rows, cols] (u8) and block scales
/// [ceil(rows / 128), ceil(cols / 128)] (f32, multipliers), on the model's device; `dtype` is
/// what it dequantises to, on `device`. Under ZeRO-3 (`sharded`) a rank holds only its rows
/// (whole 128-row blocks, `shard_rows`), possibly none, and the layer's run gathers the
/// others; with `model.frozen_fp8_offload` the part waits in host memory and the run copies it.
pub struct Fp8Weight {
    /// This rank's rows: bytes and their scale rows (None: it holds no row).
    pub part: Option<(Tensor, Tensor)>,
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
    pub device: Device,
    /// The ranks that hold the other rows, in row order (None: `part` is the whole weight).
    pub sharded: Option<Arc<dyn RowExchange>>,
}

/// Rank `index` of `ranks`' rows of a [rows, .] FP8 weight under ZeRO-3: its share of the
/// 128-row scale blocks, in order (ranks past the blocks hold none).
pub fn shard_rows(rows: usize, index: usize, ranks: usize) -> Range<usize> {
    let blocks = fp8::blocks(rows, BLOCK);
    let (b0, b1) = (index * blocks / ranks, (index + 1) * blocks / ranks);
    (b0 * BLOCK).min(rows)..(b1 * BLOCK).min(rows)
}

impl Fp8Weight {
    /// Device bytes held (values and scales).
    pub fn held_bytes(&self) -> usize {
        self.part
            .as_ref()
            .map_or(0, |(b, s)| b.elem_count() + 4 * s.elem_count())
    }

    /// The weight [rows, cols] in `dtype`, as the loader gives it.
    pub fn dequantize(&self, kernels: KernelPolicy) -> Result<Tensor> {
        let (bytes, scales) = match (&self.sharded, &self.part) {
            // Held elsewhere (offloaded to the host): copied to the device first.
            (None, Some((b, s))) => (b.to_device(&self.device)?, s.to_device(&self.device)?),
            (Some(group), part) => self.gather(group.as_ref(), part.as_ref())?,
            (None, None) => bail!("fp8 weight [{}, {}] holds no rows", self.rows, self.cols),
        };
        let (bytes, scales) = (&bytes, &scales);
        if kernels.uses(Fused::Fp8Dequant, bytes.device()) {
            crate::kernels::fp8_dequant::dequantize(bytes, scales, self.dtype)
        } else {
            dequantize_plain(bytes, scales, self.dtype)
        }
    }

    /// Every rank's rows, gathered in rank order (host bytes: each rank sends its part to all):
    /// the whole bytes and scales, on this rank's device.
    fn gather(
        &self,
        group: &dyn RowExchange,
        part: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor)> {
        let mine: Vec<u8> = match part {
            Some((b, s)) => {
                let mut v: Vec<u8> = b.flatten_all()?.to_vec1()?;
                let sc: Vec<f32> = s.flatten_all()?.to_vec1()?;
                v.extend(sc.iter().flat_map(|x| x.to_le_bytes()));
                v
            }
            None => vec![],
        };
        let got = group
            .host(vec![mine; group.size()])
            .map_err(|e| candle_core::Error::Msg(format!("ZeRO-3 weight gather: {e:#}")))?;
        let col_blocks = fp8::blocks(self.cols, BLOCK);
        let (mut bytes, mut scales) = (Vec::with_capacity(self.rows * self.cols), vec![]);
        for (i, g) in got.iter().enumerate() {
            let r = shard_rows(self.rows, i, group.size()).len();
            let n_scales = fp8::blocks(r, BLOCK) * col_blocks;
            if g.len() != r * self.cols + 4 * n_scales {
                bail!(
                    "ZeRO-3 weight gather: rank {i} of the group sent {} bytes for {r} rows of {}",
                    g.len(),
                    self.cols
                );
            }
            bytes.extend_from_slice(&g[..r * self.cols]);
            scales.extend(
                g[r * self.cols..]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        let device = &self.device;
        Ok((
            Tensor::from_vec(bytes, (self.rows, self.cols), device)?,
            Tensor::from_vec(scales, (fp8::blocks(self.rows, BLOCK), col_blocks), device)?,
        ))
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
        placeholders: &std::collections::BTreeMap<String, Tensor>,
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

    /// `t` dequantised when it is the placeholder of a weight held here (None otherwise).
    pub fn dequantized(&self, t: &Tensor, kernels: KernelPolicy) -> Result<Option<Tensor>> {
        self.by_placeholder
            .get(&t.id())
            .map(|w| w.dequantize(kernels))
            .transpose()
    }
}

/// A placeholder for a weight held in FP8: one value (never an empty device buffer), the model
/// dtype, a fresh id.
pub fn placeholder(dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::zeros(1, dtype, device)
}
