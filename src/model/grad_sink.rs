//! Where an explicit backward (`model::blocks`) puts the gradients of the parameters it
//! passes through: the trainer's f32 accumulator, or a plain map in tests.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor, TensorId};

pub trait GradSink {
    /// Whether `param` learns here: a frozen tensor's gradient is never computed.
    fn wants(&self, param: &Tensor) -> bool;
    /// Add `grad` (shaped like `param`, any float dtype) to `param`'s gradient.
    fn add(&mut self, param: &Tensor, grad: Tensor) -> Result<()>;
}

/// Hand a parameter's gradient to `grads` when it was computed and is wanted (None: the
/// parameter is frozen and its gradient was skipped).
pub fn add_if_wanted(grads: &mut dyn GradSink, param: &Tensor, grad: Option<Tensor>) -> Result<()> {
    match grad {
        Some(g) if grads.wants(param) => grads.add(param, g),
        _ => Ok(()),
    }
}

/// Gradients summed in f32 per parameter (by tensor id): the explicit backward's side of the
/// tests that hold it against candle's autograd. `only`: the parameters that learn (None: all).
#[derive(Default)]
pub struct GradMap {
    pub sums: HashMap<TensorId, Tensor>,
    pub only: Option<Vec<TensorId>>,
}

impl GradSink for GradMap {
    fn wants(&self, param: &Tensor) -> bool {
        self.only
            .as_ref()
            .is_none_or(|ids| ids.contains(&param.id()))
    }

    fn add(&mut self, param: &Tensor, grad: Tensor) -> Result<()> {
        if grad.dims() != param.dims() {
            candle_core::bail!(
                "gradient of shape {:?} for a parameter of shape {:?}",
                grad.dims(),
                param.dims()
            );
        }
        let g = grad.to_dtype(DType::F32)?;
        let sum = match self.sums.remove(&param.id()) {
            Some(s) => (s + g)?,
            None => g,
        };
        self.sums.insert(param.id(), sum);
        Ok(())
    }
}

/// The originals of detached views of parameters, by the views' ids. A backward written by
/// hand runs on such views (candle records no graph through a detached tensor, while through
/// the trainer's Vars it would keep every op's inputs alive) and hands the gradients on under
/// the originals (`ToOriginals`).
#[derive(Default)]
pub struct Originals(HashMap<TensorId, Tensor>);

impl Originals {
    /// A detached view of `t` (the same storage), remembered as `t`'s.
    pub fn view(&mut self, t: &Tensor) -> Tensor {
        let v = t.detach();
        self.0.insert(v.id(), t.clone());
        v
    }
}

/// Gradients of detached views, handed on under the tensors they view.
pub struct ToOriginals<'a> {
    pub inner: &'a mut dyn GradSink,
    pub originals: Originals,
}

impl GradSink for ToOriginals<'_> {
    fn wants(&self, param: &Tensor) -> bool {
        self.originals
            .0
            .get(&param.id())
            .is_some_and(|p| self.inner.wants(p))
    }

    fn add(&mut self, param: &Tensor, grad: Tensor) -> Result<()> {
        match self.originals.0.get(&param.id()) {
            Some(p) => self.inner.add(p, grad),
            None => candle_core::bail!(
                "explicit backward: a gradient for a tensor that is not a view of a parameter"
            ),
        }
    }
}
