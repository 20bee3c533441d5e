//! Does a layout fit the GPUs it will run on, and which layouts do: `dsa-train check --gpus N
//! --gpu-mem GiB [--search]`.
//!
//! Verdict: `plan`'s estimate of one device's memory (weights, optimizer state and gradient
//! sums, activations) against the GPU's memory less a reserve for what the estimate leaves out
//! (the CUDA context, NCCL's buffers, the allocator's slack and fragmentation: `--reserve`,
//! 4 GiB by default), naming the largest consumer; host memory for offloaded activations is
//! reported beside it (per device, so a node needs GPUs-per-node times it).
//!
//! Search: every layout of N ranks that `train` accepts (dp x cp = N; ep dividing N and the
//! routed-expert count; ZeRO 1, 2 or 3; in the sparse stage with recomputation also
//! cp dividing N (and seq_len / 2), `train.block_rows` in 0, 4096, 2048, 1024, 512 and
//! `train.offload_activations` off or on;
//! in the warm-up block_rows too, `model.frozen_fp8` off or on, its weights on the device or
//! in host memory (`model.frozen_fp8_offload`), and ZeRO 3),
//! the ones that fit ordered by an estimated step time, the sum of
//!   compute:          FLOPs per step / (N x peak x MFU)   (the same for every layout of N ranks)
//!   gradient sums:    bytes each device sends for them / link bandwidth
//!   expert exchange:  bytes each device sends in them / link bandwidth
//!   context exchange: bytes each device sends in the context group's gathers and gradient
//!                     sums / link bandwidth
//!   weight gathers:   bytes each device sends in ZeRO-3's layer gathers / link bandwidth
//!   offload:          (2 x offloaded activations (out and back) + micro-batches x frozen
//!                     weights in host memory (in)) per device / host link bandwidth
//! with no overlap assumed (an upper bound); the rates are arguments and are printed with the
//! result. Ties go to fewer, larger blocks (fewer launches), no offload and dense weights (no
//! dequantisation per layer).

use anyhow::Result;

use super::plan::{plan_for, Plan};
use crate::config::ModelConfig;
use crate::recipe::{Recipe, Stage};

const GIB: f64 = (1u64 << 30) as f64;

/// The GPUs a job runs on.
#[derive(Debug, Clone, Copy)]
pub struct Machine {
    pub gpus: usize,
    /// Memory of one GPU (GiB).
    pub gpu_mem_gib: f64,
    /// Memory of one GPU kept out of the estimate's reach (GiB).
    pub reserve_gib: f64,
}

/// The rates the step-time estimate assumes.
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    /// Dense bf16 peak of one GPU (TFLOP/s).
    pub peak_tflops: f64,
    /// Share of the peak the step reaches.
    pub mfu: f64,
    /// Bytes per second one GPU sends to the others (GB/s).
    pub link_gbytes: f64,
    /// Bytes per second between one GPU and host memory (GB/s).
    pub host_gbytes: f64,
}

impl Default for Rates {
    /// H100/H200 SXM: 989 TFLOP/s bf16 dense; 40 % MFU; one 400 Gb/s NIC per GPU (50 GB/s);
    /// PCIe 5 x16 at about 25 GB/s each way.
    fn default() -> Self {
        Self {
            peak_tflops: 989.0,
            mfu: 0.4,
            link_gbytes: 50.0,
            host_gbytes: 25.0,
        }
    }
}

impl Machine {
    fn usable_gib(&self) -> f64 {
        (self.gpu_mem_gib - self.reserve_gib).max(0.0)
    }

