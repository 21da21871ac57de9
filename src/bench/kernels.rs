//! `bench kernels` on the CPU: the CPU twins of the kernel families in `src/kernels` (and the
//! optimiser step the trainer runs), each as GB/s beside a parallel memcpy measured in the same
//! run; joint attention, which is compute-bound, as TFLOP/s beside the GEMM ceiling.
//!
//! Bytes are what a kernel must move at least, as `benches/kernels.rs` counts them for the GPU:
//! every input read once, every output written once (all f32 here, bf16 where a cast makes it).
//! Outputs are allocated per call, as the engine calls these kernels.

use super::flops::joint_attention_flops;
use super::measure::{
    gbps, gemm_ceiling_tflops, memcpy_ceiling, tflops, time_runs, Timing, GEMM_CEILING_SIZE, WARMUP,
};
use super::report::{Cell, Column, Report, Table};
use super::{common_parameters, KernelsArgs};
use crate::error::{Error, Result};
use crate::kernels::adaln::{adaln_modulate_bwd, adaln_modulate_fwd, gated_residual_fwd};
use crate::kernels::attention::{joint_attention_bwd, joint_attention_fwd};
use crate::kernels::elementwise::{activation_bwd, activation_fwd, Activation};
use crate::kernels::optim::{adamw_step, grad_norm, AdamWStep};
use crate::kernels::qknorm::{rms_norm_bwd, rms_norm_fwd};
use crate::kernels::sde::{dmd_gradient_batch, flow_noise, rho_step_batch, NextState};
use crate::nn::ParamMap;
use crate::optim::{AdamW, AdamWConfig};
use crate::tensor::{DType, Rng, Tensor};
use std::hint::black_box;

/// The smallest `--size`: every case still has a few rows at its production width.
pub const MIN_SIZE: usize = 1 << 14;
/// adaLN width: SD3.5-medium's hidden size.
const ADALN_WIDTH: usize = 1536;
/// QK-norm width: the head size.
const HEAD_DIM: usize = 64;
/// Elements per sample of the SDE kernels: a 512 px SD3 latent (16 × 64 × 64).
const SDE_SAMPLE: usize = 16 * 64 * 64;
/// Joint attention at SD3.5-medium's heads, 512 px (1024 image + 333 text tokens) by default.
const ATTN_HEADS: usize = 24;
const ATTN_MAX_IMAGE_TOKENS: usize = 1024;
const ATTN_MAX_TEXT_TOKENS: usize = 333;

/// One measured case.
struct Row {
    kernel: &'static str,
    shape: String,
    /// Bytes moved (memory-bound cases) or FLOPs (compute-bound ones).
    work: Work,
    timing: Timing,
}

enum Work {
    Bytes(u64),
    Flops(f64),
}

struct Cases {
    iters: usize,
    rows: Vec<Row>,
}

impl Cases {
    fn time(&mut self, kernel: &'static str, shape: String, work: Work, f: impl FnMut()) {
        let timing = time_runs(WARMUP, self.iters, f);
        self.rows.push(Row {
            kernel,
            shape,
            work,
            timing,
        });
    }

    fn bytes(&mut self, kernel: &'static str, shape: String, f32s: usize, f: impl FnMut()) {
        self.time(kernel, shape, Work::Bytes(4 * f32s as u64), f);
    }
}

