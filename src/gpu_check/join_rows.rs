//! The strided row copy (`kernels::join_rows`) against its plain twin (candle's reshape, cat,
//! cast and copy) on the GPU, bit for bit, on the views the absorbed attention hands it: a
//! transpose of the first two dims, a narrow of the last, a permutation of a rank-4 tensor's
//! dims, a join with a second input and with a broadcast zero column, casts both ways; and the
//! gradient of sum(y g) through it (its backward: the output gradient's columns).

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};

use super::Outcome;
use crate::kernels::join_rows::{join_rows, join_rows_plain};

use super::f32_bits as bits;

pub(super) fn checks(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    let r = |shape: &[usize], seed: u64, dtype: DType| -> Result<Tensor> {
        Ok(crate::rng::randn(shape, seed, 1.0, gpu)?.to_dtype(dtype)?)
    };
    type Case = (
        &'static str,
        Box<dyn Fn(&Tensor) -> Result<(Tensor, Option<Tensor>)>>,
        usize,
        DType,
        DType,
    );
    let cases: Vec<(Case, Vec<usize>)> = vec![
        (
            (
                "transpose [T, H, C] -> [H, T, C], bf16",
                Box::new(|x: &Tensor| Ok((x.transpose(0, 1)?, None))),
                1,
                DType::BF16,
                DType::BF16,
            ),
            vec![257, 16, 512],
        ),
        (
            (
                "narrow + transpose of the kernel's [T, H, C+1] f32 -> bf16",
                Box::new(|x: &Tensor| Ok((x.narrow(2, 0, 512)?.transpose(0, 1)?, None))),
                1,
                DType::F32,
                DType::BF16,
            ),
            vec![130, 12, 513],
        ),
        (
            (
                "permute [B, T, H, N] -> [H, B T, N]",
                Box::new(|x: &Tensor| Ok((x.narrow(3, 0, 128)?.permute((2, 0, 1, 3))?, None))),
                1,
                DType::BF16,
                DType::BF16,
            ),
            vec![2, 77, 8, 192],
        ),
        (
            (
                "join transposed latent and RoPE part",
                Box::new(|x: &Tensor| {
                    let pe = x.narrow(2, 0, 64)?.contiguous()?;
                    Ok((x.transpose(0, 1)?.transpose(0, 1)?, Some((pe * 2.0)?)))
                }),
                1,
                DType::BF16,
                DType::BF16,
            ),
            vec![99, 5, 512],
        ),
        (
            (
                "join with a broadcast zero column, bf16 -> f32",
                Box::new(|x: &Tensor| {
                    let (a, b, _) = x.dims3()?;
                    Ok((
                        x.clone(),
                        Some(
                            Tensor::zeros((1, 1, 1), x.dtype(), x.device())?
                                .broadcast_as((a, b, 1))?,
                        ),
                    ))
                }),
                1,
                DType::BF16,
                DType::F32,
            ),
            vec![64, 7, 40],
        ),
        (
            (
                "f32 -> f32, odd widths",
                Box::new(|x: &Tensor| {
                    Ok((
                        x.transpose(0, 1)?,
                        Some(x.transpose(0, 1)?.narrow(2, 1, 3)?),
                    ))
                }),
                1,
                DType::F32,
                DType::F32,
            ),
            vec![33, 3, 17],
        ),
    ];
    for (i, ((name, view, split, din, dout), shape)) in cases.into_iter().enumerate() {
        let x = r(&shape, 900 + i as u64, din)?;
        let run = |fused: bool| -> Result<(Tensor, Option<Tensor>)> {
            let xv = Var::from_tensor(&x)?;
            let (a, b) = view(xv.as_tensor())?;
            let y = if fused {
                join_rows(
                    crate::kernels::KernelPolicy::default(),
                    &a,
                    b.as_ref(),
                    split,
                    dout,
                )?
            } else {
                join_rows_plain(&a, b.as_ref(), split, dout)?
            };
            let g = crate::rng::randn(y.dims(), 77, 1.0, gpu)?.to_dtype(dout)?;
            let grads = (y.to_dtype(DType::F32)? * g.to_dtype(DType::F32)?)?
                .sum_all()?
                .backward()?;
            Ok((y, grads.get(xv.as_tensor()).cloned()))
        };
        let ((yf, gf), (yp, gp)) = (run(true)?, run(false)?);
        let same_y = bits(&yf)? == bits(&yp)?;
        let same_g = match (&gf, &gp) {
            (Some(a), Some(b)) => bits(a)? == bits(b)?,
            (None, None) => true,
            _ => false,
        };
        out.push(Outcome {
            name: "join_rows vs twin",
            ok: same_y && same_g,
            detail: format!(
                "{name} {shape:?}: output {}, gradient {}",
                if same_y { "bit-equal" } else { "DIFFERS" },
                if same_g { "bit-equal" } else { "DIFFERS" }
            ),
        });
    }
    Ok(out)
}
