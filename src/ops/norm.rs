//! Normalisation ops of the MMDiT: adaLN modulate (LayerNorm without affine + shift/scale), the
//! gated residual, and per-head RMSNorm.

use crate::autograd::{record, Var};
use crate::kernels::{adaln, qknorm};
use std::sync::Arc;

/// LayerNorm eps of SD3's blocks and final layer.
pub const LN_EPS: f32 = 1e-6;

/// `LN(x)·(1+scale)+shift`: `x [B, L, D]`, `shift, scale [B, D]`.
pub fn adaln_modulate(x: &Var, shift: &Var, scale: &Var, eps: f32) -> Var {
    let (y, stats) = adaln::adaln_modulate_fwd(x.value(), shift.value(), scale.value(), eps);
    let (xv, sc) = (x.value().clone(), scale.value().clone());
    let stats = Arc::new(stats);
    record("adaln_modulate", &[x, shift, scale], y, move |g, need| {
        let (dx, dshift, dscale) = adaln::adaln_modulate_bwd(&xv, &sc, &stats, g);
        vec![
            need[0].then_some(dx),
            need[1].then_some(dshift),
            need[2].then_some(dscale),
        ]
    })
}

/// LayerNorm over the last dim without affine parameters, for `[B, L, D]` (eps 1e-6).
pub fn layer_norm(x: &Var) -> Var {
    let &[b, _, d] = x.shape() else {
        panic!("layer_norm: expected [B, L, D], got {:?}", x.shape())
    };
    let zero = Var::constant(crate::tensor::Tensor::zeros(&[b, d]));
    adaln_modulate(x, &zero, &zero, LN_EPS)
}

/// `x + gate·y`: `x, y [B, L, D]`, `gate [B, D]`.
pub fn gated_residual(x: &Var, gate: &Var, y: &Var) -> Var {
    let out = adaln::gated_residual_fwd(x.value(), gate.value(), y.value());
    let (gv, yv) = (gate.value().clone(), y.value().clone());
    record("gated_residual", &[x, gate, y], out, move |g, need| {
        let (dgate, dy) = if need[1] || need[2] {
            let (a, b) = adaln::gated_residual_bwd(&gv, &yv, g);
            (Some(a), Some(b))
        } else {
            (None, None)
        };
        vec![
            need[0].then(|| g.clone()),
            dgate.filter(|_| need[1]),
            dy.filter(|_| need[2]),
        ]
    })
}

/// RMSNorm over the last dim with a learned weight (SD3.5's per-head `ln_q` / `ln_k`).
pub fn rms_norm(x: &Var, weight: &Var, eps: f32) -> Var {
    let (y, rstd) = qknorm::rms_norm_fwd(x.value(), weight.value(), eps);
    let (xv, wv) = (x.value().clone(), weight.value().clone());
    record("rms_norm", &[x, weight], y, move |g, need| {
        let (dx, dw) = qknorm::rms_norm_bwd(&xv, &wv, &rstd, g);
        vec![need[0].then_some(dx), need[1].then_some(dw)]
    })
}
