//! Linear layers (`x·Wᵀ + b` with checkpoint-layout weights `[out, in]`) and batched matmul.

use crate::autograd::{record, Var};
use crate::kernels::gemm::{sgemm, sgemm_new, MatRef};
use crate::tensor::Tensor;

/// `x·Wᵀ + b`: `x [..., in]`, `weight [out, in]`, `bias [out]` → `[..., out]`.
pub fn linear(x: &Var, weight: &Var, bias: Option<&Var>) -> Var {
    let (xv, wv) = (x.value().clone(), weight.value().clone());
    let &[n_out, n_in] = wv.shape() else {
        panic!("linear: weight must be [out, in], got {:?}", wv.shape())
    };
    assert_eq!(
        xv.dim(-1),
        n_in,
        "linear: input {:?} for weight {:?}",
        xv.shape(),
        wv.shape()
    );
    let m = xv.numel() / n_in;
    let mut y = sgemm_new(
        m,
        n_out,
        n_in,
        1.0,
        MatRef::rows(xv.f32s(), n_in),
        MatRef::rows_t(wv.f32s(), n_in),
        true,
    );
    if let Some(b) = bias {
        assert_eq!(
            b.shape(),
            [n_out],
            "linear: bias {:?} for {n_out} outputs",
            b.shape()
        );
        let bv = b.value().f32s();
        for row in y.chunks_mut(n_out) {
            for (o, b) in row.iter_mut().zip(bv) {
                *o += b;
            }
        }
    }
    let mut out_shape = xv.shape().to_vec();
    *out_shape.last_mut().expect("rank ≥ 1") = n_out;
    let mut inputs = vec![x, weight];
    inputs.extend(bias);
    let has_bias = bias.is_some();
    record(
        "linear",
        &inputs,
        Tensor::from_vec(y, &out_shape),
        move |g, need| {
            let gy = g.f32s();
            let dx = need[0].then(|| {
                let dx = sgemm_new(
                    m,
                    n_in,
                    n_out,
                    1.0,
                    MatRef::rows(gy, n_out),
                    MatRef::rows(wv.f32s(), n_in),
                    true,
                );
                Tensor::from_vec(dx, xv.shape())
            });
            let dw = need[1].then(|| {
                let dw = sgemm_new(
                    n_out,
                    n_in,
                    m,
                    1.0,
                    MatRef::rows_t(gy, n_out),
                    MatRef::rows(xv.f32s(), n_in),
                    true,
                );
                Tensor::from_vec(dw, &[n_out, n_in])
            });
            let mut grads = vec![dx, dw];
            if has_bias {
                grads.push(need[2].then(|| {
                    let mut db = vec![0f64; n_out];
                    for row in gy.chunks(n_out) {
                        for (acc, v) in db.iter_mut().zip(row) {
                            *acc += *v as f64;
                        }
                    }
                    Tensor::from_vec(db.into_iter().map(|v| v as f32).collect(), &[n_out])
                }));
            }
            grads
        },
    )
}

/// Batched matrix product `a [..., M, K] · b [..., K, N] → [..., M, N]` (equal batch dims).
pub fn matmul(a: &Var, b: &Var) -> Var {
    let (av, bv) = (a.value().clone(), b.value().clone());
    let (sa, sb) = (av.shape().to_vec(), bv.shape().to_vec());
    assert!(
        sa.len() >= 2 && sa.len() == sb.len() && sa[..sa.len() - 2] == sb[..sb.len() - 2],
        "matmul: shapes {sa:?} and {sb:?}"
    );
    let r = sa.len();
    let (m, kk, n) = (sa[r - 2], sa[r - 1], sb[r - 1]);
    assert_eq!(sb[r - 2], kk, "matmul: inner dims of {sa:?} and {sb:?}");
    let batch: usize = sa[..r - 2].iter().product();
    let mut out_shape = sa.clone();
    out_shape[r - 1] = n;
    let (ad, bd) = (av.f32s(), bv.f32s());
    let y = batched_gemm(batch, m, n, kk, ad, false, bd, false);
    record(
        "matmul",
        &[a, b],
        Tensor::from_vec(y, &out_shape),
        move |g, need| {
            let (ad, bd, gd) = (av.f32s(), bv.f32s(), g.f32s());
            // da = g · bᵀ, db = aᵀ · g
            let da = need[0]
                .then(|| Tensor::from_vec(batched_gemm(batch, m, kk, n, gd, false, bd, true), &sa));
            let db = need[1]
                .then(|| Tensor::from_vec(batched_gemm(batch, kk, n, m, ad, true, gd, false), &sb));
            vec![da, db]
        },
    )
}

/// `batch` products of row-major matrices stored back to back: `op(a_i) · op(b_i)` where `op`
/// transposes when asked; `a` holds m×k (or k×m when transposed) matrices, `b` k×n (or n×k).
#[allow(clippy::too_many_arguments)]
fn batched_gemm(
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    ta: bool,
    b: &[f32],
    tb: bool,
) -> Vec<f32> {
    let mut c = vec![0f32; batch * m * n];
    for i in 0..batch {
        let ai = &a[i * m * k..(i + 1) * m * k];
        let bi = &b[i * k * n..(i + 1) * k * n];
        let am = if ta {
            MatRef::rows_t(ai, m)
        } else {
            MatRef::rows(ai, k)
        };
        let bm = if tb {
            MatRef::rows_t(bi, k)
        } else {
            MatRef::rows(bi, n)
        };
        sgemm(
            m,
            n,
            k,
            1.0,
            am,
            bm,
            &mut c[i * m * n..(i + 1) * m * n],
            n,
            false,
            true,
        );
    }
    c
}

/// Rows of `table [V, E]` for `ids` (shaped `shape`): `[..shape, E]`. The backward adds each
/// row's gradient into its table row.
pub fn embedding(table: &Var, ids: &[u32], shape: &[usize]) -> Var {
    let tv = table.value().clone();
    let &[v, e] = tv.shape() else {
        panic!("embedding: table must be [V, E], got {:?}", tv.shape())
    };
    assert_eq!(
        ids.len(),
        shape.iter().product::<usize>(),
        "embedding: ids for shape {shape:?}"
    );
    let src = tv.f32s();
    let mut out = Vec::with_capacity(ids.len() * e);
    for &i in ids {
        let i = i as usize;
        assert!(i < v, "embedding: id {i} outside a table of {v}");
        out.extend_from_slice(&src[i * e..(i + 1) * e]);
    }
    let mut out_shape = shape.to_vec();
    out_shape.push(e);
    let ids = ids.to_vec();
    record(
        "embedding",
        &[table],
        Tensor::from_vec(out, &out_shape),
        move |g, _| {
            let mut d = vec![0f32; v * e];
            for (r, &i) in ids.iter().enumerate() {
                let row = &g.f32s()[r * e..(r + 1) * e];
                for (acc, x) in d[i as usize * e..(i as usize + 1) * e].iter_mut().zip(row) {
                    *acc += x;
                }
            }
            vec![Some(Tensor::from_vec(d, &[v, e]))]
        },
    )
}
