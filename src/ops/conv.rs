//! Differentiable 2-D convolution (NCHW, weights `[O, C, kh, kw]`) and the `im2col` patch
//! extraction on [`Var`]. The convolution records one fused node (im2col + GEMM) rather than
//! composing im2col with `linear`, which would need a permute copy to get back to NCHW and would
//! keep the large column tensor alive on the tape.

use crate::autograd::{record, Var};
use crate::kernels::conv as k;

pub use crate::kernels::conv::Conv2dSpec;

/// `x [B, C, H, W]` convolved with `weight [O, C, kh, kw]` plus optional `bias [O]` →
/// `[B, O, OH, OW]`, OH = (H + 2·ph − kh)/sh + 1 (zero padding).
pub fn conv2d(x: &Var, weight: &Var, bias: Option<&Var>, spec: Conv2dSpec) -> Var {
    let (xv, wv) = (x.value().clone(), weight.value().clone());
    let y = k::conv2d(&xv, &wv, bias.map(|b| b.value()), spec);
    let mut inputs = vec![x, weight];
    inputs.extend(bias);
    let has_bias = bias.is_some();
    record("conv2d", &inputs, y, move |g, need| {
        let want_bias = has_bias && need[2];
        let (dx, dw, db) = k::conv2d_backward(&xv, &wv, g, spec, (need[0], need[1], want_bias));
        let mut grads = vec![dx, dw];
        if has_bias {
            grads.push(db);
        }
        grads
    })
}

impl Var {
    /// Patches of `[B, C, H, W]` as rows: `[B, OH·OW, C·kh·kw]` in (c, kh, kw) order, so that
    /// `linear` with a conv weight reshaped to `[O, C·kh·kw]` performs the convolution.
    pub fn im2col(&self, kh: usize, kw: usize, spec: Conv2dSpec) -> Var {
        let shape = self.shape().to_vec();
        record(
            "im2col",
            &[self],
            k::im2col(self.value(), kh, kw, spec),
            move |g, _| vec![Some(k::col2im(g, &shape, kh, kw, spec))],
        )
    }
}
