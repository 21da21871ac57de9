//! CPU MMDiT benchmarks: forward and forward+backward of a Shapes-sized model (hidden 128,
//! 4 blocks, 2 heads of 64, 3-channel 16×16 pixels → 64 image tokens, 16 text tokens, batch 32),
//! and one SD3.5-medium-sized joint block (hidden 1536, 24 heads, MMDiT-X dual attention) at
//! 256 image tokens + 154 context tokens, batch 1.

use advdmd::autograd::no_grad;
use advdmd::mmdit::init::init_params;
use advdmd::mmdit::{Mmdit, MmditConfig, MmditInputs};
use advdmd::{Rng, Tensor, Var};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::time::Duration;

fn config(
    depth: usize,
    hidden: usize,
    head_dim: usize,
    channels: usize,
    ctx: usize,
    dual: Vec<usize>,
) -> MmditConfig {
    MmditConfig {
        depth,
        hidden,
        heads: hidden / head_dim,
        head_dim,
        patch: 2,
        in_channels: channels,
        out_channels: channels,
        pos_embed_max_size: 32,
        context_dim: ctx,
        pooled_dim: ctx,
        freq_dim: 256,
        mlp_hidden: 4 * hidden,
        qk_norm: true,
        dual_attention_blocks: dual,
    }
}

fn bench_shapes_model(c: &mut Criterion) {
    advdmd::device::tune_allocator();
    let mut g = c.benchmark_group("mmdit_shapes");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    let cfg = config(4, 128, 64, 3, 128, vec![]);
    let mut rng = Rng::new(0);
    let model = Mmdit::new(cfg.clone(), init_params(&cfg, &mut rng));
    let b = 32;
    let x = Tensor::randn(&[b, 3, 16, 16], &mut rng);
    let ctx = Tensor::randn(&[b, 16, 128], &mut rng);
    let pooled = Tensor::randn(&[b, 128], &mut rng);
    let t: Vec<f32> = (0..b).map(|i| 1000.0 * i as f32 / b as f32).collect();
    g.bench_function("forward_b32", |bench| {
        bench.iter(|| {
            let _ng = no_grad();
            let (xv, cv, pv) = (
                Var::constant(x.clone()),
                Var::constant(ctx.clone()),
                Var::constant(pooled.clone()),
            );
            black_box(model.forward(&MmditInputs {
                x: &xv,
                timestep: &t,
                pooled: &pv,
                context: &cv,
            }));
        })
    });
    g.bench_function("forward_backward_b32", |bench| {
        bench.iter(|| {
            let (xv, cv, pv) = (
                Var::input(x.clone()),
                Var::constant(ctx.clone()),
                Var::constant(pooled.clone()),
            );
            let out = model.forward(&MmditInputs {
                x: &xv,
                timestep: &t,
                pooled: &pv,
                context: &cv,
            });
            black_box(out.mean().backward());
            model.params.zero_grad();
        })
    });
    g.finish();
}

fn bench_sd35m_block(c: &mut Criterion) {
    let mut g = c.benchmark_group("mmdit_sd35m_block");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    // Depth 2 so that block 0 is a full (not context-pre-only) dual-attention block.
    let cfg = config(2, 1536, 64, 16, 4096, vec![0]);
    let mut rng = Rng::new(1);
    let model = Mmdit::new(
        cfg,
        init_params(&config(2, 1536, 64, 16, 4096, vec![0]), &mut rng),
    );
    let x = Tensor::randn(&[1, 256, 1536], &mut rng);
    let ctx = Tensor::randn(&[1, 154, 1536], &mut rng);
    let cvec = Tensor::randn(&[1, 1536], &mut rng);
    g.bench_function("forward_256tok", |bench| {
        bench.iter(|| {
            let _ng = no_grad();
            let (xv, cv, sv) = (
                Var::constant(x.clone()),
                Var::constant(ctx.clone()),
                Var::constant(cvec.clone()),
            );
            black_box(model.joint_block(0, &xv, &cv, &sv));
        })
    });
    g.bench_function("forward_backward_256tok", |bench| {
        bench.iter(|| {
            let (xv, cv, sv) = (
                Var::input(x.clone()),
                Var::input(ctx.clone()),
                Var::constant(cvec.clone()),
            );
            let (xo, co) = model.joint_block(0, &xv, &cv, &sv);
            black_box(xo.mean().add(&co.mean()).backward());
            model.params.zero_grad();
        })
    });
    g.finish();
}

criterion_group!(benches, bench_shapes_model, bench_sd35m_block);
criterion_main!(benches);
