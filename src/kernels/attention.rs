//! Joint attention of the MMDiT (MMDIT.md §A.3): the CPU forward and backward kernels and their
//! f64 references.
//!
//! Two token streams, `a` (text, may be empty) and `b` (image), attend over the concatenation
//! `[a; b]` of their tokens: `O = softmax(Q·Kᵀ/√d)·V`, no mask, no causality. The concatenation is
//! never built. Every operand is `[B, L, H, d]`, the layout the qkv linear produces. For a given
//! (batch, head) pair, the rows of one stream form a strided matrix (row stride `H·d`), and the
//! GEMMs read them in place. A query tile's scores against the two streams go into the two
//! column ranges of one buffer.
//!
//! The work splits into (batch, head) tasks on rayon. Each task walks its query rows in tiles of
//! [`QUERY_TILE`] rows, one stream at a time, so a task holds at most `QUERY_TILE·(La+Lb)` scores:
//! SD3's 4096+333 tokens never need an L² buffer. The backward follows FlashAttention: `P` is
//! recomputed from the saved row log-sum-exp, and dK and dV accumulate over the query tiles; but
//! the softmax backward's row term is `Σ_k P_k·dP_k` in f64 rather than `dO·O` (see the comment
//! at dS), so the output itself is not needed.
//! Each task runs its GEMMs serially and in a fixed order, so results are bitwise reproducible.
//! Image-only self-attention (MMDiT-X `attn2`) is the case `La = 0`.

use crate::kernels::gemm::{sgemm, MatRef};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Query rows per tile. 256 rows against SD3's 4429 keys is 4.5 MB of scores per task, and the
/// packing of K and V is spread over enough rows to stay cheap next to the products.
pub const QUERY_TILE: usize = 256;

/// The forward's outputs. `lse` is what the backward needs to rebuild the probabilities.
pub struct JointAttentionOut {
    /// `[B, La, H, d]`.
    pub o_a: Tensor,
    /// `[B, Lb, H, d]`.
    pub o_b: Tensor,
    /// `[B, H, La+Lb]`: log-sum-exp of each query row's scaled scores, rows ordered a then b.
    pub lse: Tensor,
}

/// Sizes shared by all operands of one call.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    la: usize,
    lb: usize,
    heads: usize,
    d: usize,
}

impl Dims {
    fn lt(&self) -> usize {
        self.la + self.lb
    }
    /// Row stride of a `[B, L, H, d]` operand.
    fn ld(&self) -> usize {
        self.heads * self.d
    }
    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }
}

fn check_dims(
    q_a: &Tensor,
    k_a: &Tensor,
    v_a: &Tensor,
    q_b: &Tensor,
    k_b: &Tensor,
    v_b: &Tensor,
) -> Dims {
    for (name, t) in [
        ("q_a", q_a),
        ("k_a", k_a),
        ("v_a", v_a),
        ("q_b", q_b),
        ("k_b", k_b),
        ("v_b", v_b),
    ] {
        assert_eq!(
            t.rank(),
            4,
            "joint attention: {name} must be [B, L, H, d], got {:?}",
            t.shape()
        );
    }
    assert!(
        k_a.shape() == q_a.shape() && v_a.shape() == q_a.shape(),
        "joint attention: stream a needs q, k, v of one shape, got {:?}, {:?}, {:?}",
        q_a.shape(),
        k_a.shape(),
        v_a.shape()
    );
    assert!(
        k_b.shape() == q_b.shape() && v_b.shape() == q_b.shape(),
        "joint attention: stream b needs q, k, v of one shape, got {:?}, {:?}, {:?}",
        q_b.shape(),
        k_b.shape(),
        v_b.shape()
    );
    let (sa, sb) = (q_a.shape(), q_b.shape());
    assert!(
        sa[0] == sb[0] && sa[2] == sb[2] && sa[3] == sb[3],
        "joint attention: streams differ in batch, heads or head dim: a {sa:?} vs b {sb:?} ([B, L, H, d])"
    );
    let dims = Dims {
        batch: sb[0],
        la: sa[1],
        lb: sb[1],
        heads: sb[2],
        d: sb[3],
    };
    assert!(dims.d > 0, "joint attention: head dim is 0 in {sb:?}");
    assert!(
        dims.lt() > 0,
        "joint attention: no tokens to attend to (La = Lb = 0 in {sa:?}, {sb:?})"
    );
    dims
}

/// `data[off..]`, or an empty slice for an empty stream (whose offsets point past its end).
fn tail(data: &[f32], off: usize) -> &[f32] {
    data.get(off..).unwrap_or(&[])
}

/// One stream's operands seen from one (batch, head) pair.
struct StreamView<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    len: usize,
    /// Row of the concatenation `[a; b]` where this stream starts.
    start: usize,
}

impl<'a> StreamView<'a> {
    fn new(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor, len: usize, start: usize) -> Self {
        StreamView {
            q: q.f32s(),
            k: k.f32s(),
            v: v.f32s(),
            len,
            start,
        }
    }
}

/// Offset of row `r` of (batch `b`, head `h`) in a `[B, len, H, d]` operand.
fn row_off(dims: &Dims, len: usize, b: usize, h: usize, r: usize) -> usize {
    ((b * len + r) * dims.heads + h) * dims.d
}

/// Rows `r..` of (b, h) as a matrix of `d` columns.
fn rows<'a>(data: &'a [f32], dims: &Dims, len: usize, b: usize, h: usize, r: usize) -> MatRef<'a> {
    MatRef {
        data: tail(data, row_off(dims, len, b, h, r)),
        rs: dims.ld(),
        cs: 1,
    }
}

/// The transpose of [`rows`]: `d` rows, one column per token.
fn rows_t<'a>(
    data: &'a [f32],
    dims: &Dims,
    len: usize,
    b: usize,
    h: usize,
    r: usize,
) -> MatRef<'a> {
    MatRef {
        data: tail(data, row_off(dims, len, b, h, r)),
        rs: 1,
        cs: dims.ld(),
    }
}

/// Query tiles of both streams in concatenation order: (stream index, first row, rows).
fn tiles(dims: &Dims) -> impl Iterator<Item = (usize, usize, usize)> {
    let lens = [dims.la, dims.lb];
    (0..2).flat_map(move |s| {
        (0..lens[s])
            .step_by(QUERY_TILE)
            .map(move |r0| (s, r0, QUERY_TILE.min(lens[s] - r0)))
    })
}

/// Scores `scale·Q_tile·Kᵀ` of `m` query rows of `qs` (from row `r0`) against both streams'
/// keys, into `s` (`m × (La+Lb)`, row-major).
#[allow(clippy::too_many_arguments)]
fn scores(
    dims: &Dims,
    streams: &[StreamView; 2],
    qs: &StreamView,
    b: usize,
    h: usize,
    r0: usize,
    m: usize,
    s: &mut [f32],
) {
    let (lt, d) = (dims.lt(), dims.d);
    let q = rows(qs.q, dims, qs.len, b, h, r0);
    for ks in streams {
        let k = rows_t(ks.k, dims, ks.len, b, h, 0);
        sgemm(
            m,
            ks.len,
            d,
            dims.scale(),
            q,
            k,
            &mut s[ks.start..],
            lt,
            false,
            false,
        );
    }
}

/// `out = P·V` for a tile: `p` is `m × (La+Lb)`, `out` row-major `m × d`.
fn weighted_values(
    dims: &Dims,
    streams: &[StreamView; 2],
    p: &[f32],
    b: usize,
    h: usize,
    m: usize,
    out: &mut [f32],
) {
    for (i, vs) in streams.iter().enumerate() {
        let pv = MatRef::rows(&p[vs.start..], dims.lt());
        let v = rows(vs.v, dims, vs.len, b, h, 0);
        sgemm(m, dims.d, vs.len, 1.0, pv, v, out, dims.d, i > 0, false);
    }
}

/// Forward: outputs of both streams and the row log-sum-exp for the backward.
pub fn joint_attention_fwd(
    q_a: &Tensor,
    k_a: &Tensor,
    v_a: &Tensor,
    q_b: &Tensor,
    k_b: &Tensor,
    v_b: &Tensor,
) -> JointAttentionOut {
    let dims = check_dims(q_a, k_a, v_a, q_b, k_b, v_b);
    let streams = [
        StreamView::new(q_a, k_a, v_a, dims.la, 0),
        StreamView::new(q_b, k_b, v_b, dims.lb, dims.la),
    ];
    let (lt, d) = (dims.lt(), dims.d);
    let tile_cap = QUERY_TILE.min(dims.la.max(dims.lb));
    // Per task: the outputs of all La+Lb rows (concatenation order, row-major × d) and the lse.
    let per_task: Vec<(Vec<f32>, Vec<f32>)> = (0..dims.batch * dims.heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / dims.heads, bh % dims.heads);
            let mut o = vec![0f32; lt * d];
            let mut lse = vec![0f32; lt];
            let mut sbuf = vec![0f32; tile_cap * lt];
            for (si, r0, m) in tiles(&dims) {
                let qs = &streams[si];
                let g0 = qs.start + r0;
                let s = &mut sbuf[..m * lt];
                scores(&dims, &streams, qs, b, h, r0, m, s);
                for (row, l) in s.chunks_mut(lt).zip(&mut lse[g0..g0 + m]) {
                    let max = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                    let mut sum = 0f64;
                    for x in row.iter_mut() {
                        *x = (*x - max).exp();
                        sum += *x as f64;
                    }
                    let inv = (1.0 / sum) as f32;
                    row.iter_mut().for_each(|x| *x *= inv);
                    *l = max + sum.ln() as f32;
                }
                weighted_values(&dims, &streams, s, b, h, m, &mut o[g0 * d..(g0 + m) * d]);
            }
            (o, lse)
        })
        .collect();
    let outs: Vec<&[f32]> = per_task.iter().map(|(o, _)| o.as_slice()).collect();
    let lse: Vec<f32> = per_task
        .iter()
        .flat_map(|(_, l)| l.iter().copied())
        .collect();
    JointAttentionOut {
        o_a: Tensor::from_vec(scatter(&dims, &outs, 0, dims.la), q_a.shape()),
        o_b: Tensor::from_vec(scatter(&dims, &outs, dims.la, dims.lb), q_b.shape()),
        lse: Tensor::from_vec(lse, &[dims.batch, dims.heads, lt]),
    }
}

/// Builds a `[B, len, H, d]` tensor's data from per-(batch, head) row-major `(La+Lb) × d` blocks,
/// taking rows `start..start+len` of each block.
fn scatter(dims: &Dims, per_task: &[&[f32]], start: usize, len: usize) -> Vec<f32> {
    let (h_n, d) = (dims.heads, dims.d);
    let mut out = vec![0f32; dims.batch * len * h_n * d];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(len * h_n * d)
        .enumerate()
        .for_each(|(b, ob)| {
            for (h, src) in per_task[b * h_n..(b + 1) * h_n].iter().enumerate() {
                for r in 0..len {
                    let dst = (r * h_n + h) * d;
                    ob[dst..dst + d].copy_from_slice(&src[(start + r) * d..(start + r + 1) * d]);
                }
            }
        });
    out
}

/// Backward: gradients of all six inputs, in the order dq_a, dk_a, dv_a, dq_b, dk_b, dv_b.
#[allow(clippy::too_many_arguments)]
pub fn joint_attention_bwd(
    q_a: &Tensor,
    k_a: &Tensor,
    v_a: &Tensor,
    q_b: &Tensor,
    k_b: &Tensor,
    v_b: &Tensor,
    lse: &Tensor,
    do_a: &Tensor,
    do_b: &Tensor,
) -> [Tensor; 6] {
    joint_attention_bwd_masked(q_a, k_a, v_a, q_b, k_b, v_b, lse, do_a, do_b, [true; 6])
        .map(|g| g.expect("every gradient was asked for"))
}

