//! GPU check of the row-sum kernel (kernels/rows.cu) against the CPU loop of `rows::RowPlan`,
//! which the CPU tests tie bit for bit to candle's `index_select` / `index_add`. Both add the
//! same values in f32 in the same order and round once, so the check asks for equality, in
//! f32 and in bf16, for a gather, its adjoint (a scatter-add with repeated rows) and the
//! gradient through the gather; sizes include 1 row, 1 column and a vocabulary-sized scatter.

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
    Ok(out)
}
