//! Fused joint attention on the kernel device (issue 7): forward and backward TFLOP/s at the
//! MMDiT shapes, FlashAttention convention (forward 4·Lq·Lk·d·heads·batch, backward 2.5×).
//! On a GPU: CUDA events, warm-up, median of repeats. Without one the same code runs once on the
//! emulator at a tiny shape (a smoke run; its times say nothing about speed).
//! `ADVDMD_ATTN_BENCH_JSON=path` also writes the results as JSON.

use advdmd::device::kernel::{DevBuf, KernelDevice, KernelResult};
use advdmd::kernels::attention::dev::{
    joint_attention_bwd, joint_attention_bwd_ablated, joint_attention_bwd_split_with,
    joint_attention_bwd_with, joint_attention_flops, joint_attention_fwd,
    joint_attention_fwd_ablated, joint_attention_fwd_split_with, joint_attention_fwd_with,
    AttnDims, BwdAblation, BwdVariant, FwdAblation, FwdVariant, SplitPlan,
};
use advdmd::Rng;
use half::bf16;

fn randn(dev: &KernelDevice, n: usize, rng: &mut Rng) -> DevBuf<bf16> {
    let v: Vec<bf16> = (0..n).map(|_| bf16::from_f32(rng.normal())).collect();
    dev.upload(&v).expect("upload")
}

