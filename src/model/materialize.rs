//! A decoder layer made ready to run. The model may hold a layer's weights in three ways: in
//! full (the default), in FP8 with block scales (the warm-up's frozen weights,
//! `fp8_frozen`), or as this rank's rows of a trainable tensor (ZeRO-3, `sharded`). Where it
//! holds placeholders, `Model::layer` builds a copy of the layer with those weights whole
//! (dequantised, gathered) and the others shared; the copy lives while the caller holds it.

use std::collections::HashMap;

use candle_core::{Result, Tensor, TensorId};

use super::fp8_frozen::FrozenFp8;
use super::sharded::ShardedParams;
use super::DecoderLayer;
use crate::kernels::KernelPolicy;

/// A layer as it runs: the model's own, or a copy with its held weights made whole.
pub enum LayerToRun<'a> {
    Held(&'a DecoderLayer),
    Materialised {
        layer: Box<DecoderLayer>,
        /// The placeholder the model holds for each gathered trainable tensor, by the gathered
        /// tensor's id: the gradients of the copy belong to the model's tensors.
        placeholders: HashMap<TensorId, TensorId>,
    },
}

impl LayerToRun<'_> {
    /// (gathered tensor, the placeholder the model holds) for every row-sharded weight.
    pub fn gathered(&self) -> impl Iterator<Item = (TensorId, TensorId)> + '_ {
        let map = match self {
            LayerToRun::Held(_) => None,
            LayerToRun::Materialised { placeholders, .. } => Some(placeholders),
        };
        map.into_iter().flatten().map(|(&g, &p)| (g, p))
    }
}

impl std::ops::Deref for LayerToRun<'_> {
    type Target = DecoderLayer;

    fn deref(&self) -> &DecoderLayer {
        match self {
            LayerToRun::Held(l) => l,
            LayerToRun::Materialised { layer, .. } => layer,
        }
    }
}

/// `layer` ready to run: itself when it holds no placeholder, else a copy with the FP8 weights
/// dequantised and the row-sharded ones gathered (all of a layer's in one exchange per
/// channel: every rank materialises the same layers in the same order).
pub fn materialize<'a>(
    layer: &'a DecoderLayer,
    fp8: &FrozenFp8,
    sharded: &ShardedParams,
    kernels: KernelPolicy,
) -> Result<LayerToRun<'a>> {
    if fp8.is_empty() && sharded.is_empty() {
        return Ok(LayerToRun::Held(layer));
    }
    // The layer's sharded tensors, in the layer's own order (the same on every rank).
    let mut ids = vec![];
    let mut device = None;
    layer.map_tensors(&mut |t: &Tensor| {
        if sharded.holds(t.id()) {
            ids.push(t.id());
            device.get_or_insert_with(|| t.device().clone());
        }
        Ok(t.clone())
    })?;
    let whole: HashMap<TensorId, Tensor> = match &device {
        Some(d) => ids.iter().copied().zip(sharded.gather(&ids, d)?).collect(),
        None => HashMap::new(),
    };
    let mut placeholders = HashMap::new();
    let mut any = false;
    let full = layer.map_tensors(&mut |t: &Tensor| {
        if let Some(w) = whole.get(&t.id()) {
            placeholders.insert(w.id(), t.id());
            any = true;
            return Ok(w.clone());
        }
        Ok(match fp8.dequantized(t, kernels)? {
            Some(w) => {
                any = true;
                w
            }
            None => t.clone(),
        })
    })?;
    Ok(if any {
        LayerToRun::Materialised {
            layer: Box::new(full),
            placeholders,
        }
    } else {
        LayerToRun::Held(layer)
    })
}