    /// Whether `plan` fits one GPU, and the verdict in one sentence.
    pub fn verdict(&self, plan: &Plan) -> (bool, String) {
        let need = plan.peak_bytes() / GIB;
        let parts = [
            ("weights", plan.weight_bytes),
            ("optimizer state and gradient sums", plan.optimizer_bytes),
            ("activations", plan.activation_bytes),
        ];
        let (name, most) = if plan.load_bytes.max(plan.resume_bytes) > plan.memory_bytes() {
            // Loading, or resuming, needs more than a step: that is what does not fit.
            if plan.resume_bytes > plan.load_bytes {
                (
                    "resuming (the checkpoint's values and moments of the trained tensors)",
                    plan.resume_bytes,
                )
            } else {
                (
                    "loading (the held tensors beside the owned optimizer state)",
                    plan.load_bytes,
                )
            }
        } else {
            parts
                .iter()
                .fold(("", 0.0), |a, &(n, b)| if b > a.1 { (n, b) } else { a })
        };
        let usable = self.usable_gib();
        let of = format!(
            "{usable:.1} GiB usable ({:.1} GiB less a {:.1} GiB reserve)",
            self.gpu_mem_gib, self.reserve_gib
        );
        let step = plan.memory_bytes() / GIB;
        let largest = if most > plan.memory_bytes() {
            format!(
                "largest consumer: {name}, {:.1} GiB (a training step alone needs {step:.1} GiB{})",
                most / GIB,
                if step <= usable { ", which fits" } else { "" }
            )
        } else {
            format!("largest consumer: {name}, {:.1} GiB", most / GIB)
        };
        let what = match (plan.host_bytes > 0.0, plan.frozen_host_bytes > 0.0) {
            (true, true) => "offloaded activations and frozen weights",
            (true, false) => "offloaded activations",
            (false, true) => "frozen weights",
            (false, false) => "",
        };
        let host = if what.is_empty() {
            String::new()
        } else {
            format!(
                "; host memory {:.1} GiB per GPU for {what}",
                (plan.host_bytes + plan.frozen_host_bytes) / GIB
            )
        };
        if need <= usable {
            (
                true,
                format!(
                    "verdict: fits: {need:.1} GiB per GPU of {of}, {:.1} GiB to spare; {largest}{host}",
                    usable - need
                ),
            )
        } else {
            (
                false,
                format!(
                    "verdict: does not fit: {need:.1} GiB per GPU, {:.1} GiB over the {of}; {largest}{host}",
                    need - usable
                ),
            )
        }
    }
}

/// The estimated seconds of one step, by part.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepTime {
    pub compute: f64,
    pub grad_sums: f64,
    pub expert_exchange: f64,
    pub context_exchange: f64,
    pub weight_gathers: f64,
    pub offload: f64,
}

impl StepTime {
    pub fn of(plan: &Plan, gpus: usize, r: &Rates) -> Self {
        Self {
            compute: (plan.flops_per_step + plan.recompute_flops)
                / (gpus.max(1) as f64 * r.peak_tflops * 1e12 * r.mfu),
            grad_sums: plan.grad_comm_bytes / (r.link_gbytes * 1e9),
            expert_exchange: plan.expert_comm_bytes / (r.link_gbytes * 1e9),
            context_exchange: plan.context_comm_bytes / (r.link_gbytes * 1e9),
            weight_gathers: plan.gather_comm_bytes / (r.link_gbytes * 1e9),
            // Activations out and back; frozen weights in, once per micro-batch.
            offload: (2.0 * plan.host_bytes
                + plan.micro_batches_per_device * plan.frozen_host_bytes)
                / (r.host_gbytes * 1e9),
        }
    }

    pub fn total(&self) -> f64 {
        self.compute
            + self.grad_sums
            + self.expert_exchange
            + self.context_exchange
            + self.weight_gathers
            + self.offload
    }
}

/// One layout the search considered.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The recipe overrides that select it (`--set` form).
    pub sets: Vec<String>,
    pub plan: Plan,
    pub time: StepTime,
    /// Whether it fits the machine (a step, the load and a resume).
    pub fits: bool,
    /// Whether its training step alone fits.
    pub step_fits: bool,
}