fn median(mut v: Vec<f32>) -> f32 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn run(
    dev: &KernelDevice,
    name: &str,
    dims: AttnDims,
    reps: usize,
) -> KernelResult<serde_json::Value> {
    let mut rng = Rng::new(1);
    let (na, nb) = (
        dims.b * dims.la * dims.h * dims.d,
        dims.b * dims.lb * dims.h * dims.d,
    );
    let [qa, ka, va, doa] = [0; 4].map(|_| randn(dev, na, &mut rng));
    let [qb, kb, vb, dob] = [0; 4].map(|_| randn(dev, nb, &mut rng));
    let (oa, ob, lse) = joint_attention_fwd(dev, &qa, &ka, &va, &qb, &kb, &vb, dims)?;
    joint_attention_bwd(
        dev, &qa, &ka, &va, &qb, &kb, &vb, &oa, &ob, &lse, &doa, &dob, dims,
    )?;
    dev.synchronize()?;
    let (ff, fb) = (
        joint_attention_flops(dims, false),
        joint_attention_flops(dims, true),
    );
    // Every forward and backward kernel, interleaved per repeat: the variants that run as
    // themselves at this head dim (one that resolves to another is that one's kernel, timed
    // under its own name); the headline figures are the plain launchers' choice (`fastest`).
    let d = dims.d;
    let fvars: Vec<FwdVariant> = FwdVariant::enabled()
        .into_iter()
        .filter(|v| v.resolve(d) == *v)
        .collect();
    let bvars: Vec<BwdVariant> = BwdVariant::enabled()
        .into_iter()
        .filter(|v| v.resolve(d) == *v)
        .collect();
    // The variants whose plain launch splits its last wave here (SplitPlan::last_wave) are
    // timed unsplit too: rows `fwd_<variant>_whole`, `bwd_<variant>_whole`.
    let whole: Vec<(FwdVariant, SplitPlan)> = fvars
        .iter()
        .filter_map(|&v| {
            let (units, key_tiles) = v.split_units(dims)?;
            let auto = SplitPlan::last_wave(units, dev.sm_count() as u32, key_tiles);
            (auto != SplitPlan::none(units) && v.resolve(dims.d) == v)
                .then_some((v, SplitPlan::none(units)))
        })
        .collect();
    let bwd_whole: Vec<(BwdVariant, SplitPlan)> = bvars
        .iter()
        .filter_map(|&v| {
            let (units, query_tiles) = v.split_units(dims)?;
            let auto = SplitPlan::last_wave(units, dev.sm_count() as u32, query_tiles);
            (auto != SplitPlan::none(units) && v.resolve(dims.d) == v)
                .then_some((v, SplitPlan::none(units)))
        })
        .collect();
    // ... and on one block an SM taking the units in turns (ADVDMD_ATTN_PERSISTENT=1), with the
    // plain launch's plan: rows `fwd_<variant>_persistent`.
    let sms = dev.sm_count() as u32;
    let persistent: Vec<(FwdVariant, SplitPlan)> = fvars
        .iter()
        .filter_map(|&v| {
            let (units, key_tiles) = v.split_units(dims)?;
            (v.resolve(dims.d) == v).then(|| (v, SplitPlan::last_wave(units, sms, key_tiles)))
        })
        .collect();
    // The default forward's kernel with parts of its work cut (FwdAblation), under its plain
    // launch: rows `fwd_abl_<cut>` beside `fwd_<base>_persistent`, where one block an SM is
    // the default (or the plain rows).
    let ablations = FwdAblation::enabled(dev, d);
    let mut fwd_abl: Vec<Vec<f32>> = ablations.iter().map(|_| Vec::new()).collect();
    // ... and the default backward's (BwdAblation, d = 64): rows `bwd_abl_<cut>` beside `bwd_h6`
    let bwd_ablations = BwdAblation::enabled(dev, d);
    let mut bwd_abl: Vec<Vec<f32>> = bwd_ablations.iter().map(|_| Vec::new()).collect();
    let mut fwd: Vec<Vec<f32>> = fvars.iter().map(|_| Vec::new()).collect();
    let mut fwd_whole: Vec<Vec<f32>> = whole.iter().map(|_| Vec::new()).collect();
    let mut fwd_persistent: Vec<Vec<f32>> = persistent.iter().map(|_| Vec::new()).collect();
    let mut bwd: Vec<Vec<f32>> = bvars.iter().map(|_| Vec::new()).collect();
    let mut bwd_whole_ms: Vec<Vec<f32>> = bwd_whole.iter().map(|_| Vec::new()).collect();
    let qkv = [&qa, &ka, &va, &qb, &kb, &vb];
    for _ in 0..reps {
        for (i, &v) in fvars.iter().enumerate() {
            fwd[i].push(dev.time_ms(|| {
                joint_attention_fwd_with(dev, &qa, &ka, &va, &qb, &kb, &vb, dims, v).map(|_| ())
            })?);
        }
        for (i, &(v, plan)) in persistent.iter().enumerate() {
            fwd_persistent[i].push(dev.time_ms(|| {
                joint_attention_fwd_split_with(dev, qkv, dims, v, plan, Some(sms)).map(|_| ())
            })?);
        }
        for (i, &a) in ablations.iter().enumerate() {
            fwd_abl[i].push(
                dev.time_ms(|| joint_attention_fwd_ablated(dev, qkv, dims, a, None).map(|_| ()))?,
            );
        }
        for (i, &(v, plan)) in whole.iter().enumerate() {
            fwd_whole[i].push(dev.time_ms(|| {
                joint_attention_fwd_split_with(dev, qkv, dims, v, plan, None).map(|_| ())
            })?);
        }
        for (i, &v) in bvars.iter().enumerate() {
            bwd[i].push(dev.time_ms(|| {
                joint_attention_bwd_with(
                    dev, &qa, &ka, &va, &qb, &kb, &vb, &oa, &ob, &lse, &doa, &dob, dims, v,
                )
                .map(|_| ())
            })?);
        }
        for (i, &a) in bwd_ablations.iter().enumerate() {
            bwd_abl[i].push(dev.time_ms(|| {
                let outs = [&oa, &ob, &doa, &dob];
                joint_attention_bwd_ablated(dev, qkv, outs, &lse, dims, a, None).map(|_| ())
            })?);
        }
        for (i, &(v, plan)) in bwd_whole.iter().enumerate() {
            bwd_whole_ms[i].push(dev.time_ms(|| {
                let outs = [&oa, &ob, &doa, &dob];
                joint_attention_bwd_split_with(dev, qkv, outs, &lse, dims, v, plan).map(|_| ())
            })?);
        }
    }
    let fwd: Vec<f32> = fwd.into_iter().map(median).collect();
    let bwd: Vec<f32> = bwd.into_iter().map(median).collect();
    let pick_f = fvars
        .iter()
        .position(|&v| v == FwdVariant::fastest(dev, d).resolve(d));
    let pick_b = bvars
        .iter()
        .position(|&v| v == BwdVariant::fastest(dev, d).resolve(d));
    let (f, b) = (fwd[pick_f.unwrap_or(0)], bwd[pick_b.unwrap_or(0)]);
    let (tf, tb) = (ff / f as f64 / 1e9, fb / b as f64 / 1e9);
    println!("attention {name:<20} {:<22} fwd {f:8.3} ms {tf:7.1} TFLOP/s   bwd {b:8.3} ms {tb:7.1} TFLOP/s", dev.name());
    let mut json = serde_json::json!({"shape": name, "device": dev.name(), "b": dims.b, "h": dims.h, "la": dims.la, "lb": dims.lb, "d": dims.d,
        "fwd_ms": f, "bwd_ms": b, "fwd_tflops": tf, "bwd_tflops": tb});
    for (v, ms) in fvars.iter().zip(&fwd) {
        let t = ff / *ms as f64 / 1e9;
        let tag = format!("{v:?}").to_lowercase();
        println!("  {name:<20} fwd {tag:<5} {ms:8.3} ms {t:7.1} TFLOP/s");
        json[format!("fwd_{tag}_ms")] = serde_json::json!(ms);
        json[format!("fwd_{tag}_tflops")] = serde_json::json!(t);
    }
    for ((v, _), ms) in whole.iter().zip(fwd_whole.into_iter().map(median)) {
        let t = ff / ms as f64 / 1e9;
        let tag = format!("{v:?}").to_lowercase() + "_whole";
        println!("  {name:<20} fwd {tag:<5} {ms:8.3} ms {t:7.1} TFLOP/s (last wave not split)");
        json[format!("fwd_{tag}_ms")] = serde_json::json!(ms);
        json[format!("fwd_{tag}_tflops")] = serde_json::json!(t);
    }
    for (v, ms) in bvars.iter().zip(&bwd) {
        let t = fb / *ms as f64 / 1e9;
        let tag = format!("{v:?}").to_lowercase();
        println!("  {name:<20} bwd {tag:<5} {ms:8.3} ms {t:7.1} TFLOP/s");
        json[format!("bwd_{tag}_ms")] = serde_json::json!(ms);
        json[format!("bwd_{tag}_tflops")] = serde_json::json!(t);
    }
    for ((v, _), ms) in persistent
        .iter()
        .zip(fwd_persistent.into_iter().map(median))
    {
        let t = ff / ms as f64 / 1e9;
        let tag = format!("{v:?}").to_lowercase() + "_persistent";
        println!("  {name:<20} fwd {tag:<5} {ms:8.3} ms {t:7.1} TFLOP/s (one block an SM)");
        json[format!("fwd_{tag}_ms")] = serde_json::json!(ms);
        json[format!("fwd_{tag}_tflops")] = serde_json::json!(t);
    }
    let base = format!("{:?}", FwdAblation::base(d)).to_lowercase();
    for (a, ms) in ablations.iter().zip(fwd_abl.into_iter().map(median)) {
        let t = ff / ms as f64 / 1e9;
        let tag = format!("abl_{}", a.tag());
        println!(
            "  {name:<20} fwd {tag:<5} {ms:8.3} ms {t:7.1} TFLOP/s ({base} cut: not attention)"
        );
        json[format!("fwd_{tag}_ms")] = serde_json::json!(ms);
        json[format!("fwd_{tag}_tflops")] = serde_json::json!(t);
    }
    for (a, ms) in bwd_ablations.iter().zip(bwd_abl.into_iter().map(median)) {
        let t = fb / ms as f64 / 1e9;
        let tag = format!("abl_{}", a.tag());
        let base = format!("{:?}", BwdAblation::BASE).to_lowercase();
        println!(
            "  {name:<20} bwd {tag:<5} {ms:8.3} ms {t:7.1} TFLOP/s ({base} cut: not the gradients)"
        );
        json[format!("bwd_{tag}_ms")] = serde_json::json!(ms);
        json[format!("bwd_{tag}_tflops")] = serde_json::json!(t);
    }
    for ((v, _), ms) in bwd_whole.iter().zip(bwd_whole_ms.into_iter().map(median)) {
        let t = fb / ms as f64 / 1e9;
        let tag = format!("{v:?}").to_lowercase() + "_whole";
        println!("  {name:<20} bwd {tag:<5} {ms:8.3} ms {t:7.1} TFLOP/s (last wave not split)");
        json[format!("bwd_{tag}_ms")] = serde_json::json!(ms);
        json[format!("bwd_{tag}_tflops")] = serde_json::json!(t);
    }
    Ok(json)
}

