//! GPU check of MoE routing on the device (kernels/moe_route.cu) against its host twins: the
//! choice (`route_token`), the sort by expert (`expert_order`), each token's rows
//! (`token_rows_plain`), all integer results,
//! so equal or not. Shapes: the slice's 16 experts in 8 groups (4 kept, top 8), the 671B
//! model's 256 in 8 (4, top 8), one group of 64 (top 6, V2-Lite's routing), and a group of one
//! expert each; scores rounded to eighths (ties everywhere) and NaN scores; more slots than
//! one sort chunk, idle experts. Then a whole MoE layer's explicit forward and backward with
//! the routing kernels and with the host routing: output, dx and every gradient bit-equal.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::Outcome;
use crate::kernels::moe_route::{self, expert_order, token_rows_plain};
use crate::kernels::{Fused, KernelPolicy};
use crate::model::grad_sink::GradMap;
use crate::model::moe::{route_token, ExpertCompute, Mlp, Moe};
use crate::rng::{randn, SplitMix64};

/// Router scores [n, e] in [0, 1]: `ties` rounds them to eighths; `nans` puts a NaN in every
/// 7th row.
fn scores(n: usize, e: usize, seed: u64, ties: bool, nans: bool) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n * e)
        .map(|i| {
            let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
            if nans && (i / e) % 7 == 3 && i % e == (i / e) % e {
                f32::NAN
            } else if ties {
                (u * 8.0).floor() / 8.0
            } else {
                u
            }
        })
        .collect()
}

pub fn checks(gpu: &Device) -> Result<Vec<Outcome>> {
    let mut out = vec![];
    // (tokens, experts, groups, kept groups, top k)
    let cases = [
        (4096usize, 16usize, 8usize, 4usize, 8usize),
        (1500, 256, 8, 4, 8),
        (3000, 64, 1, 1, 6),
        (777, 12, 12, 5, 3),
        (70_000, 16, 8, 4, 8),
    ];
    for (ci, &(n, e, groups, kept, k)) in cases.iter().enumerate() {
        for (ties, nans) in [(false, false), (true, false), (true, true)] {
            let s_host = scores(n, e, 90 + ci as u64, ties, nans);
            // Experts 0 and 1 never win when their bias is far below: idle experts.
            let b_host: Vec<f32> = (0..e)
                .map(|x| {
                    if x < 2 && ci == 0 {
                        -4.0
                    } else {
                        (x % 3) as f32 * 0.125
                    }
                })
                .collect();
            let want: Vec<u32> = s_host
                .chunks(e)
                .flat_map(|row| {
                    let biased: Vec<f32> = row.iter().zip(&b_host).map(|(s, b)| s + b).collect();
                    route_token(&biased, groups, kept, k)
                        .into_iter()
                        .map(|i| i as u32)
                })
                .collect();
            let st = Tensor::from_vec(s_host, (n, e), gpu)?;
            let bt = Tensor::from_vec(b_host, e, gpu)?;
            let chosen_t = moe_route::route(&st, &bt, groups, kept, k)?;
            let got: Vec<u32> = chosen_t.flatten_all()?.to_vec1()?;
            let choice_ok = got == want;
            // The sort and the rest from the host's choice, so a choice mismatch shows alone.
            let (order, position, offsets) = expert_order(&want, e);
            let sorted = moe_route::sort(&Tensor::from_slice(&want, (n, k), gpu)?, e)?;
            let tokens: Vec<u32> = order.iter().map(|&s| s / k as u32).collect();
            let sort_ok = sorted.order.to_vec1::<u32>()? == order
                && sorted.token.to_vec1::<u32>()? == tokens
                && sorted.position.to_vec1::<u32>()? == position
                && sorted.offsets.to_vec1::<u32>()? == offsets;
            let rows_ok = moe_route::token_rows(&sorted.position, k)?.to_vec1::<u32>()?
                == token_rows_plain(&position, k);
            let idle = offsets.windows(2).filter(|w| w[0] == w[1]).count();
            out.push(Outcome {
                name: "moe-route kernels vs host twins",
                ok: choice_ok && sort_ok && rows_ok,
                detail: format!(
                    "{n} tokens, {e} experts in {groups} groups ({kept} kept), top {k}, ties {ties}, NaN {nans}, {idle} idle: choice {}, sort {}, token rows {}",
                    eq(choice_ok), eq(sort_ok), eq(rows_ok)
                ),
            });
        }
    }
    for (dtype, e, groups, kept, k, n) in [
        (DType::F32, 16usize, 8usize, 4usize, 8usize, 600usize),
        (DType::BF16, 16, 8, 4, 8, 600),
        (DType::BF16, 64, 1, 1, 6, 333),
        (DType::F32, 8, 2, 1, 1, 200),
    ] {
        for compute in [ExpertCompute::PerExpert, ExpertCompute::Grouped] {
            let equal =
                layer_routing_kernels_match_host(gpu, dtype, e, groups, kept, k, n, compute)?;
            out.push(Outcome {
                name: "MoE layer with routing kernels vs host routing",
                ok: equal,
                detail: format!(
                    "{e} experts ({groups} groups, {kept} kept, top {k}), {n} tokens, {dtype:?}, {compute:?}: output, dx and every gradient {}",
                    eq(equal)
                ),
            });
        }
    }
    Ok(out)
}

