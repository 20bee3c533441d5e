//! Where an explicit backward (`model::backward`) puts the gradients of the parameters it
//! passes through: the trainer's f32 accumulator, or a plain map in tests.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor, TensorId};

pub trait GradSink {
    /// Whether `param` learns here: a frozen tensor's gradient is never computed.
    fn wants(&self, param: &Tensor) -> bool;
    /// Add `grad` (shaped like `param`, any float dtype) to `param`'s gradient.
    fn add(&mut self, param: &Tensor, grad: Tensor) -> Result<()>;
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
        self.only.as_ref().is_none_or(|ids| ids.contains(&param.id()))
    }

    fn add(&mut self, param: &Tensor, grad: Tensor) -> Result<()> {
        if grad.dims() != param.dims() {
            candle_core::bail!("gradient of shape {:?} for a parameter of shape {:?}", grad.dims(), param.dims());
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