fn main() {
    let (dev, shapes, reps) = match KernelDevice::gpu_if_available() {
        Some(g) => (
            g,
            vec![
                (
                    "sd35m-1024px-d64",
                    AttnDims {
                        b: 2,
                        la: 333,
                        lb: 4096,
                        h: 24,
                        d: 64,
                    },
                ),
                (
                    "d128-1024px",
                    AttnDims {
                        b: 2,
                        la: 333,
                        lb: 4096,
                        h: 12,
                        d: 128,
                    },
                ),
                // the model's own shape at batch 1 (the forward goal's): 840 query tiles on 132
                // SMs, a part-full last wave that the H3–H6 launches split
                (
                    "sd35m-1024px-d64-b1",
                    AttnDims {
                        b: 1,
                        la: 333,
                        lb: 4096,
                        h: 24,
                        d: 64,
                    },
                ),
                (
                    "sd35m-512px-d64",
                    AttnDims {
                        b: 2,
                        la: 333,
                        lb: 1024,
                        h: 24,
                        d: 64,
                    },
                ),
            ],
            20,
        ),
        None => {
            eprintln!("attention bench: no GPU; one tiny emulator run (times are not speeds)");
            (
                KernelDevice::emulator(),
                vec![(
                    "tiny-emulator",
                    AttnDims {
                        b: 1,
                        la: 7,
                        lb: 64,
                        h: 1,
                        d: 64,
                    },
                )],
                1,
            )
        }
    };
    let mut out = Vec::new();
    for (name, dims) in shapes {
        match run(&dev, name, dims, reps) {
            Ok(v) => out.push(v),
            Err(e) => {
                eprintln!("attention {name}: {e}");
                std::process::exit(1);
            }
        }
    }
    if let Ok(p) = std::env::var("ADVDMD_ATTN_BENCH_JSON") {
        std::fs::write(&p, serde_json::to_string_pretty(&out).unwrap())
            .expect("writing bench json");
    }
}
