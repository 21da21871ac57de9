//! Per-head RMSNorm with a learned weight: SD3.5's QK normalisation (`ln_q`, `ln_k`, eps 1e-6),
//! applied over the last dimension (the head dim) of any tensor.

use crate::tensor::Tensor;
use rayon::prelude::*;

/// `y = x·rsqrt(mean(x²)+eps)·w` over the last dim; returns y and the per-row rsqrt.
pub fn rms_norm_fwd(x: &Tensor, weight: &Tensor, eps: f32) -> (Tensor, Vec<f32>) {
    let d = x.dim(-1);
    assert_eq!(weight.shape(), [d], "rms_norm: weight must be [{d}]");
    let (xs, w) = (x.f32s(), weight.f32s());
    let rows = xs.len().checked_div(d).unwrap_or(0);
    let mut y = vec![0f32; xs.len()];
    let mut rstd = vec![0f32; rows];
    if d > 0 {
        y.par_chunks_mut(d)
            .zip(rstd.par_iter_mut())
            .enumerate()
            .for_each(|(r, (y, rs))| {
                let row = &xs[r * d..(r + 1) * d];
                let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
                *rs = (1.0 / (ms + eps as f64).sqrt()) as f32;
                for j in 0..d {
                    y[j] = row[j] * *rs * w[j];
                }
            });
    }
    (Tensor::from_vec(y, x.shape()), rstd)
}

/// Gradients of [`rms_norm_fwd`]: (dx, dweight).
pub fn rms_norm_bwd(x: &Tensor, weight: &Tensor, rstd: &[f32], dy: &Tensor) -> (Tensor, Tensor) {
    let d = x.dim(-1);
    let (xs, w, g) = (x.f32s(), weight.f32s(), dy.f32s());
    let mut dx = vec![0f32; xs.len()];
    // dweight partial sums per parallel chunk of rows, then reduced in a fixed order.
    const ROWS_PER_TASK: usize = 256;
    let partials: Vec<Vec<f64>> = if d == 0 {
        Vec::new()
    } else {
        dx.par_chunks_mut(d * ROWS_PER_TASK)
            .enumerate()
            .map(|(c, dx)| {
                let mut dw = vec![0f64; d];
                for (i, dx) in dx.chunks_mut(d).enumerate() {
                    let r = c * ROWS_PER_TASK + i;
                    let rs = rstd[r];
                    let (row, gr) = (&xs[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
                    let mut dot = 0f64;
                    for j in 0..d {
                        let xhat = row[j] * rs;
                        dw[j] += (gr[j] * xhat) as f64;
                        dot += (gr[j] * w[j] * xhat) as f64;
                    }
                    let m = (dot / d as f64) as f32;
                    for j in 0..d {
                        dx[j] = rs * (gr[j] * w[j] - row[j] * rs * m);
                    }
                }
                dw
            })
            .collect()
    };
    let mut dw = vec![0f64; d];
    for p in partials {
        for (a, v) in dw.iter_mut().zip(p) {
            *a += v;
        }
    }
    (
        Tensor::from_vec(dx, x.shape()),
        Tensor::from_vec(dw.into_iter().map(|v| v as f32).collect(), &[d]),
    )
}
