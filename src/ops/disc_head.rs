//! Differentiable ops of the discriminator head (ALGORITHM.md §2) besides its convolutions
//! (`ops::conv`) and LeakyReLU (`ops::elementwise`): GroupNorm and the global mean pool.

use crate::autograd::{record, Var};
use crate::kernels::disc_head as k;

/// GroupNorm over `x [B, C, *spatial]` (any number of spatial dims, including none) with
/// `groups` dividing C, affine `weight [C]` and `bias [C]`, biased variance plus `eps`.
pub fn group_norm(x: &Var, groups: usize, weight: &Var, bias: &Var, eps: f32) -> Var {
    let (xv, wv) = (x.value().clone(), weight.value().clone());
    let (y, mean, rstd) = k::group_norm_fwd(&xv, groups, &wv, bias.value(), eps);
    record("group_norm", &[x, weight, bias], y, move |g, need| {
        // One pass yields all three; dweight and dbias are cheap next to dx.
        let (dx, dw, db) = k::group_norm_bwd(&xv, &mean, &rstd, &wv, g, groups);
        vec![
            need[0].then_some(dx),
            need[1].then_some(dw),
            need[2].then_some(db),
        ]
    })
}

/// Mean over the spatial dims: `[B, C, *spatial]` → `[B, C]`.
pub fn mean_pool_spatial(x: &Var) -> Var {
    let shape = x.shape().to_vec();
    record(
        "mean_pool_spatial",
        &[x],
        k::mean_pool_spatial(x.value()),
        move |g, _| vec![Some(k::mean_pool_spatial_bwd(g, &shape))],
    )
}