/// The layouts of `machine.gpus` ranks that `train` accepts (`validate`: the trainer's own
/// checks of a layout): those that fit, fastest first, then those that do not, smallest
/// first.
pub fn search(
    recipe: &Recipe,
    cfg: &ModelConfig,
    machine: &Machine,
    rates: &Rates,
    validate: &dyn Fn(&Recipe, usize) -> Result<()>,
) -> Vec<Candidate> {
    let n = machine.gpus.max(1);
    let experts = cfg.n_routed_experts.max(1);
    // The dense and sparse stages recompute their layers or keep their activations.
    let recomputes: &[bool] = if recipe.stage() == Stage::Warmup {
        &[recipe.train.recompute]
    } else {
        &[true, false]
    };
    let blockable = recipe.stage() == Stage::Sparse;
    let blocks: &[usize] = if blockable || recipe.stage() == Stage::Warmup {
        &[0, 4096, 2048, 1024, 512]
    } else {
        &[recipe.train.block_rows]
    };
    let offloads: &[bool] = if blockable {
        &[false, true]
    } else {
        &[recipe.train.offload_activations]
    };
    // The warm-up may hold its frozen weights in FP8 (`model.frozen_fp8`).
    // (model.frozen_fp8, model.frozen_fp8_offload)
    let fp8s: &[(bool, bool)] = if recipe.stage() == Stage::Warmup {
        &[(false, false), (true, false), (true, true)]
    } else {
        &[(recipe.model.frozen_fp8, recipe.model.frozen_fp8_offload)]
    };
    let mut found = vec![];
    // One rank has no ZeRO to choose; blocks as long as the sequence are the whole sequence.
    // (ZeRO-3 needs the recomputing backward, or in the warm-up FP8 weights: validation
    // refuses it elsewhere.)
    let zeros: &[usize] = if n == 1 { &[1] } else { &[1, 2, 3] };
    let blocks: Vec<usize> = blocks
        .iter()
        .copied()
        .filter(|&b| b == 0 || b < recipe.data.seq_len)
        .collect();
    // Context parallelism splits the sequences evenly (validation refuses it with the
    // autograd twin, and sequences it cannot split).
    let cps: Vec<usize> = (1..=n)
        .filter(|cp| n.is_multiple_of(*cp) && recipe.data.seq_len.is_multiple_of(2 * cp))
        .collect();
    let layouts = cps.iter().flat_map(|&cp| {
        (1..=n)
            .filter(move |ep| n.is_multiple_of(*ep) && experts.is_multiple_of(*ep))
            .map(move |ep| (cp, ep))
    });
    let choices = layouts.flat_map(|(cp, ep)| {
        zeros.iter().flat_map(move |&zero| {
            recomputes
                .iter()
                .map(move |&recompute| (cp, ep, zero, recompute))
        })
    });
    for (cp, ep, zero, recompute) in choices {
        for &block_rows in &blocks {
            for &offload in offloads {
                for &(fp8, fp8_offload) in fp8s {
                    let mut r = recipe.clone();
                    r.train.recompute = recompute;
                    r.parallel.dp = n / cp;
                    r.parallel.cp = cp;
                    r.parallel.ep = ep;
                    r.parallel.zero = zero;
                    r.train.block_rows = block_rows;
                    r.train.offload_activations = offload;
                    r.model.frozen_fp8 = fp8;
                    r.model.frozen_fp8_offload = fp8_offload;
                    // The recipe's own checks (blocks, offloading and ZeRO-3 of trained layers
                    // work on the recomputing backward), then the trainer's of the layout.
                    if r.validate().is_err() || validate(&r, n).is_err() {
                        continue;
                    }
                    let plan = plan_for(&r, cfg);
                    let fits = machine.verdict(&plan).0;
                    let step_fits = plan.memory_bytes() / GIB <= machine.usable_gib();
                    let time = StepTime::of(&plan, n, rates);
                    let mut sets = vec![
                        format!("parallel.dp={}", n / cp),
                        format!("parallel.cp={cp}"),
                        format!("parallel.ep={ep}"),
                        format!("parallel.zero={zero}"),
                        format!("train.block_rows={block_rows}"),
                        format!("train.offload_activations={offload}"),
                        format!("train.recompute={recompute}"),
                    ];
                    if fp8 {
                        sets.push("model.frozen_fp8=true".into());
                    }
                    if fp8_offload {
                        sets.push("model.frozen_fp8_offload=true".into());
                    }
                    found.push((
                        block_rows,
                        (offload, fp8 as u8 + fp8_offload as u8),
                        Candidate {
                            sets,
                            plan,
                            time,
                            fits,
                            step_fits,
                        },
                    ));
                }
            }
        }
    }
    // Fitting ones fastest first (then whole sequences or larger blocks, then no offload);
    // then those whose step alone fits, fastest first; the rest by memory.
    found.sort_by(|a, b| {
        let key = |c: &(usize, (bool, u8), Candidate)| {
            (
                (!c.2.fits, !c.2.step_fits),
                if c.2.step_fits {
                    c.2.time.total()
                } else {
                    c.2.plan.peak_bytes()
                },
                if c.0 == 0 { 0 } else { usize::MAX - c.0 },
                c.1,
            )
        };
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0)
            .then(ka.1.total_cmp(&kb.1))
            .then(ka.2.cmp(&kb.2))
            .then(ka.3.cmp(&kb.3))
    });
    found.into_iter().map(|(_, _, c)| c).collect()
}

