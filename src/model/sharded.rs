//! Trainable weights held as row shards (ZeRO-3, `parallel.zero = 3`): a rank keeps, of each
//! tensor a decoder layer trains, only the rows it owns under ZeRO (the f32 masters of the
//! trainer's optimizer pieces, `train::zero::slot_ranges`), and the model's layer holds a
//! placeholder. When the layer runs (`Model::layer`), the tensor's holders (every rank for the
//! tensors outside the routed experts, an expert's replicas for its own) exchange their rows
//! and every rank assembles the tensors whole, for as long as it holds the layer: once for the
//! first pass, once again for the recomputing backward. The gradients of the whole tensors
//! are summed onto the owners as soon as the layer's backward has run (ZeRO-2's flush), and
//! the owners' optimizer step writes the masters this module reads next time.
//!
//! Numerics: each value is the owner's f32 master rounded once to the model dtype, the value
//! ZeRO-1 and ZeRO-2 write into every rank's replicated tensor after a step
//! (`train::zero::Reducer::gather_updated_params`), so a layer runs on the same weights bit for
//! bit whatever the ZeRO stage. The exchange moves model-dtype values (2 bytes each in bf16):
//! each rank sends its rows to every holder, the all-gather as an all-to-all of rows
//! (`dist::expert::all_to_all_rows_counted`, NCCL on GPUs, the TCP backend on CPU ranks).
//!
//! The embedding, the final norm, the LM head and the MTP module's input projection are not
//! layer tensors: they stay whole on every rank (ZeRO-2 still shards their optimizer state and
//! gradients).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Tensor, TensorId};

use crate::dist::expert::{all_to_all_rows_counted, RowExchange};

/// Bytes this process sent to other ranks gathering layer weights since the last
/// `take_gather_bytes` (a measurement for the metrics).
static GATHER_BYTES: AtomicU64 = AtomicU64::new(0);

/// Bytes of weight rows this process sent since the last call.
pub fn take_gather_bytes() -> u64 {
    GATHER_BYTES.swap(0, Ordering::Relaxed)
}

/// One tensor held as row shards.
pub struct ShardedWeight {
    /// The tensor's name, for errors.
    pub name: String,
    /// The whole tensor's shape and the dtype the layer runs in.
    pub dims: Vec<usize>,
    pub dtype: DType,
    /// Every row range of the tensor, in row order, with its owner's index among the holders.
    pub ranges: Vec<(usize, Range<usize>)>,
    /// This rank's ranges' f32 values, in row order.
    pub mine: Vec<Tensor>,
    /// Which of `ShardedParams`' channels reaches the holders.
    pub group: usize,
}

impl ShardedWeight {
    /// Values per row (1 for a vector, or a scalar: one row of one value).
    fn row_elems(&self) -> usize {
        self.dims.iter().skip(1).product()
    }

    /// Elements of the rows owned by holder `owner`.
    fn elems_of(&self, owner: usize) -> usize {
        self.ranges
            .iter()
            .filter(|(o, _)| *o == owner)
            .map(|(_, r)| r.len() * self.row_elems())
            .sum()
    }
}

/// The model's row-sharded weights, by the id of the placeholder its layers hold, and the
/// channels to their holders.
#[derive(Default)]
pub struct ShardedParams {
    by_placeholder: HashMap<TensorId, ShardedWeight>,
    channels: Vec<Arc<dyn RowExchange>>,
}

