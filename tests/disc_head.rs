//! The discriminator head: shapes, gradients of its weights, and the frozen-backbone path that the
//! generator's GAN term uses (input gradients, no weight gradients).

mod common;

use advdmd::mmdit::init::init_params;
use advdmd::mmdit::{Mmdit, MmditConfig, MmditInputs};
use advdmd::ops::{conv2d, group_norm, mean_pool_spatial, Conv2dSpec};
use advdmd::train::disc_head::{discriminator_logits, DiscHead};
use advdmd::{Rng, Tensor, Var};
use common::randn;

#[test]
fn head_gives_one_logit_per_sample_and_its_weights_get_gradients() {
    let head = DiscHead::init(12, &mut Rng::new(1));
    assert_eq!(head.groups, 6);
    let f = Var::input(randn(&[2, 20, 12], 2));
    let logits = head.forward(&f, 4, 5);
    assert_eq!(logits.shape(), [2]);
    // The same logits by hand: tokens → grid, conv 4×4 s2 p1, GN, LeakyReLU, conv 1×1, mean.
    let p = |n: &str| Var::constant(head.params.param(n).value());
    let grid = Var::constant(f.value().clone())
        .reshape(&[2, 4, 5, 12])
        .permute(&[0, 3, 1, 2]);
    let h = conv2d(
        &grid,
        &p("conv1.weight"),
        Some(&p("conv1.bias")),
        Conv2dSpec::new((2, 2), (1, 1)),
    );
    assert_eq!(h.shape(), [2, 6, 2, 2]);
    let h = group_norm(&h, 6, &p("norm.weight"), &p("norm.bias"), 1e-5).leaky_relu(0.2);
    let h = conv2d(
        &h,
        &p("conv2.weight"),
        Some(&p("conv2.bias")),
        Conv2dSpec::new((1, 1), (0, 0)),
    );
    let want = mean_pool_spatial(&h).reshape(&[2]);
    assert_eq!(logits.value().f32s(), want.value().f32s());
    // Trainable head: every weight and the input get a gradient (the chain's gradients are
    // checked by finite differences in tests/conv.rs, disc_head_chain_grad).
    let g = logits.sum().backward();
    assert!(head.params.iter().all(|(_, p)| p.grad().is_some()));
    assert!(g.get(&f).unwrap().f32s().iter().any(|&v| v != 0.0));
}

#[test]
fn frozen_discriminator_passes_gradients_to_its_input_only() {
    let cfg = MmditConfig {
        depth: 3,
        hidden: 16,
        heads: 2,
        head_dim: 8,
        patch: 2,
        in_channels: 3,
        out_channels: 3,
        pos_embed_max_size: 4,
        context_dim: 8,
        pooled_dim: 8,
        freq_dim: 256,
        mlp_hidden: 64,
        qk_norm: true,
        dual_attention_blocks: vec![],
    };
    let mut rng = Rng::new(5);
    let backbone = Mmdit::new(cfg.clone(), init_params(&cfg, &mut rng));
    for (n, p) in backbone.params.iter() {
        if n.contains("adaLN") {
            p.set_value(Tensor::randn(p.value().shape(), &mut rng).map(|v| 0.1 * v));
        }
    }
    let head = DiscHead::init(16, &mut rng);
    backbone.params.set_trainable(false);
    head.params.set_trainable(false);
    let x = Var::input(Tensor::randn(&[2, 3, 8, 8], &mut rng));
    let (pooled, ctx) = (
        Var::constant(Tensor::randn(&[2, 8], &mut rng)),
        Var::constant(Tensor::randn(&[2, 5, 8], &mut rng)),
    );
    let logits = discriminator_logits(
        &backbone,
        &head,
        &MmditInputs {
            x: &x,
            timestep: &[300.0, 700.0],
            pooled: &pooled,
            context: &ctx,
        },
        1,
    );
    assert_eq!(logits.shape(), [2]);
    // The generator's GAN term: mean softplus(−D).
    let g = logits.scale(-1.0).softplus().mean().backward();
    assert!(
        g.get(&x).unwrap().f32s().iter().any(|&v| v != 0.0),
        "no gradient reached the input"
    );
    assert!(backbone.params.iter().all(|(_, p)| p.grad().is_none()));
    assert!(head.params.iter().all(|(_, p)| p.grad().is_none()));
}