/// The search's report: the assumptions, then up to `limit` fitting layouts, one line each;
/// when none fits, the one needing the least memory and its verdict.
pub fn search_report(
    found: &[Candidate],
    machine: &Machine,
    rates: &Rates,
    limit: usize,
) -> String {
    let mut out = format!(
        "search over {} GPU(s) of {:.1} GiB (reserve {:.1} GiB); step time assumes {:.0} TFLOP/s at {:.0} % MFU, {:.0} GB/s per GPU between GPUs, {:.0} GB/s to the host, no overlap\n",
        machine.gpus, machine.gpu_mem_gib, machine.reserve_gib, rates.peak_tflops, rates.mfu * 100.0,
        rates.link_gbytes, rates.host_gbytes
    );
    let line = |c: &Candidate| {
        let t = &c.time;
        let step = if c.plan.peak_bytes() > c.plan.memory_bytes() {
            format!(" (a step {:.1})", c.plan.memory_bytes() / GIB)
        } else {
            String::new()
        };
        format!(
            "{:.1} GiB per GPU{step}, step about {:.0} s (compute {:.0}, gradient sums {:.0}, expert exchange {:.0}, context exchange {:.0}, weight gathers {:.0}, offload {:.0}): --set {}\n",
            c.plan.peak_bytes() / GIB,
            t.total(),
            t.compute,
            t.grad_sums,
            t.expert_exchange,
            t.context_exchange,
            t.weight_gathers,
            t.offload,
            c.sets.join(" --set ")
        )
    };
    let fitting: Vec<&Candidate> = found.iter().filter(|c| c.fits).collect();
    match (fitting.is_empty(), found.first()) {
        (_, None) => out.push_str(&format!(
            "no layout of {} GPU(s) passes the trainer's checks (the global batch's micro-batches must be a multiple of dp = the GPU count / cp)",
            machine.gpus
        )),
        (true, Some(first)) if first.step_fits => {
            // Steps that fit, held back by the load or a resume.
            let stepping: Vec<&Candidate> = found.iter().filter(|c| c.step_fits).collect();
            let least = stepping
                .iter()
                .map(|c| c.plan.peak_bytes())
                .fold(f64::INFINITY, f64::min);
            out.push_str(&format!(
                "no layout of {} GPU(s) fits: loading or resuming needs at least {:.1} GiB per GPU (docs/scaling.md); the training step alone fits in {} layouts, fastest first:\n",
                machine.gpus,
                least / GIB,
                stepping.len()
            ));
            for c in stepping.iter().take(limit) {
                out.push_str(&line(c));
            }
            out.push_str(&machine.verdict(&first.plan).1);
        }
        (true, Some(least)) => {
            out.push_str(&format!(
                "no layout of {} GPU(s) fits; the one needing the least memory: ",
                machine.gpus
            ));
            out.push_str(&line(least));
            out.push_str(&machine.verdict(&least.plan).1);
        }
        (false, _) => {
            for c in fitting.iter().take(limit) {
                out.push_str(&line(c));
            }
            if fitting.len() > limit {
                out.push_str(&format!("({} more layouts fit)\n", fitting.len() - limit));
            }
        }
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(weights: f64, optimizer: f64, activations: f64, host: f64) -> Plan {
        Plan {
            trainable_params: 0,
            frozen_params: 0,
            tokens_per_step: 0,
            flops_per_step: 1e18,
            recompute_flops: 0.0,
            weight_bytes: weights * GIB,
            optimizer_bytes: optimizer * GIB,
            activation_bytes: activations * GIB,
            host_bytes: host * GIB,
            frozen_host_bytes: 0.0,
            micro_batches_per_device: 1.0,
            grad_comm_bytes: 100e9,
            expert_comm_bytes: 500e9,
            context_comm_bytes: 50e9,
            gather_comm_bytes: 0.0,
            load_bytes: weights * GIB,
            resume_bytes: weights * GIB,
        }
    }

    /// Where only loading or resuming keeps layouts off the machine, the report says so and
    /// lists the layouts whose step fits, with the memory the load needs beside the step's.
    #[test]
    fn a_report_where_only_the_load_does_not_fit_lists_the_steps_that_do() {
        let m = Machine {
            gpus: 8,
            gpu_mem_gib: 80.0,
            reserve_gib: 4.0,
        };
        let rates = Rates::default();
        let candidate = |step_gib: f64, resume_gib: f64, name: &str| {
            let mut p = plan(step_gib, 0.0, 0.0, 0.0);
            p.load_bytes = 0.5 * resume_gib * GIB;
            p.resume_bytes = resume_gib * GIB;
            Candidate {
                sets: vec![name.into()],
                time: StepTime::of(&p, m.gpus, &rates),
                fits: m.verdict(&p).0,
                step_fits: p.memory_bytes() / GIB <= m.usable_gib(),
                plan: p,
            }
        };
        let found = vec![
            candidate(40.0, 200.0, "a=1"),
            candidate(50.0, 150.0, "b=2"),
            candidate(90.0, 300.0, "c=3"),
        ];
        assert!(found.iter().all(|c| !c.fits));
        let report = search_report(&found, &m, &rates, 5);
        assert!(
            report.contains("loading or resuming needs at least 150.0 GiB per GPU"),
            "{report}"
        );
        assert!(
            report.contains("the training step alone fits in 2 layouts"),
            "{report}"
        );
        assert!(
            report.contains("200.0 GiB per GPU (a step 40.0)"),
            "{report}"
        );
        assert!(
            report.contains("--set a=1") && report.contains("--set b=2"),
            "{report}"
        );
        assert!(!report.contains("c=3"), "{report}");
    }

    #[test]
    fn the_verdict_names_the_margin_and_the_largest_consumer() {
        let m = Machine {
            gpus: 8,
            gpu_mem_gib: 80.0,
            reserve_gib: 4.0,
        };
        let (fits, text) = m.verdict(&plan(50.0, 10.0, 12.0, 0.0));
        assert!(fits, "{text}");
        assert!(
            text.contains("72.0 GiB per GPU of 76.0 GiB usable"),
            "{text}"
        );
        assert!(text.contains("4.0 GiB to spare"), "{text}");
        assert!(
            text.contains("largest consumer: weights, 50.0 GiB"),
            "{text}"
        );
        let (fits, text) = m.verdict(&plan(50.0, 10.0, 300.0, 20.0));
        assert!(!fits, "{text}");
        assert!(text.contains("284.0 GiB over"), "{text}");
        assert!(
            text.contains("largest consumer: activations, 300.0 GiB"),
            "{text}"
        );
        assert!(text.contains("host memory 20.0 GiB"), "{text}");
        // A load that needs more than the step is what the verdict names.
        let mut p = plan(5.0, 10.0, 12.0, 0.0);
        p.load_bytes = 90.0 * GIB;
        p.resume_bytes = 90.0 * GIB;
        let (fits, text) = m.verdict(&p);
        assert!(!fits, "{text}");
        assert!(text.contains("90.0 GiB per GPU, 14.0 GiB over"), "{text}");
        assert!(text.contains("largest consumer: loading"), "{text}");
        p.resume_bytes = 100.0 * GIB;
        let (fits, text) = m.verdict(&p);
        assert!(!fits, "{text}");
        assert!(text.contains("largest consumer: resuming"), "{text}");
        assert!(
            text.contains("a training step alone needs 27.0 GiB, which fits"),
            "{text}"
        );
        // The reserve counts: 76.5 GiB fits 80 with no reserve, not with 4.
        let p = plan(70.0, 6.0, 0.5, 0.0);
        assert!(!m.verdict(&p).0);
        assert!(
            Machine {
                reserve_gib: 0.0,
                ..m
            }
            .verdict(&p)
            .0
        );
    }

    #[test]
    fn step_time_adds_compute_and_traffic_at_the_stated_rates() {
        let r = Rates::default();
        let t = StepTime::of(&plan(1.0, 1.0, 1.0, 10.0), 10, &r);
        assert!((t.compute - 1e18 / (10.0 * 989e12 * 0.4)).abs() < 1e-9);
        assert!((t.grad_sums - 2.0).abs() < 1e-12);
        assert!((t.expert_exchange - 10.0).abs() < 1e-12);
        assert!((t.context_exchange - 1.0).abs() < 1e-12);
        assert!((t.offload - 2.0 * 10.0 * GIB / 25e9).abs() < 1e-9);
        assert_eq!(t.weight_gathers, 0.0);
        assert!((t.total() - (t.compute + 2.0 + 10.0 + 1.0 + t.offload)).abs() < 1e-12);
    }

    #[test]
    fn the_search_lists_the_accepted_layouts_that_fit_fastest_first() {
        let json = crate::tiny::tiny_config(true);
        let cfg =
            crate::config::ModelConfig::from_json(&json.to_string(), &Default::default()).unwrap();
        let mut recipe = Recipe::default();
        (recipe.run.output_dir, recipe.model.path) = ("out".into(), "model".into());
        recipe.data.path = "tokens.bin".into();
        recipe.train.stage = Stage::Sparse;
        recipe.train.recompute = true;
        recipe.train.global_batch_seqs = 8;
        recipe.train.micro_batch_seqs = 1;
        recipe.data.seq_len = 4096;
        let rates = Rates::default();
        let roomy = Machine {
            gpus: 4,
            gpu_mem_gib: 1e6,
            reserve_gib: 4.0,
        };
        // The trainer refuses ep 4 here (a stand-in for any of its checks).
        let validate = |r: &Recipe, world: usize| -> Result<()> {
            anyhow::ensure!(r.parallel.ep != 4 && world == 4, "refused");
            Ok(())
        };
        let found = search(&recipe, &cfg, &roomy, &rates, &validate);
        // cp in {1, 2, 4} and ep in {1, 2} (dividing the 4 ranks and the expert count; 4 is
        // refused), ZeRO 1, 2 and 3, four block sizes (4096 rows are the whole 4096-token
        // sequence: listed once, as 0), offload off and on, recomputing the layers; and
        // keeping their activations with ZeRO 1 or 2, whole sequences, no offload.
        assert_eq!(found.len(), 3 * 2 * 3 * 4 * 2 + 3 * 2 * 2);
        assert!(found
            .iter()
            .any(|c| c.sets.contains(&"parallel.zero=3".to_string())));
        assert!(found
            .iter()
            .any(|c| c.sets.contains(&"parallel.cp=4".to_string())));
        assert!(found.iter().all(|c| c.fits));
        assert!(found
            .iter()
            .all(|c| !c.sets.contains(&"parallel.ep=4".to_string())));
        assert!(found
            .windows(2)
            .all(|w| w[0].time.total() <= w[1].time.total()));
        // Offload costs host traffic, the recomputation its forward FLOPs: a layout keeping
        // the activations comes first, and the same layout recomputing takes longer by the
        // recomputation's FLOPs at the stated rate.
        assert!(found[0]
            .sets
            .contains(&"train.offload_activations=false".to_string()));
        assert!(found[0].sets.contains(&"train.recompute=false".to_string()));
        let twin: Vec<String> = found[0]
            .sets
            .iter()
            .map(|s| s.replace("train.recompute=false", "train.recompute=true"))
            .collect();
        let recomputing = found.iter().find(|c| c.sets == twin).unwrap();
        assert!(recomputing.plan.recompute_flops > 0.0 && found[0].plan.recompute_flops == 0.0);
        let extra = recomputing.plan.recompute_flops / (4.0 * rates.peak_tflops * 1e12 * rates.mfu);
        assert!(
            (recomputing.time.compute - found[0].time.compute - extra).abs() < 1e-9 * extra,
            "{:?} vs {:?}",
            recomputing.time,
            found[0].time
        );
        let report = search_report(&found, &roomy, &rates, 3);
        assert_eq!(report.lines().count(), 1 + 3 + 1, "{report}");
        assert!(report.contains("(153 more layouts fit)"), "{report}");
        // Nothing fits a GPU smaller than the reserve: the smallest layout and its verdict.
        let tight = Machine {
            gpu_mem_gib: 1.0,
            ..roomy
        };
        let found = search(&recipe, &cfg, &tight, &rates, &validate);
        assert!(found.iter().all(|c| !c.fits));
        assert!(found
            .windows(2)
            .all(|w| w[0].plan.peak_bytes() <= w[1].plan.peak_bytes()));
        let report = search_report(&found, &tight, &rates, 3);
        assert!(report.contains("no layout of 4 GPU(s) fits"), "{report}");
        assert!(report.contains("verdict: does not fit"), "{report}");
    }
}