impl ShardedParams {
    /// No weight yet; `channels[g]` reaches the holders of group `g`'s weights.
    pub fn new(channels: Vec<Arc<dyn RowExchange>>) -> Self {
        Self {
            by_placeholder: HashMap::new(),
            channels,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_placeholder.is_empty()
    }

    pub fn holds(&self, placeholder: TensorId) -> bool {
        self.by_placeholder.contains_key(&placeholder)
    }

    pub fn insert(&mut self, placeholder: TensorId, weight: ShardedWeight) -> Result<()> {
        if weight.group >= self.channels.len() {
            bail!(
                "{}: no channel {} to its holders",
                weight.name,
                weight.group
            );
        }
        let want = weight.elems_of(self.channels[weight.group].index());
        let have: usize = weight.mine.iter().map(Tensor::elem_count).sum();
        if want != have {
            bail!(
                "{}: this rank owns {want} values of it but holds {have}",
                weight.name
            );
        }
        self.by_placeholder.insert(placeholder, weight);
        Ok(())
    }

    /// The new values of this rank's rows of `placeholder`'s tensor (after an optimizer step),
    /// f32 in row order.
    pub fn set_mine(&mut self, placeholder: TensorId, mine: Vec<Tensor>) -> Result<()> {
        match self.by_placeholder.get_mut(&placeholder) {
            Some(w) => {
                w.mine = mine;
                Ok(())
            }
            None => bail!("no sharded weight for this placeholder"),
        }
    }

    /// Number of sharded tensors and the bytes of the rows held here (f32).
    pub fn held(&self) -> (usize, usize) {
        let bytes = self
            .by_placeholder
            .values()
            .flat_map(|w| &w.mine)
            .map(|t| 4 * t.elem_count())
            .sum();
        (self.by_placeholder.len(), bytes)
    }

    /// The whole tensors of `placeholders` (each held here), on `device`: one exchange per
    /// channel that any of them needs, in channel order. Every holder calls this with the same
    /// tensors in the same order (they run the same layers).
    pub fn gather(&self, placeholders: &[TensorId], device: &Device) -> Result<Vec<Tensor>> {
        let mut whole: Vec<Option<Tensor>> = vec![None; placeholders.len()];
        for (g, channel) in self.channels.iter().enumerate() {
            let items: Vec<(usize, &ShardedWeight)> = placeholders
                .iter()
                .enumerate()
                .filter_map(|(i, id)| self.by_placeholder.get(id).map(|w| (i, w)))
                .filter(|(_, w)| w.group == g)
                .collect();
            let Some(dtype) = items.first().map(|(_, w)| w.dtype) else {
                continue;
            };
            if items.iter().any(|(_, w)| w.dtype != dtype) {
                bail!("ZeRO-3 gather: the tensors of one layer differ in dtype");
            }
            let size = channel.size();
            // My rows of every item, flattened in item order, as [n, 1] rows of the model dtype.
            let mut parts = vec![];
            for (_, w) in &items {
                for t in &w.mine {
                    parts.push(t.to_dtype(dtype)?.flatten_all()?);
                }
            }
            let mine = if parts.is_empty() {
                Tensor::zeros(0, dtype, device)?
            } else {
                Tensor::cat(&parts, 0)?.to_device(device)?
            };
            let n = mine.elem_count();
            let recv: Vec<usize> = (0..size)
                .map(|o| items.iter().map(|(_, w)| w.elems_of(o)).sum())
                .collect();
            let got = all_to_all_rows_counted(
                &Tensor::cat(&vec![mine.reshape((n, 1))?; size], 0)?,
                channel,
                &vec![n; size],
                &recv,
                &GATHER_BYTES,
            )?
            .flatten_all()?;
            // Holder o's rows start at the sum of the earlier holders' counts, item by item.
            let mut at: Vec<usize> = recv
                .iter()
                .scan(0, |acc, &r| {
                    let start = *acc;
                    *acc += r;
                    Some(start)
                })
                .collect();
            for (i, w) in items {
                let mut pieces = vec![];
                for (owner, rows) in &w.ranges {
                    let len = rows.len() * w.row_elems();
                    pieces.push(got.narrow(0, at[*owner], len)?);
                    at[*owner] += len;
                }
                whole[i] = Some(Tensor::cat(&pieces, 0)?.reshape(w.dims.as_slice())?);
            }
        }
        whole
            .into_iter()
            .map(|t| {
                t.ok_or_else(|| {
                    candle_core::Error::Msg("ZeRO-3 gather: a tensor that is not sharded".into())
                })
            })
            .collect()
    }
}