/// [`joint_attention_bwd`] computing only the gradients that `need` asks for (same order), the
/// others `None`. dV needs only P; dQ and dK need dS as well, which costs two more GEMMs per tile.
/// Query tiles whose output gradient is all zero are skipped: they contribute nothing to any
/// gradient, and that is the whole of stream a in the context-pre-only last block.
#[allow(clippy::too_many_arguments)]
pub fn joint_attention_bwd_masked(
    q_a: &Tensor,
    k_a: &Tensor,
    v_a: &Tensor,
    q_b: &Tensor,
    k_b: &Tensor,
    v_b: &Tensor,
    lse: &Tensor,
    do_a: &Tensor,
    do_b: &Tensor,
    need: [bool; 6],
) -> [Option<Tensor>; 6] {
    let dims = check_dims(q_a, k_a, v_a, q_b, k_b, v_b);
    for (name, t, q) in [("do_a", do_a, q_a), ("do_b", do_b, q_b)] {
        assert_eq!(
            t.shape(),
            q.shape(),
            "joint attention backward: {name} {:?} must match its stream's q {:?}",
            t.shape(),
            q.shape()
        );
    }
    let lt = dims.lt();
    assert_eq!(
        lse.shape(),
        [dims.batch, dims.heads, lt],
        "joint attention backward: lse must be [B, H, La+Lb]"
    );
    let streams = [
        StreamView::new(q_a, k_a, v_a, dims.la, 0),
        StreamView::new(q_b, k_b, v_b, dims.lb, dims.la),
    ];
    let douts = [do_a.f32s(), do_b.f32s()];
    let lse = lse.f32s();
    let [need_dq, need_dk, need_dv] = [0, 1, 2].map(|j| [need[j], need[3 + j]]);
    let any = |n: [bool; 2]| n[0] || n[1];
    let d = dims.d;
    let scale = dims.scale();
    let tile_cap = QUERY_TILE.min(dims.la.max(dims.lb));

    let per_task: Vec<[Vec<f32>; 3]> = if !need.iter().any(|&n| n) {
        Vec::new()
    } else {
        (0..dims.batch * dims.heads)
            .into_par_iter()
            .map(|bh| {
                let (b, h) = (bh / dims.heads, bh % dims.heads);
                let buf = |n: [bool; 2]| {
                    if any(n) {
                        vec![0f32; lt * d]
                    } else {
                        Vec::new()
                    }
                };
                let (mut dq, mut dk, mut dv) = (buf(need_dq), buf(need_dk), buf(need_dv));
                let mut p = vec![0f32; tile_cap * lt];
                let mut dp = vec![0f32; tile_cap * lt];
                let lse = &lse[bh * lt..(bh + 1) * lt];
                for (si, r0, m) in tiles(&dims) {
                    let qs = &streams[si];
                    let g0 = qs.start + r0;
                    let do_tile = rows(douts[si], &dims, qs.len, b, h, r0);
                    let do_zero = (0..m).all(|i| {
                        let off = i * do_tile.rs;
                        do_tile.data[off..off + d].iter().all(|&x| x == 0.0)
                    });
                    let need_ds = need_dq[si] || any(need_dk);
                    if do_zero || !(need_ds || any(need_dv)) {
                        continue;
                    }
                    let p = &mut p[..m * lt];
                    scores(&dims, &streams, qs, b, h, r0, m, p);
                    for (row, &l) in p.chunks_mut(lt).zip(&lse[g0..g0 + m]) {
                        row.iter_mut().for_each(|x| *x = (*x - l).exp());
                    }
                    // dV_s += P[:, s]ᵀ · dO
                    for (ks, &want) in streams.iter().zip(&need_dv) {
                        if want {
                            let pt = MatRef {
                                data: &p[ks.start..],
                                rs: 1,
                                cs: lt,
                            };
                            let dst = &mut dv[ks.start * d..(ks.start + ks.len) * d];
                            sgemm(ks.len, d, m, 1.0, pt, do_tile, dst, d, true, false);
                        }
                    }
                    if !need_ds {
                        continue;
                    }
                    // dP = dO·Vᵀ
                    let dp = &mut dp[..m * lt];
                    for vs in &streams {
                        let vt = rows_t(vs.v, &dims, vs.len, b, h, 0);
                        sgemm(
                            m,
                            vs.len,
                            d,
                            1.0,
                            do_tile,
                            vt,
                            &mut dp[vs.start..],
                            lt,
                            false,
                            false,
                        );
                    }
                    // dS = P ∘ (dP − Σ_k P_k·dP_k), the row average taken in f64 over the same P
                    // and normalised by ΣP. Where attention is nearly one-hot, dP_j* and the
                    // average agree to many digits and dS_j* is their small difference; FA's
                    // Drow = dO·O carries O's f32 rounding into that difference (1e-3 relative
                    // gradient error on the fixtures), while this form cancels exactly.
                    for (ds_row, p_row) in dp.chunks_mut(lt).zip(p.chunks(lt)) {
                        let (mut a, mut z) = (0f64, 0f64);
                        for (&x, &pv) in ds_row.iter().zip(p_row) {
                            a += pv as f64 * x as f64;
                            z += pv as f64;
                        }
                        let mean = a / z;
                        for (x, &pv) in ds_row.iter_mut().zip(p_row) {
                            *x = pv * (*x as f64 - mean) as f32;
                        }
                    }
                    let ds: &[f32] = dp;
                    // dQ = scale · dS · K
                    if need_dq[si] {
                        let dst = &mut dq[g0 * d..(g0 + m) * d];
                        for (i, ks) in streams.iter().enumerate() {
                            let dsm = MatRef::rows(&ds[ks.start..], lt);
                            let k = rows(ks.k, &dims, ks.len, b, h, 0);
                            sgemm(m, d, ks.len, scale, dsm, k, dst, d, i > 0, false);
                        }
                    }
                    // dK_s += scale · dS[:, s]ᵀ · Q
                    let q_tile = rows(qs.q, &dims, qs.len, b, h, r0);
                    for (ks, &want) in streams.iter().zip(&need_dk) {
                        if want {
                            let dst_t = MatRef {
                                data: &ds[ks.start..],
                                rs: 1,
                                cs: lt,
                            };
                            let dst = &mut dk[ks.start * d..(ks.start + ks.len) * d];
                            sgemm(ks.len, d, m, scale, dst_t, q_tile, dst, d, true, false);
                        }
                    }
                }
                [dq, dk, dv]
            })
            .collect()
    };
    let grad = |j: usize, si: usize| -> Option<Tensor> {
        if !need[3 * si + j] {
            return None;
        }
        let blocks: Vec<&[f32]> = per_task.iter().map(|t| t[j].as_slice()).collect();
        let (start, len) = (streams[si].start, streams[si].len);
        let shape = if si == 0 { q_a.shape() } else { q_b.shape() };
        Some(Tensor::from_vec(scatter(&dims, &blocks, start, len), shape))
    };
    [
        grad(0, 0),
        grad(1, 0),
        grad(2, 0),
        grad(0, 1),
        grad(1, 1),
        grad(2, 1),
    ]
}

/// One (batch, head) slice of the concatenation `[a; b]` of a pair of `[B, L, H, d]` tensors, in
/// f64, row-major `(La+Lb) × d`.
fn concat_f64(dims: &Dims, a: &Tensor, bt: &Tensor, b: usize, h: usize) -> Vec<f64> {
    let d = dims.d;
    let mut out = Vec::with_capacity(dims.lt() * d);
    for (t, len) in [(a, dims.la), (bt, dims.lb)] {
        let x = t.f32s();
        for r in 0..len {
            let off = row_off(dims, len, b, h, r);
            out.extend(x[off..off + d].iter().map(|&v| v as f64));
        }
    }
    out
}

/// Softmax probabilities (row-major `(La+Lb)²`) and row log-sum-exps of one (batch, head), in f64.
fn probs_f64(dims: &Dims, q: &[f64], k: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (lt, d) = (dims.lt(), dims.d);
    let scale = 1.0 / (d as f64).sqrt();
    let mut p = vec![0f64; lt * lt];
    let mut lse = vec![0f64; lt];
    for i in 0..lt {
        let row = &mut p[i * lt..(i + 1) * lt];
        for (j, s) in row.iter_mut().enumerate() {
            *s = (0..d).map(|c| q[i * d + c] * k[j * d + c]).sum::<f64>() * scale;
        }
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|s| (s - max).exp()).sum();
        lse[i] = max + sum.ln();
        row.iter_mut().for_each(|s| *s = (*s - lse[i]).exp());
    }
    (p, lse)
}

/// Writes row-major `(La+Lb) × d` f64 rows of one (batch, head) into the two `[B, L, H, d]` outputs.
fn split_into(dims: &Dims, src: &[f64], out_a: &mut [f32], out_b: &mut [f32], b: usize, h: usize) {
    let d = dims.d;
    for (out, len, start) in [(out_a, dims.la, 0), (out_b, dims.lb, dims.la)] {
        for r in 0..len {
            let off = row_off(dims, len, b, h, r);
            for c in 0..d {
                out[off + c] = src[(start + r) * d + c] as f32;
            }
        }
    }
}

/// Reference forward: concatenates the streams and computes the full softmax in f64 loops.
pub fn joint_attention_naive(
    q_a: &Tensor,
    k_a: &Tensor,
    v_a: &Tensor,
    q_b: &Tensor,
    k_b: &Tensor,
    v_b: &Tensor,
) -> JointAttentionOut {
    let dims = check_dims(q_a, k_a, v_a, q_b, k_b, v_b);
    let (lt, d) = (dims.lt(), dims.d);
    let mut o_a = vec![0f32; q_a.numel()];
    let mut o_b = vec![0f32; q_b.numel()];
    let mut lse_out = vec![0f32; dims.batch * dims.heads * lt];
    for b in 0..dims.batch {
        for h in 0..dims.heads {
            let q = concat_f64(&dims, q_a, q_b, b, h);
            let k = concat_f64(&dims, k_a, k_b, b, h);
            let v = concat_f64(&dims, v_a, v_b, b, h);
            let (p, lse) = probs_f64(&dims, &q, &k);
            let mut o = vec![0f64; lt * d];
            for i in 0..lt {
                for j in 0..lt {
                    for c in 0..d {
                        o[i * d + c] += p[i * lt + j] * v[j * d + c];
                    }
                }
            }
            split_into(&dims, &o, &mut o_a, &mut o_b, b, h);
            let base = (b * dims.heads + h) * lt;
            for (dst, &l) in lse_out[base..base + lt].iter_mut().zip(&lse) {
                *dst = l as f32;
            }
        }
    }
    JointAttentionOut {
        o_a: Tensor::from_vec(o_a, q_a.shape()),
        o_b: Tensor::from_vec(o_b, q_b.shape()),
        lse: Tensor::from_vec(lse_out, &[dims.batch, dims.heads, lt]),
    }
}

/// Reference backward in f64 from the textbook softmax derivative (`dS = P∘(dP − rowsum(P∘dP))`,
/// with nothing saved from a forward), same order as [`joint_attention_bwd`].
#[allow(clippy::too_many_arguments)]
pub fn joint_attention_bwd_naive(
    q_a: &Tensor,
    k_a: &Tensor,
    v_a: &Tensor,
    q_b: &Tensor,
    k_b: &Tensor,
    v_b: &Tensor,
    do_a: &Tensor,
    do_b: &Tensor,
) -> [Tensor; 6] {
    let dims = check_dims(q_a, k_a, v_a, q_b, k_b, v_b);
    assert!(
        do_a.shape() == q_a.shape() && do_b.shape() == q_b.shape(),
        "joint attention backward: output gradients {:?}, {:?} for streams {:?}, {:?}",
        do_a.shape(),
        do_b.shape(),
        q_a.shape(),
        q_b.shape()
    );
    let (lt, d) = (dims.lt(), dims.d);
    let scale = 1.0 / (d as f64).sqrt();
    let mut grads: [Vec<f32>; 6] =
        std::array::from_fn(|i| vec![0f32; if i < 3 { q_a.numel() } else { q_b.numel() }]);
    for b in 0..dims.batch {
        for h in 0..dims.heads {
            let q = concat_f64(&dims, q_a, q_b, b, h);
            let k = concat_f64(&dims, k_a, k_b, b, h);
            let v = concat_f64(&dims, v_a, v_b, b, h);
            let dout = concat_f64(&dims, do_a, do_b, b, h);
            let (p, _) = probs_f64(&dims, &q, &k);
            let mut dq = vec![0f64; lt * d];
            let mut dk = vec![0f64; lt * d];
            let mut dv = vec![0f64; lt * d];
            for i in 0..lt {
                let dp: Vec<f64> = (0..lt)
                    .map(|j| (0..d).map(|c| dout[i * d + c] * v[j * d + c]).sum())
                    .collect();
                let pdp: f64 = (0..lt).map(|j| p[i * lt + j] * dp[j]).sum();
                for j in 0..lt {
                    let pij = p[i * lt + j];
                    let ds = pij * (dp[j] - pdp) * scale;
                    for c in 0..d {
                        dq[i * d + c] += ds * k[j * d + c];
                        dk[j * d + c] += ds * q[i * d + c];
                        dv[j * d + c] += pij * dout[i * d + c];
                    }
                }
            }
            for (j, g) in [dq, dk, dv].iter().enumerate() {
                let (ga, gb) = grads.split_at_mut(3);
                split_into(&dims, g, &mut ga[j], &mut gb[j], b, h);
            }
        }
    }
    let mut grads = grads.into_iter();
    std::array::from_fn(|i| {
        let shape = if i < 3 { q_a.shape() } else { q_b.shape() };
        Tensor::from_vec(grads.next().expect("six"), shape)
    })
}

/// Launchers for `cuda/attention.cu` on a [`KernelDevice`](crate::device::kernel::KernelDevice)
/// (a GPU, or the CPU SIMT emulator): the same operands as the CPU kernels above, in bf16 device
/// buffers of layout `[B, L, H, d]`, with the row log-sum-exp in f32 `[B, H, La+Lb]`.
///
/// Forward: one launch, grid (query tiles of both streams, B·H). Backward: `Drow = rowsum(dO∘O)`
/// (FlashAttention's row term, from the forward's bf16 output), then one launch over key tiles
/// that writes dK, dV and adds dQ into zeroed f32 buffers with atomics, then the conversion of
/// dQ to bf16. dQ's summation order therefore varies between runs on a GPU; the forward, dK and
/// dV are bitwise reproducible.
///
/// The tensor-core kernels take head dim 64 or 128. Every other head dim (1 ≤ d ≤ 256, e.g. the
/// tiny test models' 16 and 32) runs a simple fallback with the same operands and results
/// (attention.cu's `joint_attn_*_naive`: one thread per query or key row over all rows of the
/// other side, f32 throughout, no atomics, so the backward is bitwise reproducible too); the variant
/// arguments of the `_with` launchers are ignored there. It is meant for small shapes only: its
/// cost is O((La+Lb)²·d) per head with every operand re-read from global memory.
pub mod dev {
    use crate::device::kernel::{
        blocks_for, DevBuf, KernelArgs, KernelDevice, KernelError, KernelResult, LaunchCfg,
    };
    use crate::device::tma::{TileMap4, TmaMap};
    use half::bf16;

    /// Rows per tile: keys (both passes) and queries (backward).
    const TILE: usize = 64;
    /// Keys per backward block (both variants).
    const BWD_KEYS: usize = 128;
    /// The largest head dim the fallback takes (its accumulators: local arrays of D floats).
    const NAIVE_MAX_D: usize = 256;
    /// Rows (one thread each) per block of the fallback kernels.
    const NAIVE_ROWS: usize = 128;

