//! CPU op benchmarks: GEMM throughput at 512³ and at the Shapes model's linear shapes (forward and
//! both backward GEMMs), and joint attention forward+backward. Throughput is reported in FLOP/s
//! (criterion's "elements" are FLOPs here).

use advdmd::autograd::backward;
use advdmd::kernels::gemm::{sgemm, MatRef};
use advdmd::ops::attention::joint_attention;
use advdmd::{Rng, Tensor, Var};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

fn bench_gemm(c: &mut Criterion) {
    advdmd::device::tune_allocator();
    let mut g = c.benchmark_group("gemm");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let n = 512;
    let (a, b) = (randn(n * n, 1), randn(n * n, 2));
    let mut out = vec![0f32; n * n];
    g.throughput(Throughput::Elements((2 * n * n * n) as u64));
    g.bench_function("square_512", |bench| {
        bench.iter(|| {
            sgemm(
                n,
                n,
                n,
                1.0,
                MatRef::rows(&a, n),
                MatRef::rows(&b, n),
                &mut out,
                n,
                false,
                true,
            );
            black_box(&out);
        })
    });
    g.finish();
}

/// The Shapes teacher's linears (hidden 128, 64 image tokens + 16 text tokens, batch 128):
/// rows M = 128·80, and the (in → out) of qkv, proj, fc1, fc2. Each shape is timed as the
/// forward GEMM y = x·Wᵀ and the two backward GEMMs dx = dy·W and dW = dyᵀ·x.
fn bench_linear_shapes(c: &mut Criterion) {
    let mut g = c.benchmark_group("shapes_linear");
    g.sample_size(10).measurement_time(Duration::from_secs(2));
    let m = 128 * 80;
    for (name, k, n) in [
        ("qkv", 128, 384),
        ("proj", 128, 128),
        ("fc1", 128, 512),
        ("fc2", 512, 128),
    ] {
        let (x, w, dy) = (randn(m * k, 3), randn(n * k, 4), randn(m * n, 5));
        let mut y = vec![0f32; m * n];
        let mut dx = vec![0f32; m * k];
        let mut dw = vec![0f32; n * k];
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        g.bench_function(
            BenchmarkId::new("fwd", format!("{name}_{m}x{k}->{n}")),
            |bench| {
                bench.iter(|| {
                    sgemm(
                        m,
                        n,
                        k,
                        1.0,
                        MatRef::rows(&x, k),
                        MatRef::rows_t(&w, k),
                        &mut y,
                        n,
                        false,
                        true,
                    )
                })
            },
        );
        g.bench_function(
            BenchmarkId::new("bwd_dx", format!("{name}_{m}x{k}->{n}")),
            |bench| {
                bench.iter(|| {
                    sgemm(
                        m,
                        k,
                        n,
                        1.0,
                        MatRef::rows(&dy, n),
                        MatRef::rows(&w, k),
                        &mut dx,
                        k,
                        false,
                        true,
                    )
                })
            },
        );
        g.bench_function(
            BenchmarkId::new("bwd_dw", format!("{name}_{m}x{k}->{n}")),
            |bench| {
                bench.iter(|| {
                    sgemm(
                        n,
                        k,
                        m,
                        1.0,
                        MatRef::rows_t(&dy, n),
                        MatRef::rows(&x, k),
                        &mut dw,
                        k,
                        false,
                        true,
                    )
                })
            },
        );
    }
    g.finish();
}

/// Joint attention forward + backward through the autograd op. FLOPs by the FlashAttention
/// convention: forward 4·L²·d·heads·B, backward 2.5× that.
fn bench_attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for (name, b, h, la, lb, d) in [
        ("shapes_b128", 128, 2, 16, 64, 64),
        ("sd3_512px_1head", 1, 1, 154, 1024, 64),
    ] {
        let t = |l: usize, s: u64| Tensor::from_vec(randn(b * l * h * d, s), &[b, l, h, d]);
        let ins: Vec<Tensor> = vec![t(la, 1), t(la, 2), t(la, 3), t(lb, 4), t(lb, 5), t(lb, 6)];
        let l = (la + lb) as u64;
        g.throughput(Throughput::Elements(
            4 * l * l * d as u64 * h as u64 * b as u64 * 7 / 2,
        ));
        g.bench_function(BenchmarkId::new("fwd_bwd", name), |bench| {
            bench.iter(|| {
                let v: Vec<Var> = ins.iter().cloned().map(Var::input).collect();
                let (oa, ob) = joint_attention(&v[0], &v[1], &v[2], &v[3], &v[4], &v[5]);
                let ga = Tensor::ones(oa.shape());
                let gb = Tensor::ones(ob.shape());
                black_box(backward(&[(&oa, ga), (&ob, gb)]));
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_gemm, bench_linear_shapes, bench_attention);
criterion_main!(benches);