pub fn run(a: &KernelsArgs) -> Result<Report> {
    if let Some((dev, kind)) = super::kernel_device(a.common.device, "kernels")? {
        return run_device(a, &dev, kind);
    }
    let n = a.size;
    if n < MIN_SIZE {
        return Err(Error::Invalid(format!(
            "bench kernels: --size must be at least {MIN_SIZE} elements"
        )));
    }
    let iters = a.common.iters;
    let (copy_bytes, copy_timing) = memcpy_ceiling(n, iters);
    let copy_gbps = gbps(copy_bytes as f64, copy_timing.median_ms());
    let gemm_tflops = gemm_ceiling_tflops(GEMM_CEILING_SIZE, iters);

    let mut cases = Cases {
        iters,
        rows: Vec::new(),
    };
    let mut rng = Rng::new(0x6b65);
    adaln_cases(&mut cases, n, &mut rng);
    qknorm_cases(&mut cases, n, &mut rng);
    elementwise_cases(&mut cases, n, &mut rng);
    sde_cases(&mut cases, n, &mut rng);
    optimiser_cases(&mut cases, n, &mut rng);
    attention_cases(&mut cases, n, &mut rng);

    let mut params = vec![("size", n.into())];
    params.extend(common_parameters(&a.common));
    let mut r = Report::new("kernels", params);
    r.figure(
        "memcpy_gbps",
        "measured memcpy ceiling",
        Cell::num(copy_gbps, 2),
        "GB/s",
    );
    r.figure(
        "gemm_ceiling_tflops",
        "measured GEMM ceiling",
        Cell::num(gemm_tflops, 4),
        "TFLOP/s",
    );
    r.tables.push(table(&cases.rows, copy_gbps, gemm_tflops));
    r.note(format!(
        "ceilings measured in this run: a rayon-parallel copy of {n} f32 (bytes read + written), and a {g}x{g}x{g} f32 GEMM through the engine's sgemm",
        g = GEMM_CEILING_SIZE
    ));
    r.note("bytes: every input read once, every output written once; attention FLOPs: FlashAttention's count (backward 2.5× forward)");
    r.note("buffers that fit in the CPU's caches can beat the memcpy ceiling: use the default --size for memory-bound figures");
    Ok(r)
}

/// `--device cuda|emu`: the CUDA kernels' GB/s at the production shapes (`kernels_device`,
/// shared with `cargo bench --bench kernels`), each against the device copy measured first.
fn run_device(
    a: &KernelsArgs,
    dev: &crate::device::kernel::KernelDevice,
    kind: &'static str,
) -> Result<Report> {
    let rows = super::kernels_device::measure(dev)?;
    let copy = rows.first().map_or(f64::NAN, |r| r.gbps());
    let mut params = vec![];
    params.extend(common_parameters(&a.common));
    let mut r = Report::new("kernels", params);
    r.kernel_device = Some((kind, dev.name()));
    r.figure(
        "copy_gbps",
        "measured device copy ceiling",
        Cell::num(copy, 1),
        "GB/s",
    );
    let col = |key, header| Column { key, header };
    r.tables.push(Table {
        name: "kernels",
        columns: vec![
            col("kernel", "kernel"),
            col("shape", "shape"),
            col("ms", "ms"),
            col("bytes", "bytes"),
            col("gbps", "GB/s"),
            col("ceiling_ratio", "of copy"),
        ],
        rows: rows
            .iter()
            .map(|k| {
                vec![
                    Cell::Text(k.kernel.clone()),
                    Cell::Text(k.shape.clone()),
                    Cell::num(k.ms, 4),
                    Cell::Count(k.bytes as u64),
                    Cell::num(k.gbps(), 1),
                    Cell::num(k.gbps() / copy, 3),
                ]
            })
            .collect(),
    });
    r.note("device time of a CUDA graph of launches over buffer sets larger than L2; bytes: every input read once, every output written once; the copy row is the ceiling");
    if kind == "emu" {
        r.note("emu: tiny sizes on the SIMT emulator, a functional check, not a speed figure");
    }
    Ok(r)
}

fn adaln_cases(c: &mut Cases, n: usize, rng: &mut Rng) {
    let (d, rows) = (ADALN_WIDTH, n / ADALN_WIDTH);
    let x = Tensor::randn(&[1, rows, d], rng);
    let y = Tensor::randn(&[1, rows, d], rng);
    let shift = Tensor::randn(&[1, d], rng);
    let scale = Tensor::randn(&[1, d], rng);
    let shape = format!("[1, {rows}, {d}]");
    let m = rows * d;
    // x, shift, scale in; y and the per-token mean and rstd out.
    c.bytes(
        "adaln_modulate_fwd",
        shape.clone(),
        2 * m + 2 * d + 2 * rows,
        || {
            black_box(adaln_modulate_fwd(&x, &shift, &scale, 1e-6));
        },
    );
    let (_, stats) = adaln_modulate_fwd(&x, &shift, &scale, 1e-6);
    // x, dy, scale, stats in; dx, dshift, dscale out.
    c.bytes(
        "adaln_modulate_bwd",
        shape.clone(),
        3 * m + 3 * d + 2 * rows,
        || {
            black_box(adaln_modulate_bwd(&x, &scale, &stats, &y));
        },
    );
    c.bytes("gated_residual_fwd", shape, 3 * m + d, || {
        black_box(gated_residual_fwd(&x, &shift, &y));
    });
}