fn eq(b: bool) -> &'static str {
    if b {
        "equal"
    } else {
        "DIFFER"
    }
}

/// One MoE layer (hidden 96, experts 64 wide, a shared expert, a random router and bias)
/// through `forward_saved` and `backward` with the balance term, once with the routing
/// kernels and once with the host's routing: the same bits everywhere.
#[allow(clippy::too_many_arguments)]
fn layer_routing_kernels_match_host(
    gpu: &Device,
    dtype: DType,
    e: usize,
    n_group: usize,
    topk_group: usize,
    k: usize,
    n: usize,
    compute: ExpertCompute,
) -> Result<bool> {
    let (d, i) = (96usize, 64usize);
    let w = |shape: &[usize], seed: u64| -> Result<Tensor> {
        Ok(randn(shape, seed, 0.3, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(gpu)?)
    };
    let mlp = |seed: u64, width: usize| -> Result<Mlp> {
        Ok(Mlp {
            gate: w(&[width, d], seed)?,
            up: w(&[width, d], seed + 1)?,
            down: w(&[d, width], seed + 2)?,
            kernels: KernelPolicy::KERNELS,
        })
    };
    let mut moe = Moe {
        router: randn(&[e, d], 5, 0.2, gpu)?,
        bias: randn(&[e], 6, 0.05, gpu)?,
        experts: (0..e as u64)
            .map(|j| mlp(100 + 3 * j, i))
            .collect::<Result<_>>()?,
        shard: None,
        n_experts: e,
        shared: Some(mlp(7, i)?),
        top_k: k,
        n_group,
        topk_group,
        norm_topk_prob: true,
        routed_scaling_factor: 2.5,
        compute,
        dispatch: crate::model::dispatch::Dispatch::Dtype,
        kernels: KernelPolicy::KERNELS,
    };
    let x = w(&[n, d], 8)?;
    let dy = w(&[n, d], 9)?;
    let mut results = vec![];
    for policy in [
        KernelPolicy::KERNELS,
        KernelPolicy::KERNELS.without(Fused::MoeRoute),
    ] {
        moe.kernels = policy;
        let (y, saved) = moe.forward_saved(&x, None, true)?;
        let (chosen, _) = saved.routing();
        let f: Vec<f32> = moe.balance_weights(chosen, 1, n);
        let f_rows = Tensor::from_vec(f, (1, e), gpu)?
            .broadcast_as((n, e))?
            .contiguous()?;
        let mut grads = GradMap::default();
        let dx = moe.backward(&x, &saved, &dy, Some((&f_rows, 1, n, 1e-3)), &mut grads)?;
        let mut all = vec![y.expect("asked for"), dx];
        let params: Vec<&Tensor> = moe
            .experts
            .iter()
            .chain(moe.shared.as_ref())
            .flat_map(|m| [&m.gate, &m.up, &m.down])
            .chain([&moe.router])
            .collect();
        for p in params {
            all.push(match grads.sums.get(&p.id()) {
                Some(g) => g.clone(),
                None => Tensor::zeros(1, DType::F32, gpu)?.neg()?, // "no gradient" marker
            });
        }
        let bits: Vec<Vec<u32>> = all
            .iter()
            .map(|t| {
                Ok(t.to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|v| v.to_bits())
                    .collect())
            })
            .collect::<candle_core::Result<_>>()?;
        results.push(bits);
    }
    Ok(results[0] == results[1])
}
