//! Differentiable joint attention of the MMDiT's two token streams (MMDIT.md §A.3), over the
//! kernels in [`crate::kernels::attention`].

use crate::autograd::{record_multi, Var};
use crate::kernels::attention::{joint_attention_bwd_masked, joint_attention_fwd};

/// `softmax(Q·Kᵀ/√d)·V` over the tokens of both streams, split back per stream.
///
/// All six inputs are `[B, L, H, d]` (the qkv linear's layout, no permute); stream `a` (text) may
/// be empty and then this is plain self-attention over `b`. Returns `(o_a, o_b)` shaped like
/// `q_a` and `q_b`. The backward keeps only the inputs and one log-sum-exp per query
/// row: the probabilities are recomputed, never stored.
pub fn joint_attention(
    q_a: &Var,
    k_a: &Var,
    v_a: &Var,
    q_b: &Var,
    k_b: &Var,
    v_b: &Var,
) -> (Var, Var) {
    let inputs = [q_a, k_a, v_a, q_b, k_b, v_b].map(|v| v.value().clone());
    let out = joint_attention_fwd(
        &inputs[0], &inputs[1], &inputs[2], &inputs[3], &inputs[4], &inputs[5],
    );
    let lse = out.lse;
    let mut outs = record_multi(
        "joint_attention",
        &[q_a, k_a, v_a, q_b, k_b, v_b],
        vec![out.o_a, out.o_b],
        move |g, need| {
            let [q_a, k_a, v_a, q_b, k_b, v_b] = &inputs;
            let need: [bool; 6] = need.try_into().expect("six inputs");
            joint_attention_bwd_masked(q_a, k_a, v_a, q_b, k_b, v_b, &lse, &g[0], &g[1], need)
                .into()
        },
    );
    let o_b = outs.pop().expect("two outputs");
    let o_a = outs.pop().expect("two outputs");
    (o_a, o_b)
}