fn qknorm_cases(c: &mut Cases, n: usize, rng: &mut Rng) {
    let rows = n / HEAD_DIM;
    let x = Tensor::randn(&[rows, HEAD_DIM], rng);
    let dy = Tensor::randn(&[rows, HEAD_DIM], rng);
    let w = Tensor::randn(&[HEAD_DIM], rng);
    let shape = format!("[{rows}, {HEAD_DIM}]");
    let m = rows * HEAD_DIM;
    c.bytes(
        "rms_norm_fwd (QK norm)",
        shape.clone(),
        2 * m + HEAD_DIM + rows,
        || {
            black_box(rms_norm_fwd(&x, &w, 1e-6));
        },
    );
    let (_, rstd) = rms_norm_fwd(&x, &w, 1e-6);
    c.bytes(
        "rms_norm_bwd (QK norm)",
        shape,
        3 * m + 2 * HEAD_DIM + rows,
        || {
            black_box(rms_norm_bwd(&x, &w, &rstd, &dy));
        },
    );
}

fn elementwise_cases(c: &mut Cases, n: usize, rng: &mut Rng) {
    let x = Tensor::randn(&[n], rng);
    let dy = Tensor::randn(&[n], rng);
    let shape = format!("[{n}]");
    c.bytes("gelu_tanh_fwd", shape.clone(), 2 * n, || {
        black_box(activation_fwd(&x, Activation::GeluTanh));
    });
    c.bytes("gelu_tanh_bwd", shape.clone(), 3 * n, || {
        black_box(activation_bwd(&x, &dy, Activation::GeluTanh));
    });
    c.bytes("silu_fwd", shape.clone(), 2 * n, || {
        black_box(activation_fwd(&x, Activation::Silu));
    });
    // A bf16 element is half an f32: 4 + 2 bytes per element either way.
    let half_n = n.div_ceil(2);
    c.bytes("cast f32 -> bf16", shape.clone(), n + half_n, || {
        black_box(x.to_dtype(DType::BF16));
    });
    let xb = x.to_dtype(DType::BF16);
    c.bytes("cast bf16 -> f32", shape, n + half_n, || {
        black_box(xb.to_dtype(DType::F32));
    });
}

fn sde_cases(c: &mut Cases, n: usize, rng: &mut Rng) {
    let d = SDE_SAMPLE.min(n);
    let b = n / d;
    let m = b * d;
    let vecs: Vec<Vec<f32>> = (0..3).map(|_| Tensor::randn(&[m], rng).to_vec()).collect();
    let sigma: Vec<f32> = (0..b).map(|i| 0.2 + 0.6 * i as f32 / b as f32).collect();
    let sigma_next: Vec<f32> = sigma.iter().map(|s| s - 0.1).collect();
    let shape = format!("[{b}, {d}]");
    // x, v, z in; next, x̂0, μ, ∂ℓ/∂v out (plus per-sample σ, σ', log-prob).
    c.bytes("rho_step (SDE)", shape.clone(), 7 * m + 4 * b, || {
        black_box(rho_step_batch(
            &vecs[0],
            &vecs[1],
            NextState::Sample(&vecs[2]),
            &sigma,
            &sigma_next,
            0.98,
        ));
    });
    c.bytes("dmd_gradient", shape.clone(), 4 * m, || {
        black_box(dmd_gradient_batch(&vecs[0], &vecs[1], &vecs[2], d, 1.0));
    });
    c.bytes("flow_noise", shape, 4 * m + b, || {
        black_box(flow_noise(&vecs[0], &vecs[1], &sigma));
    });
}