    /// An enum of kernel variants (or cuts) and its `ALL`, every one of them in declaration order
    /// (what tests and the bench iterate), from one list of names.
    macro_rules! variant_enum {
        ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $v:ident),+ $(,)? }) => {
            $(#[$meta])*
            #[derive(Clone, Copy, Debug, PartialEq, Eq)]
            pub enum $name {
                $($(#[$vmeta])* $v),+
            }

            impl $name {
                /// Every one, in declaration order.
                pub const ALL: [$name; [$(stringify!($v)),+].len()] = [$($name::$v),+];
            }
        };
        // Kernel variants: chosen by the environment variable `$env` (see [`check_variant_env`]),
        // skipped by `${env}_SKIP`; those `portable` lists run without wgmma.
        (env: $env:literal, portable: [$($p:ident),+], $($rest:tt)*) => {
            variant_enum! { $($rest)* }
            variant_enum!(@choice $env, [$($p),+], $($rest)*);
        };
        (@choice $env:literal, [$($p:ident),+], $(#[$meta:meta])* $name:ident $body:tt) => {
            impl $name {
                /// The variant the plain launcher (and so the model) uses on `dev`.
                pub fn fastest(dev: &KernelDevice, d: usize) -> $name {
                    Self::choose(d, dev.has_wgmma())
                }

                #[doc = concat!("`", $env, "` when set (see [`check_variant_env`]), else")]
                /// [`Self::measured_best`] on a device that runs wgmma or not
                /// (`ADVDMD_ATTN_NO_HOPPER=1`: not).
                pub fn choose(d: usize, has_wgmma: bool) -> $name {
                    env_variant($env, &Self::ALL)
                        .unwrap_or_else(|| Self::measured_best(d, has_wgmma && !hopper_disabled()))
                }

                /// [`Self::ALL`] less the wgmma variants under `ADVDMD_ATTN_NO_HOPPER=1` (see
                #[doc = concat!("[`hopper_disabled`]) and those `", $env, "_SKIP` names: what")]
                /// tests and the bench iterate.
                pub fn enabled() -> Vec<$name> {
                    without_hopper(&Self::ALL, concat!($env, "_SKIP"), |v| {
                        !matches!(v, $($name::$p)|+)
                    })
                }
            }
        };
    }

    /// Whether head dim `d` runs the tensor-core kernels (else the fallback).
    pub fn has_fast_kernels(d: usize) -> bool {
        d == 64 || d == 128
    }

    /// A variant's name as the kernels, the bench's JSON and the environment variables spell it
    /// ("h3", "k128").
    fn variant_name<V: std::fmt::Debug>(v: V) -> String {
        format!("{v:?}").to_lowercase()
    }

    /// The variant named (case-insensitively, as its `Debug` name: "h3") by environment
    /// variable `var`, among `all`; `None` when unset or not a name (which
    /// [`check_variant_env`] turns into an error up front).
    fn env_variant<V: Copy + std::fmt::Debug>(var: &str, all: &[V]) -> Option<V> {
        let want = std::env::var(var).ok()?;
        all.iter()
            .copied()
            .find(|v| format!("{v:?}").eq_ignore_ascii_case(want.trim()))
    }

    /// `ADVDMD_ATTN_FWD` and `ADVDMD_ATTN_BWD` choose the attention kernels the model path
    /// launches (the plain launchers: [`FwdVariant::fastest`], [`BwdVariant::fastest`]), so that a
    /// GPU session can time the whole model on a new variant without a rebuild. An error names
    /// the accepted values when either is set to anything else (the CLI checks at start).
    pub fn check_variant_env() -> Result<(), String> {
        fn check<V: Copy + std::fmt::Debug>(var: &str, all: &[V]) -> Result<(), String> {
            match std::env::var(var) {
                Ok(v) if env_variant(var, all).is_none() => {
                    let names: Vec<String> = all.iter().map(|&x| variant_name(x)).collect();
                    Err(format!("{var}={v:?} is not one of {}", names.join(", ")))
                }
                _ => Ok(()),
            }
        }
        // the skip list parses, and leaves out no variant the same variable chooses
        fn check_skip<V: Copy + PartialEq + std::fmt::Debug>(
            var: &str,
            all: &[V],
        ) -> Result<(), String> {
            let skip_var = format!("{var}_SKIP");
            let skip = skipped(&skip_var, all)?;
            match env_variant(var, all) {
                Some(v) if skip.contains(&v) => Err(format!("{var}={v:?} is in {skip_var}")),
                _ => Ok(()),
            }
        }
        check("ADVDMD_ATTN_FWD", &FwdVariant::ALL)?;
        check("ADVDMD_ATTN_BWD", &BwdVariant::ALL)?;
        check_skip("ADVDMD_ATTN_FWD", &FwdVariant::ALL)?;
        check_skip("ADVDMD_ATTN_BWD", &BwdVariant::ALL)?;
        ablations_env()?;
        persistent_env().map(|_| ())
    }

    /// The variants environment variable `var` names, comma-separated (`ADVDMD_ATTN_FWD_SKIP`,
    /// `ADVDMD_ATTN_BWD_SKIP`: left out of [`FwdVariant::enabled`] / [`BwdVariant::enabled`],
    /// as `tools/gpu-check.sh` does when only the variants no card has run yet fail); an error
    /// names a word that is not a variant.
    fn skipped<V: Copy + std::fmt::Debug>(var: &str, all: &[V]) -> Result<Vec<V>, String> {
        match std::env::var(var) {
            Ok(list) => parse_variants(var, &list, all),
            Err(_) => Ok(Vec::new()),
        }
    }

    /// The variants of `all` a comma-separated `list` names (case-insensitively; empty words
    /// ignored), or an error naming `var` and the first word that is not one.
    pub fn parse_variants<V: Copy + std::fmt::Debug>(
        var: &str,
        list: &str,
        all: &[V],
    ) -> Result<Vec<V>, String> {
        list.split(',')
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .map(|w| {
                all.iter()
                    .copied()
                    .find(|v| format!("{v:?}").eq_ignore_ascii_case(w))
                    .ok_or_else(|| format!("{var}: {w:?} is not a variant"))
            })
            .collect()
    }

    /// `ADVDMD_ATTN_PERSISTENT`: `1` or unset runs the H3–H16 forward on one block an SM, each
    /// taking the units in turns (`fwd_h3`: the next unit's loads overlap this one's last tiles
    /// and its stores); `0`: a block a unit. The default since it was measured faster at every
    /// shape (docs/perf-log.md, H100, 2026-11-28: H4 at d = 64 1024 px 324.4 against 315.2
    /// TFLOP/s, 512 px 261.0 against 242.5; H3 at d = 128 384.0 against 372.9; the SD3.5-medium
    /// 1024 px forward 27.15 against 27.64 ms).
    pub fn persistent_env() -> Result<bool, String> {
        const VAR: &str = "ADVDMD_ATTN_PERSISTENT";
        match std::env::var_os(VAR) {
            None => Ok(true),
            Some(_) => crate::device::kernel::env_flag(VAR),
        }
    }

    /// `ADVDMD_ATTN_ABLATIONS`: whether tests and the bench run the default forward's cuts
    /// ([`FwdAblation`]); default 1, `0` leaves them out (gpu-check, when a card faults in them).
    pub fn ablations_env() -> Result<bool, String> {
        const VAR: &str = "ADVDMD_ATTN_ABLATIONS";
        match std::env::var_os(VAR) {
            None => Ok(true),
            Some(_) => crate::device::kernel::env_flag(VAR),
        }
    }

    /// `all` less the variants `is_hopper` names when [`hopper_disabled`], and less those the
    /// skip list `skip_var` names (see [`skipped`]; a malformed list skips nothing here, the CLI
    /// refuses it at start).
    fn without_hopper<V: Copy + PartialEq + std::fmt::Debug>(
        all: &[V],
        skip_var: &str,
        is_hopper: impl Fn(V) -> bool,
    ) -> Vec<V> {
        let drop = hopper_disabled();
        let skip = skipped(skip_var, all).unwrap_or_default();
        all.iter()
            .copied()
            .filter(|&v| !(skip.contains(&v) || (drop && is_hopper(v))))
            .collect()
    }

    /// Whether `ADVDMD_ATTN_NO_HOPPER=1` leaves the wgmma variants (attention_hopper.cu) out of
    /// [`FwdVariant::enabled`] and [`BwdVariant::enabled`]. `tools/gpu-check.sh` sets it after
    /// its `hopper` step fails: a wgmma kernel that faults leaves a sticky error in the process's
    /// CUDA context, which would fail every later test and benchmark of that process too.
    pub fn hopper_disabled() -> bool {
        crate::device::kernel::env_flag("ADVDMD_ATTN_NO_HOPPER").unwrap_or(false)
    }

    variant_enum! {
        env: "ADVDMD_ATTN_FWD",
        portable: [V3, V4],
        /// The forward kernels (attention.cu's `fwd_v3`): warps of 32 query rows with a lazy softmax
        /// rescale (O and l rescaled only when a row's max grows past 2^8 of the reference) and a
        /// deep K/V pipeline. `V3`: 8 warps, 256-row query blocks (half the K/V tile loads per FLOP),
        /// 3 stages at d = 64 / 2 at d = 128, one block per SM (237/255 registers). `V4`: 4 warps,
        /// 128-row blocks, 3 stages at d = 64 / 2 at d = 128, two blocks per SM (243/255 registers).
        /// (W16 and W32, measured slower at every shape, were removed: docs/perf-log.md.)
        /// `H1` (attention_hopper.cu, sm_90a): both products on the Hopper warpgroup MMA (wgmma)
        /// from 128-byte-swizzled shared tiles, 2 warpgroups of 64 query rows (128-row blocks),
        /// 128-key tiles at d = 64 and 64-key tiles at d = 128, 2 stages. `H2`: H1 with the P·V
        /// product of one key tile overlapping the softmax of the next (3 stages). `H3`:
        /// FlashAttention-3's structure — a producer warpgroup streams the tiles through 4 stages
        /// guarded by mbarriers, and H2's two consumer warpgroups take turns to issue their products
        /// (ping-pong), with no block barrier (384 threads). `H4` (d = 64; at d = 128 it runs
        /// `H3`): H3 with a quarter of the softmax's exponentials on the FMA pipes (`poly_exp2`,
        /// FlashAttention-4's split): at d = 64 the special-function unit's exponentials take as
        /// long as the tensor cores' products. `H5` (d = 64; at d = 128 it runs `H3`): H3 with
        /// three consumer groups, 192-row blocks of 512 threads as FlashAttention-3 uses at d ≤ 64
        /// (each K/V tile feeds 1.5× the rows); one P register set (P_i packed once
        /// P_{i−1}·V_{i−1} has read it), consumers at 160 registers and a producer of rolled copies
        /// at 32. `H6`: H5 with H4's polynomial exponentials. `H7`: H3's two consumer groups fed
        /// by a producer that never waits for its copies (each thread's
        /// `cp.async.mbarrier.arrive.noinc` marks a stage full once they land), so fewer stages keep
        /// the ring full: 128-key tiles in 3 stages at d = 64 and in 2 at d = 128 (H3: 64-key tiles in
        /// 4 there); the producer's rolled copies in 40 registers, the consumers at 232 (room for two
        /// P register sets at d = 128 too). `H8` (d = 64;
        /// at d = 128 it runs `H7`): H7 with H4's polynomial exponentials. `H9` (d = 64; at d = 128
        /// `H7`): H8 with 192-key tiles, FlashAttention-3's tile at this head dim (one P register
        /// set; a 1024-token stream ends in a third of a tile, so more keys are masked). `H10` (d = 64;
        /// at d = 128 `H3`): H4 with the softmax's row sums on the tensor cores — P·1 by a
        /// `wgmma m64n8k16` against 256 bytes of ones, issued with P·V and rescaled with O — instead
        /// of 64 serial adds a thread a tile (a seventh of the softmax's instructions; the sums are
        /// of the bf16 P that O sums). `H11` (H4 at d = 64, H3 at d = 128, each with it): the
        /// speculative softmax — P's exponentials taken against the reference maximum as it stands
        /// while the row maxima reduce beside them, and taken again in the rare tile whose maximum
        /// moved the reference (`softmax_to_p_spec`); the same P bit for bit, without the
        /// maximum's chain (FMNMX, shuffles, vote) ahead of the exponentials. `H12` (the same
        /// bases): H11 with no maximum on a tile's common path — a thread's partial row sums bound
        /// each of its P, so the lazy rescale's test (no P past 2^8) is made on them, and a rescale
        /// alone reduces the maximum it moves to (P then against other references than H4's: the
        /// same softmax, other roundings). `H13` (H4 at d = 64, H3 at d = 128, each with it): the
        /// producer's copies by TMA — one thread issues a bulk tensor copy per 64-column box of a
        /// tile (`tma_load_4d`, tensor maps from [`fwd_maps`]) where 128 threads issued cp.async
        /// and arrived; the tiles land swizzled as before, rows past a stream zero; the producer
        /// keeps 24 registers, the consumers 240. V's token stride is in its map: no `_vfused` twin.
        /// `H14` (the same bases): H11's speculative softmax fed by H13's TMA producer. `H15` (d = 128;
        /// at d = 64 `H13`): H13 on 128-key tiles in 2 stages, two P register sets in the consumers'
        /// 240 registers (S's products read a third less shared memory per FLOP than on 64-key
        /// tiles; H7, which tried the tile with cp.async, measured 273 against H3's 373 TFLOP/s).
        /// `H16` (H4 at d = 64, H3 at d = 128, each without): no turns — each consumer group issues
        /// its products as soon as its softmax is done, instead of after the other group's (the
        /// ping-pong's named barriers, fwd_h3's `ABL` bit 4); the same output bit for bit.
        FwdVariant {
            V3, V4, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, H16,
        }
    }

    impl FwdVariant {
        /// The fastest measured at head dim `d` (docs/perf-log.md, H100, 2026-11-28, 1024 px,
        /// every variant in one run: with wgmma, H4 at 315.2 TFLOP/s at d = 64 (H3 307.9) and
        /// H3 at 372.9 at d = 128 (H4–H6 resolve within 1.5% of it; H3 runs persistent at
        /// 384.0); without, V4 at d = 64 and V3 at d = 128, H200, 2026-11-27).
        pub fn measured_best(d: usize, wgmma: bool) -> FwdVariant {
            match (wgmma, d) {
                (true, 64) => FwdVariant::H4,
                (true, _) => FwdVariant::H3,
                (false, 64) => FwdVariant::V4,
                (false, _) => FwdVariant::V3,
            }
        }

        /// The variant actually launched at head dim `d`.
        pub fn resolve(self, d: usize) -> FwdVariant {
            match self {
                FwdVariant::H4 | FwdVariant::H5 | FwdVariant::H6 | FwdVariant::H10 if d != 64 => {
                    FwdVariant::H3
                }
                FwdVariant::H8 | FwdVariant::H9 if d != 64 => FwdVariant::H7,
                FwdVariant::H15 if d != 128 => FwdVariant::H13,
                v => v,
            }
        }
        /// `joint_attn_fwd_<variant>_d<d>`: the kernels are named after the variants.
        fn kernel(self, d: usize) -> String {
            format!("joint_attn_fwd_{}_d{d}", variant_name(self.resolve(d)))
        }
        /// Whether the producer copies by TMA (the kernel takes [`fwd_maps`] last).
        fn copies_by_tma(self) -> bool {
            matches!(self, FwdVariant::H13 | FwdVariant::H14 | FwdVariant::H15)
        }
        /// Threads per block: the `fwd_h3` family's a producer warpgroup and two consumer groups
        /// but H5's and H6's three.
        fn threads(self) -> u32 {
            match self {
                FwdVariant::V4 => 128,
                FwdVariant::V3 | FwdVariant::H1 | FwdVariant::H2 => 256,
                FwdVariant::H5 | FwdVariant::H6 => 512,
                _ => 384,
            }
        }
        /// Query rows per block: two groups' 64 rows but V3's 256 and H5's and H6's 192.
        fn rows(self) -> usize {
            match self {
                FwdVariant::V3 => 256,
                FwdVariant::H5 | FwdVariant::H6 => 192,
                _ => 128,
            }
        }
        /// Keys a tile of the wgmma forwards: 128 at d = 64, 64 at d = 128; H7–H9 and H15 128 at
        /// both but H9's 192 (d = 64).
        fn key_rows(self, d: usize) -> usize {
            match (self, d) {
                (FwdVariant::H9, 64) => 3 * TILE,
                (FwdVariant::H7 | FwdVariant::H8 | FwdVariant::H9 | FwdVariant::H15, _) => 2 * TILE,
                (_, 64) => 2 * TILE,
                _ => TILE,
            }
        }
        /// Whether the kernel takes a [`SplitPlan`] (H3–H16, the `fwd_h3` family: one block a
        /// unit on a 1-D grid, one block an SM).
        fn splits_keys(self) -> bool {
            !matches!(
                self,
                FwdVariant::V3 | FwdVariant::V4 | FwdVariant::H1 | FwdVariant::H2
            )
        }
        /// The units (a block each: one query tile of one head of one sample) and key tiles of a
        /// call by a variant that takes a [`SplitPlan`] at head dim `dims.d` (64 or 128); `None`
        /// for the others.
        pub fn split_units(self, dims: AttnDims) -> Option<(u32, u32)> {
            let v = self.resolve(dims.d);
            (v.splits_keys() && has_fast_kernels(dims.d)).then(|| {
                let units = dims.tiles(v.rows()) * (dims.b * dims.h) as u32;
                (units, dims.tiles(v.key_rows(dims.d)))
            })
        }
        /// Stages of the K, V tiles: 4 in the `fwd_h3` family but H7–H9's and H15's larger tiles.
        fn stages(self, d: usize) -> usize {
            match self {
                FwdVariant::H1 | FwdVariant::H15 => 2,
                FwdVariant::H2 => 3,
                FwdVariant::V3
                | FwdVariant::V4
                | FwdVariant::H7
                | FwdVariant::H8
                | FwdVariant::H9 => {
                    if d == 64 {
                        3
                    } else {
                        2
                    }
                }
                _ => 4,
            }
        }
        /// Dynamic shared memory: the Q tile and `stages` stages of the K and V tiles (64 rows
        /// each), rows padded to d+8.
        fn shared_bytes(self, d: usize) -> u32 {
            if !matches!(self, FwdVariant::V3 | FwdVariant::V4) {
                // Unpadded swizzled tiles, 1 KB to align them, 128-key tiles at d = 64; H3's
                // mbarriers (Q, and full and empty per stage) after the tiles.
                let keys = self.key_rows(d);
                if self.splits_keys() {
                    // H3–H16: two Q tiles; q_full, q_empty per Q tile and full, empty per stage
                    let bars = 8 * (4 + 2 * self.stages(d));
                    let tiles = 2 * self.rows() + 2 * self.stages(d) * keys;
                    // H10: 256 bytes of bf16 ones after the mbarriers (its row sums' B)
                    let ones = if self == FwdVariant::H10 { 256 } else { 0 };
                    return (1024 + tiles * d * 2 + bars + ones) as u32;
                }
                return (1024 + (self.rows() + 2 * self.stages(d) * keys) * d * 2) as u32;
            }
            ((self.rows() + 2 * self.stages(d) * TILE) * (d + 8) * 2) as u32
        }
    }

    /// How an H3–H16 forward splits its last wave along the keys (`fwd_h3` in
    /// attention_hopper.cu), and the H3–H8 backward along the queries (`bwd_h3`: units of 128
    /// keys over the query tiles; partial dK, dV merged by `joint_attn_bwd_split_combine`). Its blocks are units of equal length — one query tile of one head,
    /// over every key tile — one resident an SM: when the unit count is not a multiple of the SM
    /// count, the last wave runs part-full for a whole unit's time (at SD3.5-medium 1024 px,
    /// batch 1: 840 units on 132 SMs, 6.36 waves run as 7, so the model's attention ran at 0.93×
    /// the bench's batch-2 rate). Units from `split_from` on run as `splits` blocks each, a
    /// share of the key tiles apiece, writing f32 partial outputs that
    /// `joint_attn_fwd_split_combine` merges in a second launch; `splits == 1`: none.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SplitPlan {
        pub split_from: u32,
        pub splits: u32,
    }

    impl SplitPlan {
        /// Key tiles a piece gets at least: its pipeline's fill, its partial rows' write and the
        /// combine stay small against its products.
        pub const MIN_PIECE_TILES: u32 = 4;
        /// Ways a unit is split at most.
        pub const MAX_SPLITS: u32 = 4;

        /// No unit split.
        pub fn none(units: u32) -> SplitPlan {
            SplitPlan {
                split_from: units,
                splits: 1,
            }
        }

        /// The plan for `units` units of `key_tiles` key tiles on `slots` SMs: the r = units mod
        /// slots units of a part-full last wave split s = ⌊slots / r⌋ ways (at most
        /// [`Self::MAX_SPLITS`], each piece ≥ [`Self::MIN_PIECE_TILES`] tiles), so that wave
        /// takes 1/s of a unit's time; no split when the waves are full or s would be 1.
        pub fn last_wave(units: u32, slots: u32, key_tiles: u32) -> SplitPlan {
            let r = units % slots.max(1);
            if r == 0 {
                return Self::none(units);
            }
            let s = (slots / r)
                .min(Self::MAX_SPLITS)
                .min(key_tiles / Self::MIN_PIECE_TILES);
            if s < 2 {
                return Self::none(units);
            }
            SplitPlan {
                split_from: units - r,
                splits: s,
            }
        }

        /// Blocks of the launch.
        pub fn blocks(self, units: u32) -> u32 {
            self.split_from + self.splits * (units - self.split_from)
        }

        fn is_split(self, units: u32) -> bool {
            self.splits > 1 && self.split_from < units
        }

        fn check(self, units: u32, tiles: u32) -> KernelResult<()> {
            if self.splits == 0 || self.split_from > units || self.splits > tiles.max(1) {
                return Err(KernelError::Invalid(format!(
                    "joint attention: {self:?} for {units} units of {tiles} tiles each"
                )));
            }
            Ok(())
        }
    }

    variant_enum! {
        env: "ADVDMD_ATTN_BWD",
        portable: [K128, V3],
        /// The backward kernels (same results up to the order of dQ's f32 reductions): `K128` has 8
        /// warps of 16 keys in 128-key tiles (one block per SM; the 64-key K64, measured slower at
        /// every shape, was removed).
        ///
        /// `V3` (attention.cu's `bwd_v3`, d = 64): 4 warps of 32 keys in 128-key blocks, two blocks
        /// per SM (254 registers): every Q and dO fragment read from shared memory feeds two key
        /// m-tiles. At d = 128 (no register room for 32 keys of dK, dV per warp) it runs `K128`.
        ///
        /// `H1` (attention_hopper.cu, sm_90a): every product on the Hopper warpgroup MMA (wgmma)
        /// from 128-byte-swizzled shared tiles, 2 warpgroups of 64 keys (128-key blocks), 64-query
        /// tiles in 2 stages, dQ from the dSᵀ tile with each group taking half of the columns. `H2`:
        /// H1 with one query tile's dQ product running into the next tile's first products (the
        /// dSᵀ tile double-buffered). `H3` (d = 64; at d = 128 it runs `H2`): H1's consumers fed by a
        /// producer warpgroup (FlashAttention-3's structure: mbarrier-guarded query-tile stages, and
        /// dQ added into the accumulator by the producer's warps from shared memory, 384 threads).
        /// `H4` (d = 64; at d = 128 `H2`): H3 with the next query tile's Sᵀ and dPᵀ products issued
        /// behind this tile's dQ product, so the tensor cores run them while dQ is handed over
        /// (consumers at 208 registers, a rolled-copy producer at 88). `H5` (d = 64; at d = 128
        /// `H2`): H4 with a loader that never waits for its copies (`cp.async.mbarrier.arrive.noinc`
        /// marks a stage full once they land), so it runs up to 3 query tiles ahead instead of 1.
        /// `H6` (d = 64; at d = 128 `H2`): H3 on 128-query tiles with H5's loader — Sᵀ and dPᵀ as
        /// m64n128 products (fewer shared-memory bytes per FLOP than m64n64), half the tiles a block;
        /// dQ split between the groups by rows, 2 stages, consumers at 240 registers. `H7` (d = 64;
        /// at d = 128 `H2`): H6 with the two groups half a tile apart — each tile's dQ product issued
        /// in the next tile, once both halves of dSᵀ are in place — so one group's exponentials and
        /// dSᵀ run while the other's products hold the tensor cores (in H3–H8 both groups meet once
        /// a tile and do them at the same time). `H8` (d = 64; at d = 128 `H2`): H7's deferred dQ on
        /// H3's 64-query tiles, 3 stages (H5's loader, no PIPE). `H9` (d = 64; at d = 128 `H2`): H6
        /// with a quarter of Pᵀ's exponentials on the FMA pipes (the forward H4's `poly_exp2`): both
        /// groups form Pᵀ at once, so the exponential unit is the tile's bottleneck while the tensor
        /// cores wait (64 a thread: 1024 clocks a scheduler a tile for the two groups; 768 here, for
        /// ~190 more instructions a warp). `H10` (d = 64; at d = 128 `H2`): H6 with dK's product
        /// reading dSᵀ from the shared tile dQ's reads (issued with dQ's, behind the groups'
        /// barrier) instead of from registers, so dSᵀ needs no register set beside Pᵀ's and the dV
        /// product runs on while dSᵀ is formed (H6 waits for it there, for registers). `H11` (d = 64;
        /// at d = 128 `H2`): H6 with K, V and each tile's Q and dO copied by TMA (one loader thread's
        /// bulk tensor copies from [`bwd_maps`], where 64 threads issued cp.async: ~18% of the
        /// block's issued instructions in H6's SASS; lse and Drow as before) and dQ added into its
        /// accumulator by TMA reductions (two a tile by one thread, from a swizzled f32 tile, where
        /// two warps issued 16 vector reductions a row). `H12` (d = 128; at d = 64 `H6`): the
        /// warp-specialized backward at d = 128, where H3–H11 run H2 — H5's loader on 64-query
        /// tiles without H4's early products (dK and dV take 128 registers a consumer thread: no
        /// second tile's Sᵀ fits beside them), 2 stages and one dQ tile (the 227 KB of shared
        /// memory), consumers at 232 registers, the loader at 40 (its tiles copied as two 64-column
        /// halves, 8 rows a step). `H13` (d = 128; at d = 64 `H11`): H12 with H11's TMA copies and
        /// dQ reductions (four 32-column blocks a tile) — at d = 128 the 64 copying threads issue
        /// twice H6's copies per FLOP (~450 instructions a warp a tile beside the consumers' ~550).
        /// `H14` (d = 128; at d = 64 `H10`): H12 with H10's dK product from the dSᵀ tile, so the
        /// consumers no longer wait mid-tile for dV's product before forming dSᵀ.
        BwdVariant {
            K128, V3, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14,
        }
    }

    impl BwdVariant {
        /// The fastest measured (docs/perf-log.md, H100, 2026-11-28, 1024 px, every variant in
        /// one run): with wgmma, H6 at 317.0 TFLOP/s at d = 64 (H3 284.2; at batch 1 307.7
        /// against 278.4, at 512 px 235.6 against 221.3) and H3 at d = 128 (it resolves to H2,
        /// 302.8; every variant within 0.5%); without, V3 at d = 64 (at d = 128 it resolves to
        /// K128; H200, 2026-11-27).
        pub fn measured_best(d: usize, wgmma: bool) -> BwdVariant {
            if wgmma {
                if d == 64 {
                    BwdVariant::H6
                } else {
                    BwdVariant::H3
                }
            } else {
                BwdVariant::V3
            }
        }

        /// The variant actually launched at head dim `d`.
        pub fn resolve(self, d: usize) -> BwdVariant {
            match self {
                BwdVariant::V3 if d != 64 => BwdVariant::K128,
                BwdVariant::H12 if d == 64 => BwdVariant::H6,
                BwdVariant::H13 if d == 64 => BwdVariant::H11,
                BwdVariant::H14 if d == 64 => BwdVariant::H10,
                v @ (BwdVariant::H12 | BwdVariant::H13 | BwdVariant::H14) => v,
                v if v.warp_specialized() && d != 64 => BwdVariant::H2,
                v => v,
            }
        }
        /// The `bwd_h3` family (H3–H11 at d = 64, H12–H14 at 128): a producer warpgroup and two
        /// consumer groups, 384 threads, units split along the queries.
        fn warp_specialized(self) -> bool {
            !matches!(
                self,
                BwdVariant::K128 | BwdVariant::V3 | BwdVariant::H1 | BwdVariant::H2
            )
        }
        /// `joint_attn_bwd_<variant>_d<d>`: the kernels are named after the variants.
        fn kernel(self, d: usize) -> String {
            format!("joint_attn_bwd_{}_d{d}", variant_name(self.resolve(d)))
        }
        /// Whether the loader copies by TMA (the kernel takes [`bwd_maps`] last).
        fn copies_by_tma(self) -> bool {
            matches!(self, BwdVariant::H11 | BwdVariant::H13)
        }
        /// Threads per block (warps of 16 keys; V3: warps of 32 keys).
        fn threads(self, d: usize) -> u32 {
            match self.resolve(d) {
                BwdVariant::V3 => 128,
                BwdVariant::K128 | BwdVariant::H1 | BwdVariant::H2 => 256,
                _ => 384, // warp_specialized
            }
        }
        /// The units (a block each: one 128-key tile of one head of one sample) and query tiles
        /// of a call by a variant that takes a [`SplitPlan`] (H3–H14: `bwd_h3`, split
        /// along the queries; its dQ is added into the accumulator either way); `None` for the
        /// others.
        pub fn split_units(self, dims: AttnDims) -> Option<(u32, u32)> {
            let v = self.resolve(dims.d);
            v.warp_specialized().then(|| {
                let units = dims.tiles(BWD_KEYS) * (dims.b * dims.h) as u32;
                (units, dims.tiles(v.query_rows()))
            })
        }
        /// Queries a tile of the wgmma backwards: 64; H6, H7, H9–H11 128.
        fn query_rows(self) -> usize {
            if matches!(
                self,
                BwdVariant::H6
                    | BwdVariant::H7
                    | BwdVariant::H9
                    | BwdVariant::H10
                    | BwdVariant::H11
            ) {
                2 * TILE
            } else {
                TILE
            }
        }
        /// Dynamic shared memory at head dim `d`.
        fn shared_bytes(self, d: usize) -> u32 {
            match self.resolve(d) {
                // Swizzled unpadded tiles (1 KB to align them): K, V, two stages of Q and dO,
                // the dSᵀ tile (keys × 64 queries; two for H2) and two stages of lse and Drow.
                v @ (BwdVariant::H1 | BwdVariant::H2) => {
                    let ds_tiles = if v == BwdVariant::H2 { 2 } else { 1 };
                    (1024
                        + (2 * BWD_KEYS + 4 * TILE) * d * 2
                        + ds_tiles * BWD_KEYS * TILE * 2
                        + 4 * TILE * 4) as u32
                }
                // bwd_h3 ([`bwd_h3_shared`]): H3 (d = 64) 3 stages of 64-query tiles, two dQ
                // tiles, 15 mbarrier slots (H8 uses them all); H12–H14 (d = 128) 2 stages, one
                // dQ tile; H6, H7, H9–H11 2 stages of 128-query tiles, one dQ tile.
                BwdVariant::H3 | BwdVariant::H4 | BwdVariant::H5 | BwdVariant::H8 => {
                    bwd_h3_shared(d, TILE, 3, 2, 15)
                }
                BwdVariant::H12 | BwdVariant::H13 | BwdVariant::H14 => {
                    bwd_h3_shared(d, TILE, 2, 1, 13)
                }
                BwdVariant::H6
                | BwdVariant::H7
                | BwdVariant::H9
                | BwdVariant::H10
                | BwdVariant::H11 => bwd_h3_shared(d, 2 * TILE, 2, 1, 13),
                // K, V tiles, two stages of the Q and dO tiles, the dSᵀ tile (keys × 72) and two
                // stages of lse and Drow; rows padded to d+8.
                BwdVariant::K128 | BwdVariant::V3 => {
                    (((2 * BWD_KEYS + 4 * TILE) * (d + 8) + BWD_KEYS * (TILE + 8)) * 2
                        + 4 * TILE * 4) as u32
                }
            }
        }
    }

    /// `bwd_h3`'s dynamic shared memory at head dim `d`: 1 KB to align the swizzled tiles, K and
    /// V (128 keys), `stages` stages of the `qt`-query Q, dO, lse and Drow, two dSᵀ tiles (keys ×
    /// `qt`), `dq_tiles` f32 dQ tiles (rows padded to d+4) and `bars` mbarrier slots.
    fn bwd_h3_shared(d: usize, qt: usize, stages: usize, dq_tiles: usize, bars: usize) -> u32 {
        (1024
            + 2 * BWD_KEYS * d * 2
            + stages * 2 * qt * d * 2
            + 2 * BWD_KEYS * qt * 2
            + dq_tiles * qt * (d + 4) * 4
            + stages * 2 * qt * 4
            + 8 * bars) as u32
    }

    /// Sizes of one joint-attention call: batch, tokens of stream a (may be 0) and b (may be 0 if
    /// a is not), heads, head dim (1..=256; 64 and 128 run the tensor-core kernels, any other the
    /// fallback).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct AttnDims {
        pub b: usize,
        pub la: usize,
        pub lb: usize,
        pub h: usize,
        pub d: usize,
    }

    impl AttnDims {
        /// Tokens of the concatenation `[a; b]`.
        pub fn lt(&self) -> usize {
            self.la + self.lb
        }
        /// Elements of a `[B, La, H, d]` operand.
        pub fn numel_a(&self) -> usize {
            self.b * self.la * self.h * self.d
        }
        /// Elements of a `[B, Lb, H, d]` operand.
        pub fn numel_b(&self) -> usize {
            self.b * self.lb * self.h * self.d
        }
        /// Elements of the lse (and of Drow): `[B, H, La+Lb]`.
        pub fn numel_rows(&self) -> usize {
            self.b * self.h * self.lt()
        }
        /// The softmax scale 1/√d, computed as the CPU kernel computes it.
        pub fn scale(&self) -> f32 {
            1.0 / (self.d as f32).sqrt()
        }
        /// Tiles of `rows` rows over both streams (each stream's last tile may be partial).
        fn tiles(&self, rows: usize) -> u32 {
            (self.la.div_ceil(rows) + self.lb.div_ceil(rows)) as u32
        }
        /// The fallback kernels' grid: blocks of [`NAIVE_ROWS`] rows of the concatenation, B·H.
        fn naive_cfg(&self) -> LaunchCfg {
            LaunchCfg::grid2(
                self.lt().div_ceil(NAIVE_ROWS) as u32,
                (self.b * self.h) as u32,
                NAIVE_ROWS as u32,
            )
        }

        /// Whether there is any work (B·H > 0); the kernels need La+Lb > 0 and 1 ≤ d ≤ 256.
        fn validate(&self) -> KernelResult<bool> {
            if self.d == 0 || self.d > NAIVE_MAX_D {
                return Err(KernelError::Invalid(format!(
                    "joint attention: head dim {} (the kernels take 1 to {NAIVE_MAX_D})",
                    self.d
                )));
            }
            if self.lt() == 0 {
                return Err(KernelError::Invalid(
                    "joint attention: no tokens to attend to (La = Lb = 0)".into(),
                ));
            }
            let bh = self.b * self.h;
            if bh > 65_535 || self.lt() > i32::MAX as usize / 2 {
                return Err(KernelError::Invalid(format!(
                    "joint attention: {self:?} exceeds the launch grid (B·H ≤ 65535)"
                )));
            }
            Ok(bh > 0)
        }
    }

    fn check_len<T>(name: &str, buf: &DevBuf<T>, want: usize) -> KernelResult<()> {
        if buf.len() == want {
            Ok(())
        } else {
            Err(KernelError::Invalid(format!(
                "joint attention: {name} holds {} elements, the dims ask for {want}",
                buf.len()
            )))
        }
    }

    /// Checks the six q, k, v buffers against `dims`, V's token rows `v_ld` elements apart.
    #[allow(clippy::too_many_arguments)]
    fn check_qkv(
        dims: &AttnDims,
        qa: &DevBuf<bf16>,
        ka: &DevBuf<bf16>,
        va: &DevBuf<bf16>,
        qb: &DevBuf<bf16>,
        kb: &DevBuf<bf16>,
        vb: &DevBuf<bf16>,
        v_ld: usize,
    ) -> KernelResult<()> {
        for (name, buf) in [("q_a", qa), ("k_a", ka)] {
            check_len(name, buf, dims.numel_a())?;
        }
        for (name, buf) in [("q_b", qb), ("k_b", kb)] {
            check_len(name, buf, dims.numel_b())?;
        }
        check_v(dims, "v_a", va, dims.la, v_ld)?;
        check_v(dims, "v_b", vb, dims.lb, v_ld)
    }

    /// A V (or dV) buffer of `l` tokens per sample whose token rows are `v_ld` elements apart:
    /// exactly `[B, L, H, d]` when `v_ld = H·d`; otherwise the V window of a fused qkv
    /// (`v_ld = 3·H·d`), which the tensor-core kernels' `_vfused` entries read.
    fn check_v(
        dims: &AttnDims,
        name: &str,
        buf: &DevBuf<bf16>,
        l: usize,
        v_ld: usize,
    ) -> KernelResult<()> {
        let hd = dims.h * dims.d;
        if v_ld == hd {
            return check_len(name, buf, dims.b * l * hd);
        }
        let rows = dims.b * l;
        let need = if rows == 0 { 0 } else { (rows - 1) * v_ld + hd };
        if !has_fast_kernels(dims.d) || v_ld != 3 * hd || buf.len() < need {
            return Err(KernelError::Invalid(format!(
                "joint attention: {name} of {} elements with token stride {v_ld} for {dims:?} \
                 (a strided V needs head dim 64 or 128, the stride 3·H·d of a fused qkv, and \
                 {need} elements)",
                buf.len()
            )));
        }
        Ok(())
    }

    /// The entry-name suffix of the kernels that read V at the fused qkv's token stride.
    fn vfused(dims: AttnDims, v_ld: usize) -> &'static str {
        if v_ld == dims.h * dims.d {
            ""
        } else {
            "_vfused"
        }
    }

    /// The tensor maps of one operand of both streams (`[B, L, H, d]` of bf16 or f32, tokens `ld`
    /// elements apart) for a TMA kernel: a rank-4 map each with d innermost, its box 128 bytes of
    /// columns × one head × `rows` tokens (a tile). An empty stream's map is the other's (its
    /// tiles are never moved).
    fn operand_maps<T>(
        dev: &KernelDevice,
        [a, b]: [&DevBuf<T>; 2],
        dims: AttnDims,
        ld: usize,
        rows: usize,
    ) -> KernelResult<[TmaMap; 2]> {
        let (h, d, ld) = (dims.h as u64, dims.d as u64, ld as u64);
        let e = std::mem::size_of::<T>() as u64;
        let map = |buf: &DevBuf<T>, l: usize| {
            dev.tile_map(&TileMap4 {
                elem_bytes: e as u32,
                base: buf.device_ptr(),
                dims: [d, h, l as u64, dims.b as u64],
                strides: [e * d, e * ld, e * ld * l as u64],
                boxes: [(128 / e) as u32, 1, rows as u32, 1],
            })
        };
        match (dims.la > 0, dims.lb > 0) {
            (true, true) => Ok([map(a, dims.la)?, map(b, dims.lb)?]),
            (true, false) => map(a, dims.la).map(|m| [m, m]),
            (false, true) => map(b, dims.lb).map(|m| [m, m]),
            (false, false) => Err(KernelError::Invalid(
                "joint attention: tensor maps of two empty streams".into(),
            )),
        }
    }

    /// The maps of a TMA forward (cuda/attention_common.cuh's `AttnMaps`): Q on query tiles, K
    /// and V on key tiles (V's tokens `v_ld` elements apart), each of stream a then b.
    fn fwd_maps(
        dev: &KernelDevice,
        [qa, ka, va, qb, kb, vb]: [&DevBuf<bf16>; 6],
        dims: AttnDims,
        v_ld: usize,
        variant: FwdVariant,
    ) -> KernelResult<Vec<TmaMap>> {
        let (hd, qr, kr) = (dims.h * dims.d, variant.rows(), variant.key_rows(dims.d));
        Ok([
            operand_maps(dev, [qa, qb], dims, hd, qr)?,
            operand_maps(dev, [ka, kb], dims, hd, kr)?,
            operand_maps(dev, [va, vb], dims, v_ld, kr)?,
        ]
        .concat())
    }

    /// The maps of a TMA backward (`AttnBwdMaps`): Q, K, V, dO and the f32 dQ accumulators of
    /// stream a then b, K and V on the unit's key tile, the others on query tiles.
    fn bwd_maps(
        dev: &KernelDevice,
        [qa, ka, va, doa, qb, kb, vb, dob]: [&DevBuf<bf16>; 8],
        dq_acc: [&DevBuf<f32>; 2],
        dims: AttnDims,
        v_ld: usize,
        variant: BwdVariant,
    ) -> KernelResult<Vec<TmaMap>> {
        let (hd, qr) = (dims.h * dims.d, variant.query_rows());
        Ok([
            operand_maps(dev, [qa, qb], dims, hd, qr)?,
            operand_maps(dev, [ka, kb], dims, hd, BWD_KEYS)?,
            operand_maps(dev, [va, vb], dims, v_ld, BWD_KEYS)?,
            operand_maps(dev, [doa, dob], dims, hd, qr)?,
            operand_maps(dev, dq_acc, dims, hd, qr)?,
        ]
        .concat())
    }

    /// Forward: `(o_a [B, La, H, d], o_b [B, Lb, H, d], lse [B, H, La+Lb])`, as
    /// [`super::joint_attention_fwd`].
    #[allow(clippy::too_many_arguments)]
    pub fn joint_attention_fwd(
        dev: &KernelDevice,
        qa: &DevBuf<bf16>,
        ka: &DevBuf<bf16>,
        va: &DevBuf<bf16>,
        qb: &DevBuf<bf16>,
        kb: &DevBuf<bf16>,
        vb: &DevBuf<bf16>,
        dims: AttnDims,
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<bf16>, DevBuf<f32>)> {
        joint_attention_fwd_with(
            dev,
            qa,
            ka,
            va,
            qb,
            kb,
            vb,
            dims,
            FwdVariant::fastest(dev, dims.d),
        )
    }

    /// [`joint_attention_fwd`] with a chosen kernel variant (for tests and the bench; ignored at
    /// head dims other than 64 and 128, which run the fallback).
    #[allow(clippy::too_many_arguments)]
    pub fn joint_attention_fwd_with(
        dev: &KernelDevice,
        qa: &DevBuf<bf16>,
        ka: &DevBuf<bf16>,
        va: &DevBuf<bf16>,
        qb: &DevBuf<bf16>,
        kb: &DevBuf<bf16>,
        vb: &DevBuf<bf16>,
        dims: AttnDims,
        variant: FwdVariant,
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<bf16>, DevBuf<f32>)> {
        fwd(
            dev,
            [qa, ka, va, qb, kb, vb],
            dims,
            variant,
            dims.h * dims.d,
        )
    }

    /// [`joint_attention_fwd`] with V read where it lies: `va`, `vb` hold their token rows
    /// `v_ld` elements apart (the MMDiT passes windows of its fused qkv projections, `v_ld` =
    /// 3·H·d). Head dims 64 and 128 only.
    #[allow(clippy::too_many_arguments)]
    pub fn joint_attention_fwd_v_ld(
        dev: &KernelDevice,
        qa: &DevBuf<bf16>,
        ka: &DevBuf<bf16>,
        va: &DevBuf<bf16>,
        qb: &DevBuf<bf16>,
        kb: &DevBuf<bf16>,
        vb: &DevBuf<bf16>,
        dims: AttnDims,
        v_ld: usize,
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<bf16>, DevBuf<f32>)> {
        let variant = FwdVariant::fastest(dev, dims.d);
        joint_attention_fwd_v_ld_with(dev, [qa, ka, va, qb, kb, vb], dims, v_ld, variant)
    }

    /// [`joint_attention_fwd_v_ld`] with a chosen kernel variant (`[qa, ka, va, qb, kb, vb]`).
    pub fn joint_attention_fwd_v_ld_with(
        dev: &KernelDevice,
        qkv: [&DevBuf<bf16>; 6],
        dims: AttnDims,
        v_ld: usize,
        variant: FwdVariant,
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<bf16>, DevBuf<f32>)> {
        fwd(dev, qkv, dims, variant, v_ld)
    }

    /// [`joint_attention_fwd_with`] under a chosen [`SplitPlan`] (`[qa, ka, va, qb, kb, vb]`; V
    /// rows `H·d` apart), for tests and the bench: `variant` must take one
    /// ([`FwdVariant::split_units`]).
    /// `ctas`: the grid, which takes the plan's blocks in turns (`None`: a block each).
    pub fn joint_attention_fwd_split_with(
        dev: &KernelDevice,
        qkv: [&DevBuf<bf16>; 6],
        dims: AttnDims,
        variant: FwdVariant,
        plan: SplitPlan,
        ctas: Option<u32>,
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<bf16>, DevBuf<f32>)> {
        if variant.split_units(dims).is_none() {
            return Err(no_split_plan(variant, dims));
        }
        if ctas == Some(0) {
            return Err(KernelError::Invalid("joint attention: a grid of 0".into()));
        }
        let launch = FwdLaunch {
            plan: Some(plan),
            ctas,
            ablation: None,
        };
        fwd_planned(dev, qkv, dims, variant, dims.h * dims.d, launch)
    }

    /// The error for a split plan given to a variant that takes none.
    fn no_split_plan(variant: impl std::fmt::Debug, dims: AttnDims) -> KernelError {
        KernelError::Invalid(format!(
            "joint attention: {variant:?} at d = {} takes no split plan",
            dims.d
        ))
    }

    /// How the H3–H16 forward is launched: its [`SplitPlan`] (`None`: [`SplitPlan::last_wave`] on
    /// the device's SMs), its grid (`None`: a block a planned block, or one an SM under
    /// `ADVDMD_ATTN_PERSISTENT=1`) and, for the bench, a cut of its work ([`FwdAblation`]).
    #[derive(Clone, Copy, Debug, Default)]
    struct FwdLaunch {
        plan: Option<SplitPlan>,
        ctas: Option<u32>,
        ablation: Option<FwdAblation>,
    }

    variant_enum! {
        /// A diagnostic cut of the default wgmma forward's work (H4 at d = 64, H3 at d = 128; their
        /// kernels `…_abl<bits>`, attention_hopper.cu's `ABL`), for the bench: timed beside the whole
        /// kernel, each says what one part of the kernel costs — the time left with no softmax is
        /// the products' and the pipeline's, with no copies the consumers' alone, with neither the
        /// tensor cores', barriers' and mbarriers' floor, with no exponentials all but the
        /// exponential unit's (and the polynomials'). (Without the groups' turns it still
        /// computes attention: that is a variant, [`FwdVariant::H16`].) None computes attention.
        FwdAblation {
            /// P is S in bf16: no row maximum, exponential, sum or rescale (O = Σ bf16(S)·V, lse 0).
            NoSoftmax,
            /// The producer copies nothing: Q, K and V read as zeros.
            NoCopies,
            /// Both.
            Bare,
            /// P = |max(x, −126)| of each exponent x, one FMNMX where 2^x was (the row maxima, sums
            /// and rescales kept): what the exponentials (and H4's polynomials) cost.
            NoExponentials,
        }
    }

    impl FwdAblation {
        /// The kernel's `ABL` bits.
        fn bits(self) -> u32 {
            match self {
                FwdAblation::NoSoftmax => 1,
                FwdAblation::NoCopies => 2,
                FwdAblation::Bare => 3,
                FwdAblation::NoExponentials => 8,
            }
        }

        /// The name of a bench row.
        pub fn tag(self) -> &'static str {
            match self {
                FwdAblation::NoSoftmax => "nosoftmax",
                FwdAblation::NoCopies => "nocopies",
                FwdAblation::Bare => "bare",
                FwdAblation::NoExponentials => "noexps",
            }
        }

        /// The variant whose kernel is cut at head dim `d` (64 or 128).
        pub fn base(d: usize) -> FwdVariant {
            FwdVariant::H4.resolve(d)
        }

        /// What tests and the bench run on `dev` at head dim `d`: every cut where it runs wgmma
        /// and [`Self::base`] is enabled ([`FwdVariant::enabled`]), none under
        /// `ADVDMD_ATTN_ABLATIONS=0` ([`ablations_env`]; a malformed value, which the CLI
        /// refuses at start, leaves them in).
        pub fn enabled(dev: &KernelDevice, d: usize) -> Vec<FwdAblation> {
            let on = dev.has_wgmma() && has_fast_kernels(d) && ablations_env().unwrap_or(true);
            if on && FwdVariant::enabled().contains(&Self::base(d)) {
                Self::ALL.to_vec()
            } else {
                Vec::new()
            }
        }
    }

    /// The forward at `dims` (V rows `H·d` apart) by [`FwdAblation::base`]'s kernel cut by
    /// `ablation`, launched as the plain launcher launches that variant (one block an SM unless
    /// `ADVDMD_ATTN_PERSISTENT=0`) under `plan` (`None`: its plan, [`SplitPlan::last_wave`]).
    /// Head dims 64 and 128 only. A split plan combines the pieces of a cut softmax as if they
    /// were a softmax's (under [`FwdAblation::NoSoftmax`], an average of the pieces' sums).
    pub fn joint_attention_fwd_ablated(
        dev: &KernelDevice,
        qkv: [&DevBuf<bf16>; 6],
        dims: AttnDims,
        ablation: FwdAblation,
        plan: Option<SplitPlan>,
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<bf16>, DevBuf<f32>)> {
        if !has_fast_kernels(dims.d) || !dev.has_wgmma() {
            return Err(KernelError::Invalid(format!(
                "joint attention: the ablated forward needs wgmma and d = 64 or 128 (d = {} on {})",
                dims.d,
                dev.name()
            )));
        }
        let launch = FwdLaunch {
            plan,
            ctas: None,
            ablation: Some(ablation),
        };
        let v_ld = dims.h * dims.d;
        fwd_planned(dev, qkv, dims, FwdAblation::base(dims.d), v_ld, launch)
    }

    fn fwd(
        dev: &KernelDevice,
        qkv: [&DevBuf<bf16>; 6],
        dims: AttnDims,
        variant: FwdVariant,
        v_ld: usize,
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<bf16>, DevBuf<f32>)> {
        fwd_planned(dev, qkv, dims, variant, v_ld, FwdLaunch::default())
    }

    /// The forward; `launch` for the H3–H16 kernels, ignored by the others.
    fn fwd_planned(
        dev: &KernelDevice,
        [qa, ka, va, qb, kb, vb]: [&DevBuf<bf16>; 6],
        dims: AttnDims,
        variant: FwdVariant,
        v_ld: usize,
        launch: FwdLaunch,
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<bf16>, DevBuf<f32>)> {
        let work = dims.validate()?;
        check_qkv(&dims, qa, ka, va, qb, kb, vb, v_ld)?;
        let oa = dev.alloc::<bf16>(dims.numel_a())?;
        let ob = dev.alloc::<bf16>(dims.numel_b())?;
        let lse = dev.alloc::<f32>(dims.numel_rows())?;
        if !work {
            return Ok((oa, ob, lse));
        }
        dev.count_matmul_flops(joint_attention_flops(dims, false) as u64);
        let scale_log2 = dims.scale() * std::f32::consts::LOG2_E;
        // Both kernels take (outputs, inputs, La, Lb, H); the fallback adds its head dim.
        let args = KernelArgs::new()
            .buf(&oa)
            .buf(&ob)
            .buf(&lse)
            .buf(qa)
            .buf(ka)
            .buf(va)
            .buf(qb)
            .buf(kb)
            .buf(vb)
            .i32(dims.la as i32)
            .i32(dims.lb as i32)
            .i32(dims.h as i32);
        if !has_fast_kernels(dims.d) {
            let args = args.i32(dims.d as i32).f32(scale_log2);
            dev.launch("joint_attn_fwd_naive", dims.naive_cfg(), args)?;
            return Ok((oa, ob, lse));
        }
        let variant = variant.resolve(dims.d);
        let tma = variant.copies_by_tma();
        let name = match launch.ablation {
            Some(a) => format!("{}_abl{}", variant.kernel(dims.d), a.bits()),
            None => variant.kernel(dims.d) + if tma { "" } else { vfused(dims, v_ld) },
        };
        let shared = variant.shared_bytes(dims.d);
        let maps = if tma {
            fwd_maps(dev, [qa, ka, va, qb, kb, vb], dims, v_ld, variant)?
        } else {
            Vec::new()
        };
        // TMA's kernels take the maps after the others' last argument
        let with_maps = |args: KernelArgs| if tma { args.maps(&maps) } else { args };
        let Some((units, key_tiles)) = variant.split_units(dims) else {
            let grid = LaunchCfg::grid2(
                dims.tiles(variant.rows()),
                (dims.b * dims.h) as u32,
                variant.threads(),
            );
            dev.launch(&name, grid.with_shared(shared), args.f32(scale_log2))?;
            return Ok((oa, ob, lse));
        };
        let sms = dev.sm_count() as u32;
        let plan = launch
            .plan
            .unwrap_or_else(|| SplitPlan::last_wave(units, sms, key_tiles));
        plan.check(units, key_tiles)?;
        let blocks = plan.blocks(units);
        let ctas = match launch.ctas {
            Some(c) => c.min(blocks),
            None if persistent_env().unwrap_or(true) => sms.min(blocks),
            None => blocks,
        };
        let grid = LaunchCfg::linear(ctas, variant.threads()).with_shared(shared);
        let args = args.f32(scale_log2);
        if !plan.is_split(units) {
            let args = args.null().i32(units as i32).i32(1).i32(blocks as i32);
            dev.launch(&name, grid, with_maps(args))?;
            return Ok((oa, ob, lse));
        }
        // Each piece's rows: O/l (d columns, f32) and then the lse of each row.
        let split_units = units - plan.split_from;
        let rows = variant.rows();
        let opart = dev.alloc::<f32>((split_units * plan.splits) as usize * rows * (dims.d + 1))?;
        let args = args
            .buf(&opart)
            .i32(plan.split_from as i32)
            .i32(plan.splits as i32)
            .i32(blocks as i32);
        dev.launch(&name, grid, with_maps(args))?;
        let combine = KernelArgs::new()
            .buf(&oa)
            .buf(&ob)
            .buf(&lse)
            .buf(&opart)
            .i32(dims.la as i32)
            .i32(dims.lb as i32)
            .i32(dims.h as i32)
            .i32(plan.split_from as i32)
            .i32(plan.splits as i32);
        dev.launch(
            &format!("joint_attn_fwd_split_combine_d{}_q{rows}", dims.d),
            LaunchCfg::linear(split_units, 256),
            combine,
        )?;
        Ok((oa, ob, lse))
    }

    /// Backward: the gradients of all six inputs in [`super::joint_attention_bwd`]'s order
    /// `[dq_a, dk_a, dv_a, dq_b, dk_b, dv_b]`, bf16. Takes the forward's outputs `o_a`, `o_b` (for
    /// the row term) and `lse`, and the output gradients `do_a`, `do_b`.
    #[allow(clippy::too_many_arguments)]
    pub fn joint_attention_bwd(
        dev: &KernelDevice,
        qa: &DevBuf<bf16>,
        ka: &DevBuf<bf16>,
        va: &DevBuf<bf16>,
        qb: &DevBuf<bf16>,
        kb: &DevBuf<bf16>,
        vb: &DevBuf<bf16>,
        oa: &DevBuf<bf16>,
        ob: &DevBuf<bf16>,
        lse: &DevBuf<f32>,
        doa: &DevBuf<bf16>,
        dob: &DevBuf<bf16>,
        dims: AttnDims,
    ) -> KernelResult<[DevBuf<bf16>; 6]> {
        joint_attention_bwd_with(
            dev,
            qa,
            ka,
            va,
            qb,
            kb,
            vb,
            oa,
            ob,
            lse,
            doa,
            dob,
            dims,
            BwdVariant::fastest(dev, dims.d),
        )
    }

    /// [`joint_attention_bwd`] with a chosen kernel variant (for tests and the bench; ignored at
    /// head dims other than 64 and 128, which run the fallback).
    #[allow(clippy::too_many_arguments)]
    pub fn joint_attention_bwd_with(
        dev: &KernelDevice,
        qa: &DevBuf<bf16>,
        ka: &DevBuf<bf16>,
        va: &DevBuf<bf16>,
        qb: &DevBuf<bf16>,
        kb: &DevBuf<bf16>,
        vb: &DevBuf<bf16>,
        oa: &DevBuf<bf16>,
        ob: &DevBuf<bf16>,
        lse: &DevBuf<f32>,
        doa: &DevBuf<bf16>,
        dob: &DevBuf<bf16>,
        dims: AttnDims,
        variant: BwdVariant,
    ) -> KernelResult<[DevBuf<bf16>; 6]> {
        let operands = [qa, ka, va, qb, kb, vb, oa, ob, doa, dob];
        bwd_new_grads(dev, operands, lse, dims, variant, BwdLaunch::default())
    }

    /// [`joint_attention_bwd`] for [`joint_attention_fwd_v_ld`]: V read with token stride
    /// `v_ld`, and dV written with the same stride into `dva`, `dvb` (windows of the fused qkv
    /// gradient; their other columns are left alone). Returns `[dq_a, dk_a, dq_b, dk_b]`.
    #[allow(clippy::too_many_arguments)]
    pub fn joint_attention_bwd_v_ld(
        dev: &KernelDevice,
        qkv: [&DevBuf<bf16>; 6],
        outs: [&DevBuf<bf16>; 4],
        lse: &DevBuf<f32>,
        dims: AttnDims,
        v_ld: usize,
        dva: &DevBuf<bf16>,
        dvb: &DevBuf<bf16>,
    ) -> KernelResult<[DevBuf<bf16>; 4]> {
        let variant = BwdVariant::fastest(dev, dims.d);
        joint_attention_bwd_v_ld_with(dev, qkv, outs, lse, dims, v_ld, [dva, dvb], variant)
    }

    /// [`joint_attention_bwd_v_ld`] with a chosen kernel variant (`[dva, dvb]` the dV windows).
    #[allow(clippy::too_many_arguments)]
    pub fn joint_attention_bwd_v_ld_with(
        dev: &KernelDevice,
        qkv: [&DevBuf<bf16>; 6],
        outs: [&DevBuf<bf16>; 4],
        lse: &DevBuf<f32>,
        dims: AttnDims,
        v_ld: usize,
        dv: [&DevBuf<bf16>; 2],
        variant: BwdVariant,
    ) -> KernelResult<[DevBuf<bf16>; 4]> {
        bwd_v_ld(dev, qkv, outs, lse, dims, v_ld, dv, variant, None)
    }

    /// [`joint_attention_bwd_v_ld_with`] under a chosen [`SplitPlan`] (tests: the split
    /// backward's dV written inside a fused qkv gradient); `variant` must take one.
    #[allow(clippy::too_many_arguments)]
    pub fn joint_attention_bwd_v_ld_split_with(
        dev: &KernelDevice,
        qkv: [&DevBuf<bf16>; 6],
        outs: [&DevBuf<bf16>; 4],
        lse: &DevBuf<f32>,
        dims: AttnDims,
        v_ld: usize,
        dv: [&DevBuf<bf16>; 2],
        variant: BwdVariant,
        plan: SplitPlan,
    ) -> KernelResult<[DevBuf<bf16>; 4]> {
        if variant.split_units(dims).is_none() {
            return Err(no_split_plan(variant, dims));
        }
        bwd_v_ld(dev, qkv, outs, lse, dims, v_ld, dv, variant, Some(plan))
    }

    #[allow(clippy::too_many_arguments)]
    fn bwd_v_ld(
        dev: &KernelDevice,
        qkv: [&DevBuf<bf16>; 6],
        outs: [&DevBuf<bf16>; 4],
        lse: &DevBuf<f32>,
        dims: AttnDims,
        v_ld: usize,
        dv: [&DevBuf<bf16>; 2],
        variant: BwdVariant,
        plan: Option<SplitPlan>,
    ) -> KernelResult<[DevBuf<bf16>; 4]> {
        let (dq, [dka, dkb]) =
            bwd_v_ld_dq(dev, qkv, outs, lse, dims, v_ld, dv, variant, plan, false)?;
        match dq {
            DqGrad::Bf16(dqa, dqb) => Ok([dqa, dka, dqb, dkb]),
            DqGrad::Scaled { .. } => Err(KernelError::Invalid(
                "joint attention backward: dQ left in f32 where bf16 was asked for".into(),
            )),
        }
    }

    /// [`joint_attention_bwd_v_ld`] that leaves dQ in the kernels' unscaled f32 accumulators
    /// where the fast kernels run ([`DqGrad::Scaled`]: for a consumer that reads them itself, as
    /// [`crate::kernels::qknorm::dev::rms_norm_bwd_laid_pair_dq32`], instead of a conversion
    /// pass); the fallback's dQ is bf16 ([`DqGrad::Bf16`]). Returns dQ and `[dk_a, dk_b]`.
    #[allow(clippy::too_many_arguments)]
    pub fn joint_attention_bwd_v_ld_dq32(
        dev: &KernelDevice,
        qkv: [&DevBuf<bf16>; 6],
        outs: [&DevBuf<bf16>; 4],
        lse: &DevBuf<f32>,
        dims: AttnDims,
        v_ld: usize,
        dv: [&DevBuf<bf16>; 2],
        variant: BwdVariant,
    ) -> KernelResult<(DqGrad, [DevBuf<bf16>; 2])> {
        bwd_v_ld_dq(dev, qkv, outs, lse, dims, v_ld, dv, variant, None, true)
    }

    /// A backward's dQ of both streams: bf16, or (`Scaled`) the f32 accumulators `a`, `b`
    /// (`[B, L, H, D]`) that hold dQ / `scale`.
    pub enum DqGrad {
        Bf16(DevBuf<bf16>, DevBuf<bf16>),
        Scaled {
            a: DevBuf<f32>,
            b: DevBuf<f32>,
            scale: f32,
        },
    }

    #[allow(clippy::too_many_arguments)]
    fn bwd_v_ld_dq(
        dev: &KernelDevice,
        [qa, ka, va, qb, kb, vb]: [&DevBuf<bf16>; 6],
        [oa, ob, doa, dob]: [&DevBuf<bf16>; 4],
        lse: &DevBuf<f32>,
        dims: AttnDims,
        v_ld: usize,
        [dva, dvb]: [&DevBuf<bf16>; 2],
        variant: BwdVariant,
        plan: Option<SplitPlan>,
        dq32: bool,
    ) -> KernelResult<(DqGrad, [DevBuf<bf16>; 2])> {
        check_v(&dims, "dv_a", dva, dims.la, v_ld)?;
        check_v(&dims, "dv_b", dvb, dims.lb, v_ld)?;
        let (na, nb) = (dims.numel_a(), dims.numel_b());
        // the accumulators stand in for dQ only where the fast kernels run
        let dq32 = dq32 && has_fast_kernels(dims.d);
        let dq_len = |n| if dq32 { 0 } else { n };
        let grads = [
            dev.alloc(dq_len(na))?,
            dev.alloc(na)?,
            dev.alloc(dq_len(nb))?,
            dev.alloc(nb)?,
        ];
        let [dqa, dka, dqb, dkb] = &grads;
        let operands = [qa, ka, va, qb, kb, vb, oa, ob, doa, dob];
        let outs = [dqa, dka, dva, dqb, dkb, dvb];
        let launch = BwdLaunch {
            plan,
            ablation: None,
        };
        let acc = bwd_planned(dev, operands, lse, dims, variant, v_ld, outs, launch, dq32)?;
        let [dqa, dka, dqb, dkb] = grads;
        let dq = match acc {
            Some((a, b)) => DqGrad::Scaled {
                a,
                b,
                scale: dims.scale(),
            },
            None => DqGrad::Bf16(dqa, dqb),
        };
        Ok((dq, [dka, dkb]))
    }

    /// The backward into `grads` `[dq_a, dk_a, dv_a, dq_b, dk_b, dv_b]` (dV with token stride
    /// `v_ld`, like V).
    /// [`joint_attention_bwd_with`] under a chosen [`SplitPlan`] (`[qa, ka, va, qb, kb, vb]`,
    /// `[oa, ob, doa, dob]`), for tests and the bench: `variant` must take one
    /// ([`BwdVariant::split_units`]).
    pub fn joint_attention_bwd_split_with(
        dev: &KernelDevice,
        [qa, ka, va, qb, kb, vb]: [&DevBuf<bf16>; 6],
        [oa, ob, doa, dob]: [&DevBuf<bf16>; 4],
        lse: &DevBuf<f32>,
        dims: AttnDims,
        variant: BwdVariant,
        plan: SplitPlan,
    ) -> KernelResult<[DevBuf<bf16>; 6]> {
        if variant.split_units(dims).is_none() {
            return Err(no_split_plan(variant, dims));
        }
        let operands = [qa, ka, va, qb, kb, vb, oa, ob, doa, dob];
        let launch = BwdLaunch {
            plan: Some(plan),
            ablation: None,
        };
        bwd_new_grads(dev, operands, lse, dims, variant, launch)
    }

    variant_enum! {
        /// A diagnostic cut of the default wgmma backward's work at d = 64 (H6; its kernels
        /// `joint_attn_bwd_h6_d64_abl<bits>`, attention_hopper.cu's `bwd_h3` `ABL`), for the bench:
        /// timed beside H6, what the dQ reductions into the f32 accumulator, the copies and the
        /// exponentials cost. The gradients are not the backward's: without reductions dQ stays 0
        /// (dK, dV are H6's); without copies every operand reads as 0, and so does every gradient;
        /// without exponentials Pᵀ is the exponent, floored at −126 (finite, not H6's).
        BwdAblation {
            /// The flushers take each dQ tile and release it without adding it.
            NoReductions,
            /// The loaders copy nothing: K, V, Q, dO, lse and Drow read as zeros.
            NoCopies,
            /// Both.
            Bare,
            /// Pᵀ = the exponent S·scale − lse·log2 e floored at −126, one FMNMX where 2 to it
            /// was: no exponential unit or polynomial.
            NoExponentials,
        }
    }

    impl BwdAblation {
        /// The kernel's `ABL` bits.
        fn bits(self) -> u32 {
            match self {
                BwdAblation::NoReductions => 1,
                BwdAblation::NoCopies => 2,
                BwdAblation::Bare => 3,
                BwdAblation::NoExponentials => 4,
            }
        }

        /// The name of a bench row.
        pub fn tag(self) -> &'static str {
            match self {
                BwdAblation::NoReductions => "noreductions",
                BwdAblation::NoCopies => "nocopies",
                BwdAblation::Bare => "bare",
                BwdAblation::NoExponentials => "noexps",
            }
        }

        /// The variant whose kernel is cut (d = 64 only).
        pub const BASE: BwdVariant = BwdVariant::H6;

        /// What tests and the bench run on `dev` at head dim `d`: every cut at d = 64 where it
        /// runs wgmma and [`Self::BASE`] is enabled, none under `ADVDMD_ATTN_ABLATIONS=0`.
        pub fn enabled(dev: &KernelDevice, d: usize) -> Vec<BwdAblation> {
            let on = d == 64 && dev.has_wgmma() && ablations_env().unwrap_or(true);
            if on && BwdVariant::enabled().contains(&Self::BASE) {
                Self::ALL.to_vec()
            } else {
                Vec::new()
            }
        }
    }

    /// The backward at d = 64 (V rows `H·d` apart; `[qa, ka, va, qb, kb, vb]`, `[oa, ob, doa,
    /// dob]`) by [`BwdAblation::BASE`]'s kernel cut by `ablation`, under `plan` (`None`: the plain
    /// launcher's, [`SplitPlan::last_wave`]): the six gradients as
    /// [`joint_attention_bwd_with`] returns them.
    pub fn joint_attention_bwd_ablated(
        dev: &KernelDevice,
        [qa, ka, va, qb, kb, vb]: [&DevBuf<bf16>; 6],
        [oa, ob, doa, dob]: [&DevBuf<bf16>; 4],
        lse: &DevBuf<f32>,
        dims: AttnDims,
        ablation: BwdAblation,
        plan: Option<SplitPlan>,
    ) -> KernelResult<[DevBuf<bf16>; 6]> {
        if dims.d != 64 || !dev.has_wgmma() {
            return Err(KernelError::Invalid(format!(
                "joint attention: the ablated backward needs wgmma and d = 64 (d = {} on {})",
                dims.d,
                dev.name()
            )));
        }
        let operands = [qa, ka, va, qb, kb, vb, oa, ob, doa, dob];
        let launch = BwdLaunch {
            plan,
            ablation: Some(ablation),
        };
        bwd_new_grads(dev, operands, lse, dims, BwdAblation::BASE, launch)
    }

    /// How the H3–H14 backward is launched: its [`SplitPlan`] (`None`: [`SplitPlan::last_wave`]
    /// on the device's SMs) and, for the bench, a cut of its work ([`BwdAblation`]).
    #[derive(Clone, Copy, Debug, Default)]
    struct BwdLaunch {
        plan: Option<SplitPlan>,
        ablation: Option<BwdAblation>,
    }

    /// The backward into six new gradient buffers (V rows `H·d` apart).
    fn bwd_new_grads(
        dev: &KernelDevice,
        operands: [&DevBuf<bf16>; 10],
        lse: &DevBuf<f32>,
        dims: AttnDims,
        variant: BwdVariant,
        launch: BwdLaunch,
    ) -> KernelResult<[DevBuf<bf16>; 6]> {
        let (na, nb) = (dims.numel_a(), dims.numel_b());
        let [dqa, dka, dva] = [0; 3].map(|_| dev.alloc::<bf16>(na));
        let [dqb, dkb, dvb] = [0; 3].map(|_| dev.alloc::<bf16>(nb));
        let grads = [dqa?, dka?, dva?, dqb?, dkb?, dvb?];
        let v_ld = dims.h * dims.d;
        bwd_planned(
            dev,
            operands,
            lse,
            dims,
            variant,
            v_ld,
            grads.each_ref(),
            launch,
            false,
        )?;
        Ok(grads)
    }

    /// The backward; `launch` for the H3–H14 kernels (its plan, `None`: [`SplitPlan::last_wave`]
    /// on the device's SMs; its cut, H6's), ignored by the others. With `dq32` (fast kernels only) dQ stays in the f32
    /// accumulators, which are returned (`grads`' dQ buffers are not written), else it is
    /// converted into them.
    #[allow(clippy::too_many_arguments)]
    fn bwd_planned(
        dev: &KernelDevice,
        [qa, ka, va, qb, kb, vb, oa, ob, doa, dob]: [&DevBuf<bf16>; 10],
        lse: &DevBuf<f32>,
        dims: AttnDims,
        variant: BwdVariant,
        v_ld: usize,
        grads: [&DevBuf<bf16>; 6],
        launch: BwdLaunch,
        dq32: bool,
    ) -> KernelResult<Option<(DevBuf<f32>, DevBuf<f32>)>> {
        let plan = launch.plan;
        let fast = has_fast_kernels(dims.d);
        if dq32 && !fast {
            return Err(KernelError::Invalid(format!(
                "joint attention: dQ in f32 accumulators needs the head dim 64 or 128 kernels, not {}",
                dims.d
            )));
        }
        let work = dims.validate()?;
        check_qkv(&dims, qa, ka, va, qb, kb, vb, v_ld)?;
        for (name, buf) in [("o_a", oa), ("do_a", doa)] {
            check_len(name, buf, dims.numel_a())?;
        }
        for (name, buf) in [("o_b", ob), ("do_b", dob)] {
            check_len(name, buf, dims.numel_b())?;
        }
        check_len("lse", lse, dims.numel_rows())?;
        let (na, nb) = (dims.numel_a(), dims.numel_b());
        if !work {
            // no (batch, head) pairs: nothing to convert, empty accumulators
            return Ok(if dq32 {
                Some((dev.alloc(na)?, dev.alloc(nb)?))
            } else {
                None
            });
        }
        let [dqa, dka, dva, dqb, dkb, dvb] = grads;
        // counted just before the launch that does the products (a profile credits it)
        let flops = joint_attention_flops(dims, true) as u64;
        if !has_fast_kernels(dims.d) {
            dev.count_matmul_flops(flops);
            bwd_naive(
                dev,
                [qa, ka, va, qb, kb, vb],
                [oa, ob, doa, dob],
                lse,
                grads,
                dims,
            )?;
            return Ok(None);
        }

        // Drow, and the dQ accumulators zeroed: 8 lanes per (batch, token, head) row, 32 rows
        // per block of 256 threads. `bwd_h3` reads −lse·log2 e in place of lse (`nlse`).
        let drow = dev.alloc::<f32>(dims.numel_rows())?;
        let dqa_acc = dev.alloc::<f32>(na)?;
        let dqb_acc = dev.alloc::<f32>(nb)?;
        let bwd_h3 = variant.resolve(dims.d).warp_specialized();
        let nlse = if bwd_h3 {
            Some(dev.alloc::<f32>(dims.numel_rows())?)
        } else {
            None
        };
        let rowdot = KernelArgs::new()
            .buf(&drow)
            .buf(&dqa_acc)
            .buf(&dqb_acc)
            .buf(oa)
            .buf(ob)
            .buf(doa)
            .buf(dob)
            .i32(dims.b as i32)
            .i32(dims.la as i32)
            .i32(dims.lb as i32)
            .i32(dims.h as i32)
            .i32(dims.d as i32)
            .buf(lse);
        dev.launch(
            "joint_attn_bwd_rowdot",
            LaunchCfg::linear(blocks_for(dims.numel_rows(), 32), 256),
            match &nlse {
                Some(n) => rowdot.buf(n),
                None => rowdot.null(),
            },
        )?;
        let lse = nlse.as_ref().unwrap_or(lse);

        let scale = dims.scale();
        // `bwd_h3` (cuda/attention_hopper.cu) takes the softmax scale as the constant 1/√d
        let built = if dims.d == 64 {
            0.125
        } else {
            1.0 / 128f32.sqrt()
        };
        if bwd_h3 && scale != built {
            return Err(KernelError::Invalid(format!(
                "joint_attention_bwd: the {variant:?} kernel is built for the softmax scale {built}, not {scale}"
            )));
        }
        dev.count_matmul_flops(flops);
        let name = match launch.ablation {
            Some(a) => format!("{}_abl{}", variant.kernel(dims.d), a.bits()),
            None => variant.kernel(dims.d) + vfused(dims, v_ld),
        };
        let resolved = variant.resolve(dims.d);
        let maps = if resolved.copies_by_tma() {
            let operands = [qa, ka, va, doa, qb, kb, vb, dob];
            bwd_maps(dev, operands, [&dqa_acc, &dqb_acc], dims, v_ld, resolved)?
        } else {
            Vec::new()
        };
        // TMA's kernels take the maps after the others' last argument
        let with_maps = |args: KernelArgs| {
            if maps.is_empty() {
                args
            } else {
                args.maps(&maps)
            }
        };
        let threads = variant.threads(dims.d);
        let shared = variant.shared_bytes(dims.d);
        let args = bwd_operands(
            KernelArgs::new()
                .buf(dka)
                .buf(dva)
                .buf(dkb)
                .buf(dvb)
                .buf(&dqa_acc)
                .buf(&dqb_acc),
            [qa, ka, va, doa, qb, kb, vb, dob],
            lse,
        )
        .buf(&drow)
        .i32(dims.la as i32)
        .i32(dims.lb as i32)
        .i32(dims.h as i32)
        .f32(scale * std::f32::consts::LOG2_E)
        .f32(scale);
        match variant.split_units(dims) {
            None => {
                let grid =
                    LaunchCfg::grid2(dims.tiles(BWD_KEYS), (dims.b * dims.h) as u32, threads);
                dev.launch(&name, grid.with_shared(shared), args)?;
            }
            Some((units, query_tiles)) => {
                let plan = plan.unwrap_or_else(|| {
                    SplitPlan::last_wave(units, dev.sm_count() as u32, query_tiles)
                });
                plan.check(units, query_tiles)?;
                let grid = LaunchCfg::linear(plan.blocks(units), threads).with_shared(shared);
                if !plan.is_split(units) {
                    let args = args.null().i32(units as i32).i32(1);
                    dev.launch(&name, grid, with_maps(args))?;
                } else {
                    // Each piece's keys: dK (scaled) and then dV, d columns of f32.
                    let split_units = units - plan.split_from;
                    let kvpart = dev.alloc::<f32>(
                        (split_units * plan.splits) as usize * 2 * BWD_KEYS * dims.d,
                    )?;
                    let args = args
                        .buf(&kvpart)
                        .i32(plan.split_from as i32)
                        .i32(plan.splits as i32);
                    dev.launch(&name, grid, with_maps(args))?;
                    dev.launch(
                        &format!(
                            "joint_attn_bwd_split_combine_d{}{}",
                            dims.d,
                            vfused(dims, v_ld)
                        ),
                        LaunchCfg::linear(split_units, 256),
                        KernelArgs::new()
                            .buf(dka)
                            .buf(dva)
                            .buf(dkb)
                            .buf(dvb)
                            .buf(&kvpart)
                            .i32(dims.la as i32)
                            .i32(dims.lb as i32)
                            .i32(dims.h as i32)
                            .i32(plan.split_from as i32)
                            .i32(plan.splits as i32),
                    )?;
                }
            }
        }

        if dq32 {
            return Ok(Some((dqa_acc, dqb_acc)));
        }
        dq_convert(dev, [dqa, dqb], [&dqa_acc, &dqb_acc], scale)?;
        Ok(None)
    }

    /// `dq = bf16(scale · acc)` for both streams in one launch (`joint_attn_dq_convert`, 8
    /// elements a thread): the backward's last step unless its dQ stays in the accumulators.
    /// Each stream's length a multiple of 8 (the kernels' head dims are).
    pub fn dq_convert(
        dev: &KernelDevice,
        [dqa, dqb]: [&DevBuf<bf16>; 2],
        [acc_a, acc_b]: [&DevBuf<f32>; 2],
        scale: f32,
    ) -> KernelResult<()> {
        let (na, nb) = (acc_a.len(), acc_b.len());
        check_len("dq_a", dqa, na)?;
        check_len("dq_b", dqb, nb)?;
        if na % 8 != 0 || nb % 8 != 0 {
            return Err(KernelError::Invalid(format!(
                "dq_convert: lengths {na}, {nb} are not multiples of 8"
            )));
        }
        if na + nb == 0 {
            return Ok(());
        }
        dev.launch(
            "joint_attn_dq_convert",
            LaunchCfg::linear(blocks_for((na + nb) / 8, 256), 256),
            KernelArgs::new()
                .buf(dqa)
                .buf(dqb)
                .buf(acc_a)
                .buf(acc_b)
                .i64(na as i64)
                .i64(nb as i64)
                .f32(scale),
        )
    }

    /// The operands every backward kernel reads, in their order: q, k, v, dO of stream a, the
    /// same of stream b, the log-sum-exp.
    fn bwd_operands(
        args: KernelArgs,
        streams: [&DevBuf<bf16>; 8],
        lse: &DevBuf<f32>,
    ) -> KernelArgs {
        streams.into_iter().fold(args, |a, b| a.buf(b)).buf(lse)
    }

    /// The fallback backward (head dims other than 64 and 128): Drow = Σ P·dP per query row (as
    /// the CPU kernel; `o_a`, `o_b` are not read), then dQ per query row and dK, dV per key row,
    /// each over all rows of the other side.
    fn bwd_naive(
        dev: &KernelDevice,
        [qa, ka, va, qb, kb, vb]: [&DevBuf<bf16>; 6],
        [_oa, _ob, doa, dob]: [&DevBuf<bf16>; 4],
        lse: &DevBuf<f32>,
        grads: [&DevBuf<bf16>; 6],
        dims: AttnDims,
    ) -> KernelResult<()> {
        let [dqa, dka, dva, dqb, dkb, dvb] = grads;
        let drow = dev.alloc::<f32>(dims.numel_rows())?;
        let scale = dims.scale();
        // The three kernels read the same operands and sizes: (out…, q/k/v/dO of a, of b, lse,
        // [Drow,] La, Lb, H, D, scale·log2 e[, scale]).
        let operands = |args| bwd_operands(args, [qa, ka, va, doa, qb, kb, vb, dob], lse);
        let sizes = |args: KernelArgs| {
            args.i32(dims.la as i32)
                .i32(dims.lb as i32)
                .i32(dims.h as i32)
                .i32(dims.d as i32)
                .f32(scale * std::f32::consts::LOG2_E)
        };
        dev.launch(
            "joint_attn_bwd_naive_drow",
            dims.naive_cfg(),
            sizes(operands(KernelArgs::new().buf(&drow))),
        )?;
        let tail = |args: KernelArgs| sizes(operands(args).buf(&drow)).f32(scale);
        dev.launch(
            "joint_attn_bwd_naive_dq",
            dims.naive_cfg(),
            tail(KernelArgs::new().buf(dqa).buf(dqb)),
        )?;
        dev.launch(
            "joint_attn_bwd_naive_dkdv",
            dims.naive_cfg(),
            tail(KernelArgs::new().buf(dka).buf(dva).buf(dkb).buf(dvb)),
        )
    }

    /// FLOPs of one call in the FlashAttention convention (PERF.md): forward
    /// `4·Lt²·d·H·B` with `Lt = La+Lb` (two GEMMs of `2·Lt²·d` per head), backward 2.5× that.
    pub fn joint_attention_flops(dims: AttnDims, backward: bool) -> f64 {
        let lt = dims.lt() as f64;
        let fwd = 4.0 * lt * lt * dims.d as f64 * dims.h as f64 * dims.b as f64;
        if backward {
            2.5 * fwd
        } else {
            fwd
        }
    }
}
