//! GPU check of the row-sum kernel (kernels/rows.cu) against the CPU loop of `rows::RowPlan`,
//! which the CPU tests tie bit for bit to candle's `index_select` / `index_add`. Both add the
//! same values in f32 in the same order and round once, so the check asks for equality, in
//! f32 and in bf16, for a gather, its adjoint (a scatter-add with repeated rows) and the
//! gradient through the gather; sizes include 1 row, 1 column and a vocabulary-sized scatter.
//!
//! The MoE combine's weighted kernels (`apply_weighted`, `gather_scaled_dot`) against their
//! plain twins on the same GPU (policy without `moe-combine`): the weighted sums, the scaled
//! rows and the gradient of x bit for bit; the dot products and the weights' gradient (f32
//! sums in another order) to 1e-5 relative.

use anyhow::Result;
use candle_core::{DType, Device, Var};

use super::Outcome;
use crate::rows::RowPlan;

pub fn checks(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    let mut rng = crate::rng::SplitMix64::new(21);
    for (in_rows, n, d) in [
        (1usize, 1usize, 1usize),
        (97, 1025, 7),
        (4097, 3000, 1024),
        (129_280, 4096, 64),
    ] {
        let ids: Vec<u32> = (0..n)
            .map(|_| (rng.next_u64() % in_rows as u64) as u32)
            .collect();
        let on_gpu = RowPlan::gather(&ids, in_rows, gpu)?;
        let on_cpu = RowPlan::gather(&ids, in_rows, &Device::Cpu)?;
        let mut worst = 0f32;
        let mut equal = true;
        for dtype in [DType::F32, DType::BF16] {
            let x =
                crate::rng::randn(&[in_rows, d], n as u64, 1.0, &Device::Cpu)?.to_dtype(dtype)?;
            let up = crate::rng::randn(&[n, d], 5, 1.0, &Device::Cpu)?.to_dtype(dtype)?;
            let xv = Var::from_tensor(&x.to_device(gpu)?)?;
            let y = on_gpu.apply(crate::kernels::KernelPolicy::default(), xv.as_tensor())?;
            let grads = (&y * up.to_device(gpu)?)?.sum_all()?.backward()?;
            let dx = grads.get(xv.as_tensor()).expect("gradient of x").clone();
            let pairs = [
                (
                    y,
                    on_cpu.apply(crate::kernels::KernelPolicy::default(), &x)?,
                ),
                (
                    on_gpu
                        .adjoint()
                        .apply(crate::kernels::KernelPolicy::default(), &up.to_device(gpu)?)?,
                    on_cpu
                        .adjoint()
                        .apply(crate::kernels::KernelPolicy::default(), &up)?,
                ),
                // sum_all's backward is ones * up: the gradient is the adjoint applied to up.
                (
                    dx,
                    on_cpu
                        .adjoint()
                        .apply(crate::kernels::KernelPolicy::default(), &up)?,
                ),
            ];
            for (g, c) in pairs {
                let (g, c) = (
                    g.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
                    c.to_dtype(DType::F32)?,
                );
                equal &= g.flatten_all()?.to_vec1::<f32>()? == c.flatten_all()?.to_vec1::<f32>()?;
                worst = worst.max(super::rel_err(&g, &c)?);
            }
        }
        out.push(Outcome {
            name: "row gather / scatter-add kernel vs CPU loop",
            ok: equal,
            detail: format!("{in_rows} rows -> {n} x {d}, f32 and bf16: forward, adjoint, gradient {} (max rel err {worst:.1e})", if equal { "bit-equal" } else { "DIFFER" }),
        });
    }
    out.extend(weighted_checks(gpu)?);
    Ok(out)
}

fn weighted_checks(gpu: &Device) -> Result<Vec<Outcome>> {
    use crate::kernels::{Fused, KernelPolicy};
    let (fused, plain) = (
        KernelPolicy::KERNELS,
        KernelPolicy::KERNELS.without(Fused::MoeCombine),
    );
    let mut out = vec![];
    let mut rng = crate::rng::SplitMix64::new(33);
    // (tokens, experts per token, hidden): one token, odd widths, the 671B hidden size.
    for (n, k, d) in [(1usize, 1usize, 1usize), (37, 3, 129), (4096, 8, 7168)] {
        // The combine's shape: row s of the expert outputs belongs to token tok[s].
        let mut tok: Vec<u32> = (0..n * k).map(|s| (s / k) as u32).collect();
        for i in (1..tok.len()).rev() {
            tok.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let gather = RowPlan::gather(&tok, n, gpu)?;
        let combine = gather.adjoint();
        let mut equal = true;
        let mut worst = 0f32;
        for dtype in [DType::F32, DType::BF16] {
            let s = n * k;
            let x = crate::rng::randn(&[s, d], 1 + s as u64, 1.0, gpu)?.to_dtype(dtype)?;
            let w = crate::rng::randn(&[s, 1], 2, 0.5, gpu)?.to_dtype(dtype)?;
            let up = crate::rng::randn(&[n, d], 3, 1.0, gpu)?.to_dtype(dtype)?;
            let (xv, wv) = (Var::from_tensor(&x)?, Var::from_tensor(&w)?);
            let mut results = vec![];
            for policy in [fused, plain] {
                let y = combine.apply_weighted(policy, xv.as_tensor(), wv.as_tensor())?;
                let loss = (y.to_dtype(DType::F32)? * up.to_dtype(DType::F32)?)?.sum_all()?;
                let grads = loss.backward()?;
                let (d_rows, dot) = gather.gather_scaled_dot(policy, &up, &w, &x)?;
                results.push([
                    y,
                    grads.get(xv.as_tensor()).expect("dx").clone(),
                    d_rows,
                    grads.get(wv.as_tensor()).expect("dw").clone(),
                    dot,
                ]);
            }
            let (a, b) = (&results[0], &results[1]);
            for (i, (g, c)) in a.iter().zip(b).enumerate() {
                let (g, c) = (g.to_dtype(DType::F32)?, c.to_dtype(DType::F32)?);
                let err = super::rel_err(&g, &c)?;
                if i < 3 {
                    equal &=
                        g.flatten_all()?.to_vec1::<f32>()? == c.flatten_all()?.to_vec1::<f32>()?;
                } else {
                    // The weights' gradient in bf16 is rounded from f32 sums in two orders.
                    let tol = if dtype == DType::BF16 && i == 3 {
                        1e-2
                    } else {
                        1e-5
                    };
                    equal &= err <= tol;
                }
                worst = worst.max(err);
            }
        }
        out.push(Outcome {
            name: "MoE combine kernels vs plain twins",
            ok: equal,
            detail: format!(
                "{n} tokens x {k} experts x {d}, f32 and bf16: weighted sums, dx, scaled rows {}; dw, dots max rel err {worst:.1e}",
                if equal { "bit-equal" } else { "DIFFER" }
            ),
        });
    }
    Ok(out)
}
