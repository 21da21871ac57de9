//! CPU MMDiT benchmarks: forward and forward+backward of a Shapes-sized model (the committed
//! teacher's configuration: hidden 128, 4 blocks, 2 heads of 64, 3-channel 16×16 pixels → 64
//! image tokens; 16 text tokens, batch 32), and one SD3.5-medium-sized joint block (hidden 1536,
//! 24 heads, MMDiT-X dual attention) at 256 image tokens + 154 context tokens, batch 1.
//!
//! The models and inputs come from `advdmd::bench::presets`, as `advdmd bench mmdit` builds them.

use advdmd::autograd::no_grad;
use advdmd::bench::presets::{random_mmdit, ModelSpec, Preset};
use advdmd::mmdit::MmditInputs;
use advdmd::{Rng, Tensor, Var};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::path::Path;
use std::time::Duration;

fn bench_shapes_model(c: &mut Criterion) {
    advdmd::device::tune_allocator();
    let mut g = c.benchmark_group("mmdit_shapes");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    let teacher = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/shapes-teacher");
    let mut spec = ModelSpec::new(Preset::Shapes, None, &teacher).expect("the committed teacher");
    // 16 text tokens (the teacher encodes 10) keeps the figures comparable with docs/perf-log.md.
    spec.text_tokens = 16;
    let model = spec.random_model(0);
    let b = 32;
    let inputs = spec.random_inputs(b, 1);
    let (x, ctx, pooled, t) = (inputs.x, inputs.context, inputs.pooled, inputs.timestep);
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
    // Depth 2 so that block 0 is a full (not context-pre-only) dual-attention block. A joint
    // block never reads the position grid, so a small one spares building SD3.5-medium's 0.9 GB.
    let mut cfg = Preset::Sd35Medium.sd3_config().expect("an SD3 preset");
    cfg.depth = 2;
    cfg.dual_attention_blocks = vec![0];
    cfg.pos_embed_max_size = 32;
    let model = random_mmdit(&cfg, 1);
    let mut rng = Rng::new(1);
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
