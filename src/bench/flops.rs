//! The analytic FLOP count of one MMDiT call, the numerator of every TFLOP/s and MFU figure.
//!
//! Only matrix products count, each `M×K · K×N` as `2·M·N·K`: the linear layers (weights applied
//! to every token of their stream, or to the one conditioning vector per sample) and the two
//! attention products `Q·Kᵀ` and `P·V`. Norms, activations, softmax, modulation and residual
//! arithmetic are O(tokens·D) and left out (well under 1 % at SD3 sizes). With `B` samples,
//! `n` image tokens, `l` text tokens, hidden `D`, MLP width `F`, `H` heads of `d`:
//!
//! * embeddings: patch `2·B·n·(C·p²)·D`; timestep `2·B·(f·D + D²)`; pooled `2·B·(y·D + D²)`;
//!   context `2·B·l·E·D` (f = frequency width, y = pooled width, E = context width);
//! * per joint block: adaLN `2·B·D·(c_x + c_c)·D` with `c_x` = 6 chunks (9 for MMDiT-X dual
//!   blocks) and `c_c` = 6 (2 in the context-pre-only last block); x stream `2·B·n·(3D² + D² +
//!   2·D·F)` (qkv, proj, MLP); context stream `2·B·l·3D²` plus, except in the last block,
//!   `2·B·l·(D² + 2·D·F)`; joint attention `4·B·H·(n+l)²·d`; a dual block adds `2·B·n·4D²`
//!   (attn2 qkv + proj) and `4·B·H·n²·d` (image-only attention);
//! * final layer: adaLN `2·B·D·2D`, projection `2·B·n·D·(p²·C_out)`.
//!
//! The backward is counted as 2× the forward (each product's input gradient and weight gradient
//! are one product of the same size each), so forward+backward is 3× the forward. This is the
//! usual `6·params·tokens` training convention; the attention backward's real cost is nearer
//! 2.5× its forward (FlashAttention's count, used by `bench kernels`), so at long sequences the
//! training TFLOP/s figure is slightly conservative.

use crate::mmdit::MmditConfig;

/// The token counts of one MMDiT call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallShape {
    pub batch: usize,
    /// `(H/p)·(W/p)` patches.
    pub image_tokens: usize,
    /// Context (text) tokens.
    pub text_tokens: usize,
}

/// Forward FLOPs of one call (see the module comment for what counts).
pub fn mmdit_forward_flops(c: &MmditConfig, s: CallShape) -> u64 {
    let (b, n, l) = (s.batch as u64, s.image_tokens as u64, s.text_tokens as u64);
    let (d, f) = (c.hidden as u64, c.mlp_hidden as u64);
    let per_head = (c.heads * c.head_dim) as u64;
    let patch_in = (c.in_channels * c.patch * c.patch) as u64;
    let patch_out = (c.out_channels * c.patch * c.patch) as u64;

    let embeddings = 2 * b * n * patch_in * d
        + 2 * b * (c.freq_dim as u64 * d + d * d)
        + 2 * b * (c.pooled_dim as u64 * d + d * d)
        + 2 * b * l * c.context_dim as u64 * d;
    let blocks: u64 = (0..c.depth)
        .map(|i| {
            let pre_only = i + 1 == c.depth;
            let dual = c.dual_attention_blocks.contains(&i);
            let chunks = (if dual { 9 } else { 6 }) + if pre_only { 2 } else { 6 };
            let adaln = 2 * b * d * chunks * d;
            let x_stream = 2 * b * n * (4 * d * d + 2 * d * f);
            let ctx_stream = 2 * b * l * 3 * d * d
                + if pre_only {
                    0
                } else {
                    2 * b * l * (d * d + 2 * d * f)
                };
            let joint_attention = 4 * b * per_head * (n + l) * (n + l);
            let dual_attention = if dual {
                2 * b * n * 4 * d * d + 4 * b * per_head * n * n
            } else {
                0
            };
            adaln + x_stream + ctx_stream + joint_attention + dual_attention
        })
        .sum();
    let final_layer = 2 * b * d * 2 * d + 2 * b * n * d * patch_out;
    embeddings + blocks + final_layer
}

/// Forward + backward FLOPs of one call: 3× the forward (module comment).
pub fn mmdit_training_flops(c: &MmditConfig, s: CallShape) -> u64 {
    3 * mmdit_forward_flops(c, s)
}

/// FlashAttention's count for one joint-attention call: forward `4·B·H·(La+Lb)²·d`, backward
/// 2.5× that (five products of the forward's size: P recomputed, dV, dP, dQ, dK).
pub fn joint_attention_flops(
    batch: usize,
    heads: usize,
    tokens: usize,
    head_dim: usize,
    backward: bool,
) -> f64 {
    let fwd = 4.0 * batch as f64 * heads as f64 * (tokens as f64).powi(2) * head_dim as f64;
    if backward {
        2.5 * fwd
    } else {
        fwd
    }
}
