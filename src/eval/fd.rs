//! Shapes-FD (design/TOY.md): the Fréchet distance between Gaussian fits of 2×2-average-pooled
//! images (8×8×3 = 192 features, pixel values in [0, 1]).
//!
//! The matrix square root needs a symmetric eigendecomposition; a cyclic Jacobi in f64 is small,
//! exact enough at 192×192 and keeps the crate free of a linear-algebra dependency.

use crate::data::shapes::{CANVAS, IMAGE_LEN};
use crate::eval::image::to_u8;
use rayon::prelude::*;

/// Features per image: 3 channels × 8 × 8 pooled cells, channel-major.
pub const FEATURE_DIM: usize = 3 * (CANVAS / 2) * (CANVAS / 2);

pub type Features = [f64; FEATURE_DIM];

/// Features of an 8-bit RGB HWC 16×16 image.
pub fn features_u8(image_u8_hwc: &[u8]) -> Features {
    assert_eq!(
        image_u8_hwc.len(),
        IMAGE_LEN,
        "features: 16×16 RGB expected"
    );
    let half = CANVAS / 2;
    let mut f = [0f64; FEATURE_DIM];
    for y in 0..CANVAS {
        for x in 0..CANVAS {
            for c in 0..3 {
                let v = image_u8_hwc[(y * CANVAS + x) * 3 + c] as f64 / 255.0;
                f[c * half * half + (y / 2) * half + x / 2] += v / 4.0;
            }
        }
    }
    f
}

/// Features of a [−1, 1] f32 [3, 16, 16] image, quantised to 8 bits first so that in-memory and
/// PNG samples give the same numbers.
pub fn features(image_chw: &[f32]) -> Features {
    features_u8(&to_u8(image_chw))
}

/// Mean and unbiased covariance (row-major d×d) of a set of feature vectors (zero covariance for
/// a single vector).
pub fn gaussian_fit(xs: &[Features]) -> (Vec<f64>, Vec<f64>) {
    let d = FEATURE_DIM;
    let n = xs.len();
    let mut mu = vec![0f64; d];
    for x in xs {
        for (m, v) in mu.iter_mut().zip(x) {
            *m += v;
        }
    }
    mu.iter_mut().for_each(|m| *m /= n.max(1) as f64);
    let denom = n.saturating_sub(1).max(1) as f64;
    let mut cov = vec![0f64; d * d];
    cov.par_chunks_mut(d).enumerate().for_each(|(i, row)| {
        for x in xs {
            let a = x[i] - mu[i];
            if a != 0.0 {
                for (r, (v, m)) in row.iter_mut().zip(x.iter().zip(&mu)) {
                    *r += a * (v - m);
                }
            }
        }
        row.iter_mut().for_each(|r| *r /= denom);
    });
    (mu, cov)
}

/// ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}) between Gaussian fits of the two sets. NaN if either
/// set is empty. Symmetric in its arguments up to rounding.
pub fn fd(real: &[Features], fake: &[Features]) -> f64 {
    if real.is_empty() || fake.is_empty() {
        return f64::NAN;
    }
    let (m1, s1) = gaussian_fit(real);
    let (m2, s2) = gaussian_fit(fake);
    frechet_distance(&m1, &s1, &m2, &s2)
}

/// The Fréchet distance between N(m1, s1) and N(m2, s2) (covariances row-major, n×n). Clamped
/// at 0 because rounding can leave a tiny negative value for identical inputs.
pub fn frechet_distance(m1: &[f64], s1: &[f64], m2: &[f64], s2: &[f64]) -> f64 {
    let n = m1.len();
    let mean_term: f64 = m1.iter().zip(m2).map(|(a, b)| (a - b).powi(2)).sum();
    let trace = |s: &[f64]| (0..n).map(|i| s[i * n + i]).sum::<f64>();
    let v = mean_term + trace(s1) + trace(s2) - 2.0 * trace_sqrt_product(s1, s2, n);
    v.max(0.0)
}

/// Tr (Σ1 Σ2)^{1/2} for symmetric PSD Σ1, Σ2, computed as Tr (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}: the
/// inner matrix is symmetric PSD, so both roots come from symmetric eigendecompositions, with
/// rounding's tiny negative eigenvalues clamped to 0.
pub fn trace_sqrt_product(s1: &[f64], s2: &[f64], n: usize) -> f64 {
    let (w, v) = sym_eigen(s1, n);
    // Σ1^{1/2} = V diag(√w) Vᵀ.
    let mut vs = v.clone();
    for row in vs.chunks_mut(n) {
        for (x, &l) in row.iter_mut().zip(&w) {
            *x *= l.max(0.0).sqrt();
        }
    }
    let root = matmul_bt(&vs, &v, n);
    let inner = matmul(&matmul(&root, s2, n), &root, n);
    let mut sym = inner.clone();
    for i in 0..n {
        for j in 0..n {
            sym[i * n + j] = 0.5 * (inner[i * n + j] + inner[j * n + i]);
        }
    }
    let (w2, _) = sym_eigen(&sym, n);
    w2.iter().map(|&l| l.max(0.0).sqrt()).sum()
}

/// a · b for row-major n×n matrices.
fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut c = vec![0f64; n * n];
    c.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for k in 0..n {
            let aik = a[i * n + k];
            if aik != 0.0 {
                for (r, &bv) in row.iter_mut().zip(&b[k * n..k * n + n]) {
                    *r += aik * bv;
                }
            }
        }
    });
    c
}

/// a · bᵀ for row-major n×n matrices.
fn matmul_bt(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut c = vec![0f64; n * n];
    c.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        let ai = &a[i * n..i * n + n];
        for (j, r) in row.iter_mut().enumerate() {
            *r = ai
                .iter()
                .zip(&b[j * n..j * n + n])
                .map(|(x, y)| x * y)
                .sum();
        }
    });
    c
}

/// Eigendecomposition of a symmetric n×n matrix (row-major) by cyclic Jacobi rotations:
/// returns (eigenvalues, V) with the eigenvectors in V's columns, so A = V diag(w) Vᵀ.
pub fn sym_eigen(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(a.len(), n * n, "sym_eigen: {n}×{n} matrix expected");
    let mut a = a.to_vec();
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let total: f64 = a.iter().map(|x| x * x).sum();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|p| ((p + 1)..n).map(move |q| (p, q)))
            .map(|(p, q)| a[p * n + q].powi(2))
            .sum();
        // Converged when the off-diagonal mass is negligible against the whole matrix.
        if off <= 1e-30 * total || off == 0.0 {
            break;
        }
        for p in 0..n {
            for q in (p + 1)..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let (app, aqq) = (a[p * n + p], a[q * n + q]);
                let theta = (aqq - app) / (2.0 * apq);
                // The smaller root of t² + 2θt − 1 = 0: rotation angle ≤ π/4, which converges.
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let w = (0..n).map(|i| a[i * n + i]).collect();
    (w, v)
}
