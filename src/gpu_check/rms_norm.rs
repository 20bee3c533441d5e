//! The fused RMSNorm (`kernels::rms_norm`) against its plain twin (`ops::rms_norm_plain`) on
//! the GPU, and both against f64 maths on the host: the output element by element against the
//! twin (bf16: within two steps, in at most 1e-4 of the values), dx and dw (from sum(y g) for
//! a random g) in the 2-norm against f64, where the fused op must be at least about as close
//! as the twin; its backward run twice must be bit-equal.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};

use super::Outcome;

/// y, dx, dw of sum(rms_norm(x, w) * g) in f64 from the inputs as stored (no rounding inside).
fn reference(
    x: &[f64],
    w: &[f64],
    g: &[f64],
    d: usize,
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let rows = x.len() / d;
    let (mut y, mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; d]);
    for r in 0..rows {
        let (xr, gr) = (&x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
        let s = (xr.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
        let dot: f64 = (0..d).map(|j| gr[j] * w[j] * xr[j]).sum();
        for j in 0..d {
            y[r * d + j] = xr[j] / s * w[j];
            dx[r * d + j] = gr[j] * w[j] / s - xr[j] * dot / (d as f64 * s * s * s);
            dw[j] += gr[j] * xr[j] / s;
        }
    }
    (y, dx, dw)
}

fn host_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?)
}

fn rel_l2_f64(a: &[f64], b: &[f64]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum();
    let norm: f64 = b.iter().map(|q| q * q).sum();
    (diff / norm.max(1e-300)).sqrt()
}

/// (y, dx, dw) of `norm` with its autograd.
fn run(
    norm: fn(&Tensor, &Tensor, f64) -> candle_core::Result<Tensor>,
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (xv, wv) = (Var::from_tensor(x)?, Var::from_tensor(w)?);
    let y = norm(xv.as_tensor(), wv.as_tensor(), eps)?;
    let grads = (y.to_dtype(DType::F32)? * g.to_dtype(DType::F32)?)?
        .sum_all()?
        .backward()?;
    let get = |v: &Var| {
        grads
            .get(v.as_tensor())
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no gradient"))
    };
    Ok((y, get(&xv)?, get(&wv)?))
}

pub(super) fn checks(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    let mut rng = crate::rng::SplitMix64::new(113);
    let eps = 1e-6;
    // (x dtype, w dtype, leading dims, D, x std): one row, odd sizes, more rows than one dw
    // chunk (256), V3's hidden 7168, large and tiny magnitudes, f32 weights with bf16 activations.
    let cases: [(DType, DType, &[usize], usize, f64); 6] = [
        (DType::F32, DType::F32, &[97], 1024, 1.0),
        (DType::BF16, DType::F32, &[1, 1025], 768, 3.0),
        (DType::BF16, DType::BF16, &[1], 7, 1.0),
        (DType::F32, DType::F32, &[2, 2049], 512, 100.0),
        (DType::BF16, DType::F32, &[4097], 7168, 1e-3),
        (DType::F32, DType::BF16, &[300], 3, 1.0),
    ];
    for (xd, wd, lead, d, std) in cases {
        let mut shape = lead.to_vec();
        shape.push(d);
        let x = crate::rng::randn(&shape, rng.next_u64(), std, gpu)?.to_dtype(xd)?;
        let w = (crate::rng::randn(&[d], rng.next_u64(), 0.1, gpu)? + 1.0)?.to_dtype(wd)?;
        let g = crate::rng::randn(&shape, rng.next_u64(), 1.0, gpu)?.to_dtype(xd)?;
        let (yf, dxf, dwf) = run(crate::kernels::rms_norm::rms_norm, &x, &w, &g, eps)?;
        let (yp, dxp, dwp) = run(crate::ops::rms_norm_plain, &x, &w, &g, eps)?;
        let (_, dxf2, dwf2) = run(crate::kernels::rms_norm::rms_norm, &x, &w, &g, eps)?;
        let (y_ref, dx_ref, dw_ref) =
            reference(&host_f64(&x)?, &host_f64(&w)?, &host_f64(&g)?, d, eps);
        // The output against the twin, element by element: for bf16 two steps of the dtype (2^-7
        // of the value each): where the two s differ by an f32 rounding, T(n) can land one step
        // apart and the product with w rounds once more (measured: 1.78 steps in 175 of 29M
        // values at D 7168); for f32 1e-6 relative. Plus 1e-30 for zeros.
        let step = if xd == DType::BF16 { 2.0 / 128.0 } else { 1e-6 };
        let (a, b) = (host_f64(&yf)?, host_f64(&yp)?);
        let worst = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs() / (step * q.abs() + 1e-30))
            .fold(0.0f64, f64::max);
        let differ = a.iter().zip(&b).filter(|(p, q)| p != q).count();
        // And in bf16 only rarely: a flip of T(x / s) needs the two s a rounding apart at a
        // rounding boundary (measured: 175 of 29.4M values, 6e-6); at most 1e-4 of the values.
        let rare = xd != DType::BF16 || differ as f64 <= 1e-4 * a.len() as f64;
        let e_y = rel_l2_f64(&a, &y_ref);
        let (e_dx, e_dx_plain) = (
            rel_l2_f64(&host_f64(&dxf)?, &dx_ref),
            rel_l2_f64(&host_f64(&dxp)?, &dx_ref),
        );
        let (e_dw, e_dw_plain) = (
            rel_l2_f64(&host_f64(&dwf)?, &dw_ref),
            rel_l2_f64(&host_f64(&dwp)?, &dw_ref),
        );
        // At least about as close to f64 as the twin (1.5x, plus a floor of the dtype's rounding).
        // dx is in x's dtype; dw in w's (its sum in x's dtype first).
        let floor_dx = if xd == DType::BF16 { 4e-3 } else { 1e-6 };
        let floor_dw = if xd == DType::BF16 || wd == DType::BF16 {
            4e-3
        } else {
            1e-6
        };
        let close = |e: f64, e_plain: f64, floor: f64| e <= 1.5 * e_plain + floor;
        let repeat = host_f64(&dxf)? == host_f64(&dxf2)? && host_f64(&dwf)? == host_f64(&dwf2)?;
        out.push(Outcome {
            name: "fused RMSNorm vs twin and f64",
            ok: worst <= 1.0 && rare && close(e_dx, e_dx_plain, floor_dx) && close(e_dw, e_dw_plain, floor_dw) && e_y < step.max(2e-7) && repeat,
            detail: format!(
                "x {xd:?} {shape:?} std {std}, w {wd:?}: y within {worst:.2} of the bound {step:.1e} |twin| ({differ} of {} differ), {e_y:.1e} from f64; \
                 dx {e_dx:.1e} (twin {e_dx_plain:.1e}), dw {e_dw:.1e} (twin {e_dw_plain:.1e}) from f64; backward repeatable {repeat}",
                a.len()
            ),
        });
    }
    Ok(out)
}