fn optimiser_cases(c: &mut Cases, n: usize, rng: &mut Rng) {
    let shape = format!("[{n}]");
    let g = Tensor::randn(&[n], rng).to_vec();
    let mut w = Tensor::randn(&[n], rng).to_vec();
    let (mut m, mut v, mut ema) = (vec![0f32; n], vec![0f32; n], w.clone());
    let mut h = AdamWStep {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 0,
    };
    // w, m, v, g in; w, m, v out; the EMA shadow in and out.
    c.bytes("adamw_step + EMA (fused)", shape.clone(), 9 * n, || {
        h.step += 1;
        adamw_step(
            &mut w,
            &mut m,
            &mut v,
            &g,
            1.0,
            n,
            &h,
            Some((&mut ema, 0.99)),
        );
    });
    black_box((&w, &ema));
    c.bytes("grad_norm", shape.clone(), n, || {
        black_box(grad_norm(&g));
    });
    // The optimiser the trainer runs today (optim::AdamW over a ParamMap), same minimum bytes
    // as the fused step without EMA.
    let mut params = ParamMap::new();
    let p = params.insert("w", Tensor::from_vec(w.clone(), &[n]));
    p.set_grad(Tensor::from_vec(g.clone(), &[n]));
    let mut opt = AdamW::new(AdamWConfig::default());
    c.bytes("optim::AdamW::step", shape, 7 * n, || {
        opt.step(&[&params], 1e-4);
    });
}

fn attention_cases(c: &mut Cases, n: usize, rng: &mut Rng) {
    let lb = (n / (ATTN_HEADS * HEAD_DIM)).clamp(16, ATTN_MAX_IMAGE_TOKENS);
    let la = (lb / 3).min(ATTN_MAX_TEXT_TOKENS);
    let mut operand = |l: usize| Tensor::randn(&[1, l, ATTN_HEADS, HEAD_DIM], rng);
    let (qa, ka, va) = (operand(la), operand(la), operand(la));
    let (qb, kb, vb) = (operand(lb), operand(lb), operand(lb));
    let (doa, dob) = (operand(la), operand(lb));
    let shape = format!("B1 H{ATTN_HEADS} d{HEAD_DIM} text {la} + image {lb}");
    let flops = |bwd| Work::Flops(joint_attention_flops(1, ATTN_HEADS, la + lb, HEAD_DIM, bwd));
    c.time("joint_attention_fwd", shape.clone(), flops(false), || {
        black_box(joint_attention_fwd(&qa, &ka, &va, &qb, &kb, &vb));
    });
    let out = joint_attention_fwd(&qa, &ka, &va, &qb, &kb, &vb);
    c.time("joint_attention_bwd", shape, flops(true), || {
        black_box(joint_attention_bwd(
            &qa, &ka, &va, &qb, &kb, &vb, &out.lse, &doa, &dob,
        ));
    });
}

fn table(rows: &[Row], copy_gbps: f64, gemm_tflops: f64) -> Table {
    let col = |key, header| Column { key, header };
    Table {
        name: "kernels",
        columns: vec![
            col("kernel", "kernel"),
            col("shape", "shape"),
            col("ms", "ms"),
            col("bytes", "bytes"),
            col("gbps", "GB/s"),
            col("flops", "FLOPs"),
            col("tflops", "TFLOP/s"),
            col("ceiling", "ceiling"),
            col("ceiling_ratio", "of ceiling"),
        ],
        rows: rows
            .iter()
            .map(|r| {
                let ms = r.timing.median_ms();
                let (bytes, gb, flops, tf, ceiling, ratio) = match r.work {
                    Work::Bytes(b) => {
                        let g = gbps(b as f64, ms);
                        (
                            Cell::Count(b),
                            Cell::num(g, 2),
                            Cell::NotAvailable,
                            Cell::NotAvailable,
                            "memcpy",
                            g / copy_gbps,
                        )
                    }
                    Work::Flops(f) => {
                        let t = tflops(f, ms);
                        (
                            Cell::NotAvailable,
                            Cell::NotAvailable,
                            Cell::Count(f as u64),
                            Cell::num(t, 4),
                            "GEMM",
                            t / gemm_tflops,
                        )
                    }
                };
                vec![
                    Cell::Text(r.kernel.into()),
                    Cell::Text(r.shape.clone()),
                    Cell::num(ms, 3),
                    bytes,
                    gb,
                    flops,
                    tf,
                    Cell::Text(ceiling.into()),
                    Cell::num(ratio, 3),
                ]
            })
            .collect(),
    }
}
