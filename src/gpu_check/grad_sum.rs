//! GPU check of the in-place gradient sum (kernels/grad_sum.cu) against its plain twin on the
//! same GPU: `GradSum`'s first copy and three adds of gradients of mixed magnitude (and a
//! gradient of -0, which a copy keeps and an add turns into the old value), in f32 and bf16,
//! whole and a block of rows at a time with blocks whose offsets are not multiples of four
//! (the kernel's scalar path) and are (its four-wide path). The sums must be bit-equal.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::Outcome;
use crate::kernels::{Fused, KernelPolicy};
use crate::train::accumulate::GradSum;

pub fn checks(gpu: &Device) -> Result<Vec<Outcome>> {
    let (fused, plain) = (
        KernelPolicy::KERNELS,
        KernelPolicy::KERNELS.without(Fused::GradSum),
    );
    let mut out = vec![];
    // (shape, values per block): one value; rows of 5 in blocks of 3 rows (offsets 15, 30, ...);
    // an expert-sized tensor whole and in blocks of 1024 rows.
    let cases: [(&[usize], usize); 5] = [
        (&[1], 1 << 24),
        (&[97, 5], 15),
        (&[1025, 12], 1 << 24),
        (&[2048, 7168], 1 << 24),
        (&[2048, 7168], 1024 * 7168),
    ];
    for (shape, block) in cases {
        let mut equal = true;
        for dtype in [DType::F32, DType::BF16] {
            let gs: Vec<Tensor> = (0..4)
                .map(|i| {
                    let scale = [1.0, 1e-3, 3e4, 1.0][i];
                    let g = crate::rng::randn(shape, 40 + i as u64, scale, gpu)?;
                    // Signed zeros: neg of +0 (an affine op would turn -0 into +0).
                    let g = if i == 3 { g.zeros_like()?.neg()? } else { g };
                    g.to_dtype(dtype)
                })
                .collect::<candle_core::Result<_>>()?;
            let mut sums = vec![];
            for policy in [fused, plain] {
                let mut sum = GradSum::copy_of(&gs[0], gpu, block, policy)?;
                for g in &gs[1..] {
                    sum.add(g, block, policy)?;
                }
                let first = GradSum::copy_of(&gs[3], gpu, block, policy)?;
                sums.push((sum.into_tensor(), first.into_tensor()));
            }
            let bits = |t: &Tensor| -> Result<Vec<u32>> {
                Ok(t.flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|x| x.to_bits())
                    .collect())
            };
            equal &=
                bits(&sums[0].0)? == bits(&sums[1].0)? && bits(&sums[0].1)? == bits(&sums[1].1)?;
        }
        out.push(Outcome {
            name: "grad-sum kernel vs plain twin",
            ok: equal,
            detail: format!(
                "{shape:?} in blocks of {block} values, f32 and bf16 gradients: copy, 3 adds, -0 copied: {}",
                if equal { "bit-equal" } else { "DIFFER" }
            ),
        });
    }
    Ok(out)
}
