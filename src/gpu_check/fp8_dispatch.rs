//! GPU check of the MoE's FP8 dispatch (`model::dispatch`): on CUDA it is refused with one
//! clear sentence (`dispatch::NOT_ON_CUDA`: candle's F8E4M3 cast is looked up under the wrong
//! name, and the project's own kernel is not written), never a driver error mid-step; the
//! host path rounds as the module states (its unit tests hold it against a host reference).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::Outcome;
use crate::model::dispatch::{quantize_rows, NOT_ON_CUDA};

pub fn checks(gpu: &Device) -> Result<Vec<Outcome>> {
    let x = crate::rng::randn(&[37, 300], 7, 1.0, gpu)?.to_dtype(DType::BF16)?;
    let host = quantize_rows(&x.to_device(&Device::Cpu)?).is_ok();
    let refused = match quantize_rows(&x) {
        Ok(_) => "ran".to_string(),
        Err(e) => e.to_string(),
    };
    let clear = refused.contains(NOT_ON_CUDA);
    let _ = Tensor::zeros(1, DType::F32, gpu)?; // the device still works after the refusal
    Ok(vec![Outcome {
        name: "fp8 dispatch on the GPU is refused with one clear sentence",
        ok: clear && host,
        detail: format!(
            "GPU: {}; the same rows on the host: {}",
            if clear {
                "refused by name"
            } else {
                refused.as_str()
            },
            if host { "rounded" } else { "FAILED" }
        ),
    }])
}
