//! The discriminator head on the fake score's image-token features (ALGORITHM.md §2, the MMDiT
//! adaptation of DMD2's classification branch): tokens after block b → `[B, D, h, w]` grid →
//! Conv 4×4 s2 p1 (D → D/2) → GroupNorm → LeakyReLU(0.2) → Conv 1×1 (D/2 → 1) → mean pool →
//! one logit per sample. σ and the prompt reach it through the backbone's adaLN and attention.

use crate::autograd::Var;
use crate::mmdit::{Mmdit, MmditInputs};
use crate::nn::ParamMap;
use crate::ops::disc_head::{group_norm, mean_pool_spatial};
use crate::ops::{conv2d, Conv2dSpec};
use crate::tensor::{Rng, Tensor};

pub struct DiscHead {
    pub params: ParamMap,
    pub hidden: usize,
    pub groups: usize,
}

/// The largest group count ≤ 32 that divides `channels`.
fn group_count(channels: usize) -> usize {
    (1..=32.min(channels))
        .rev()
        .find(|g| channels % g == 0)
        .unwrap_or(1)
}

impl DiscHead {
    /// A fresh head for backbone width `d` (Xavier-uniform convolutions, zero biases, unit GN).
    pub fn init(d: usize, rng: &mut Rng) -> DiscHead {
        let h = (d / 2).max(1);
        let mut params = ParamMap::new();
        let xavier = |shape: &[usize], rng: &mut Rng| {
            let fan_in: usize = shape[1..].iter().product();
            let fan_out = shape[0] * shape[2..].iter().product::<usize>();
            let b = (6.0 / (fan_in + fan_out) as f32).sqrt();
            Tensor::rand_uniform(shape, -b, b, rng)
        };
        params.insert("conv1.weight", xavier(&[h, d, 4, 4], rng));
        params.insert("conv1.bias", Tensor::zeros(&[h]));
        params.insert("norm.weight", Tensor::ones(&[h]));
        params.insert("norm.bias", Tensor::zeros(&[h]));
        params.insert("conv2.weight", xavier(&[1, h, 1, 1], rng));
        params.insert("conv2.bias", Tensor::zeros(&[1]));
        DiscHead {
            params,
            hidden: h,
            groups: group_count(h),
        }
    }

    /// Logits `[B]` from image-token features `[B, gh·gw, D]` laid out row-major over the grid.
    pub fn forward(&self, features: &Var, gh: usize, gw: usize) -> Var {
        let &[b, n, d] = features.shape() else {
            panic!(
                "disc head: features must be [B, tokens, D], got {:?}",
                features.shape()
            )
        };
        assert_eq!(n, gh * gw, "disc head: {n} tokens for a {gh}x{gw} grid");
        let grid = features.reshape(&[b, gh, gw, d]).permute(&[0, 3, 1, 2]);
        let p = |n: &str| self.params.var(n);
        let h = conv2d(
            &grid,
            &p("conv1.weight"),
            Some(&p("conv1.bias")),
            Conv2dSpec::new((2, 2), (1, 1)),
        );
        let h =
            group_norm(&h, self.groups, &p("norm.weight"), &p("norm.bias"), 1e-5).leaky_relu(0.2);
        let h = conv2d(
            &h,
            &p("conv2.weight"),
            Some(&p("conv2.bias")),
            Conv2dSpec::new((1, 1), (0, 0)),
        );
        mean_pool_spatial(&h).reshape(&[b])
    }
}

/// `D(x, σ, c)`: the backbone's image tokens after `block` (stopping the forward there), then the
/// head. Freeze the backbone's and head's parameters for the generator's GAN term: input
/// gradients still flow.
pub fn discriminator_logits(
    backbone: &Mmdit,
    head: &DiscHead,
    inputs: &MmditInputs,
    block: usize,
) -> Var {
    let &[_, _, h, w] = inputs.x.shape() else {
        panic!("discriminator input must be [B, C, H, W]")
    };
    let p = backbone.config.patch;
    let features = backbone
        .forward_with(inputs, Some(block), true)
        .features
        .expect("features were requested");
    head.forward(&features, h / p, w / p)
}
