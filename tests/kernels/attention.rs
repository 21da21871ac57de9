//! cuda/attention.cu ↔ src/kernels/attention.rs: the flash-attention forward and backward
//! against the CPU kernels on the same bf16-rounded inputs.

use super::*;
use advdmd::kernels::attention::{self as cpu, dev as gpu};
use gpu::AttnDims;

/// (B, La, Lb, H, std of q and k): an empty text stream, a partial tile next to a full one,
/// several tiles with partial ends in both streams (for the 64- and 128-row tiles alike), and
/// peaked (nearly one-hot) attention, where
/// the backward's row term dO·O is most sensitive to O's bf16 rounding, and a long image stream:
/// more key tiles than the Hopper kernels' 4 stages at d = 64 too (their ring of shared stages
/// wraps, and H9's 3 stages of 192 keys), and three 192-row query tiles with a partial one (H5,
/// H6). Each runs at d = 64 and 128.
const CASES: &[(usize, usize, usize, usize, f32)] = &[
    (2, 0, 16, 2, 1.0),
    (1, 7, 64, 2, 1.0),
    (2, 77, 130, 2, 1.0),
    (1, 33, 96, 2, 3.0),
    (1, 77, 520, 1, 1.0),
];

/// One case's inputs, as f32 values that are exactly bf16.
struct Inputs {
    dims: AttnDims,
    /// q_a, k_a, v_a, q_b, k_b, v_b.
    qkv: [Vec<f32>; 6],
    do_a: Vec<f32>,
    do_b: Vec<f32>,
}

impl Inputs {
    fn new(b: usize, la: usize, lb: usize, h: usize, d: usize, qk_std: f32, seed: u64) -> Inputs {
        let dims = AttnDims { b, la, lb, h, d };
        let mut rng = Rng::new(seed);
        let (na, nb) = (dims.numel_a(), dims.numel_b());
        // Scores have standard deviation qk_std² after the 1/√d scale: 1 gives softmax rows that
        // are neither uniform nor one-hot, 3 gives rows dominated by a few keys.
        let std = [qk_std, qk_std, 1.0, qk_std, qk_std, 1.0];
        let qkv: [Vec<f32>; 6] =
            std::array::from_fn(|i| randn_bf16(&mut rng, if i < 3 { na } else { nb }, std[i]));
        let do_a = randn_bf16(&mut rng, na, 1.0);
        let do_b = randn_bf16(&mut rng, nb, 1.0);
        Inputs {
            dims,
            qkv,
            do_a,
            do_b,
        }
    }

    fn shape(&self) -> String {
        let d = &self.dims;
        format!("{}x({}+{})x{}x{}", d.b, d.la, d.lb, d.h, d.d)
    }

    fn tensors(&self) -> [Tensor; 6] {
        let d = &self.dims;
        std::array::from_fn(|i| {
            let l = if i < 3 { d.la } else { d.lb };
            tensor(self.qkv[i].clone(), &[d.b, l, d.h, d.d])
        })
    }
}

/// The forward's lse against the CPU's: 1e-5, but 5e-4 for H10, whose row sums add the
/// bf16-rounded P that O sums (on the tensor cores) where the others add P in f32 — about one
/// bf16 rounding (2⁻⁹) averaged over a row, ~1e-4 of the sum.
fn lse_tolerance(variant: gpu::FwdVariant, d: usize) -> f32 {
    if variant.resolve(d) == gpu::FwdVariant::H10 {
        5e-4
    } else {
        1e-5
    }
}

#[test]
fn joint_attention_fwd_and_bwd_match_cpu() {
    for dev in devices() {
        for &(b, la, lb, h, qk_std) in CASES {
            for d in [64, 128] {
                let seed = 1000 + (la * 131 + lb * 7 + d) as u64;
                check_case(&dev, &Inputs::new(b, la, lb, h, d, qk_std, seed), qk_std);
            }
        }
    }
}

/// Head dims without tensor-core kernels run the fallback (`joint_attn_*_naive`): the same
/// checks and tolerances as the fast kernels, at the tiny test models' 16 and 32, an odd 24 (not
/// a multiple of 8), 8 and the largest, 256. Cases: a text stream next to an image stream, an
/// empty text stream (image-only attention), an empty image stream, and peaked attention.
#[test]
fn joint_attention_fallback_matches_cpu() {
    const FALLBACK_CASES: &[(usize, usize, usize, usize, f32)] = &[
        (2, 5, 16, 2, 1.0),
        (2, 0, 16, 2, 1.0),
        (1, 9, 0, 2, 1.0),
        (1, 33, 40, 2, 3.0),
    ];
    for dev in devices() {
        for &(b, la, lb, h, qk_std) in FALLBACK_CASES {
            for d in [16, 32] {
                let seed = 2000 + (la * 131 + lb * 7 + d) as u64;
                check_case(&dev, &Inputs::new(b, la, lb, h, d, qk_std, seed), qk_std);
            }
        }
        for d in [8, 24, 256] {
            check_case(
                &dev,
                &Inputs::new(1, 5, 12, 2, d, 1.0, 3000 + d as u64),
                1.0,
            );
        }
    }
}

/// The tensor-core path with one stream empty (La = 0: image-only attention; Lb = 0 as well),
/// with more than one 64-row tile and a partial last tile, every kernel variant.
#[test]
fn joint_attention_fast_path_with_an_empty_stream_matches_cpu() {
    for dev in devices() {
        for d in [64, 128] {
            for (la, lb) in [(0, 70), (70, 0)] {
                let seed = 4000 + (la * 131 + lb * 7 + d) as u64;
                check_case(&dev, &Inputs::new(2, la, lb, 2, d, 1.0, seed), 1.0);
            }
        }
    }
}

/// Runs the forward and backward (the default kernels and every other variant) on one case and
/// compares them with the CPU kernels.
fn check_case(dev: &KernelDevice, inp: &Inputs, qk_std: f32) {
    let dims = inp.dims;
    let AttnDims { b, la, lb, h, d } = dims;
    let shape = inp.shape();
    let [qa, ka, va, qb, kb, vb] = inp.qkv.each_ref().map(|v| upload_bf16(dev, v));
    let (oa, ob, lse) = gpu::joint_attention_fwd(dev, &qa, &ka, &va, &qb, &kb, &vb, dims).unwrap();

    let [qat, kat, vat, qbt, kbt, vbt] = inp.tensors();
    let want = cpu::joint_attention_fwd(&qat, &kat, &vat, &qbt, &kbt, &vbt);
    check(
        "joint_attention_fwd.o_a",
        dev,
        &shape,
        &download_f32(dev, &oa),
        want.o_a.f32s(),
        1e-2,
    );
    check(
        "joint_attention_fwd.o_b",
        dev,
        &shape,
        &download_f32(dev, &ob),
        want.o_b.f32s(),
        1e-2,
    );
    check(
        "joint_attention_fwd.lse",
        dev,
        &shape,
        &dev.download(&lse).unwrap(),
        want.lse.f32s(),
        1e-5,
    );

    // The other forward kernels compute the same function.
    for variant in gpu::FwdVariant::enabled() {
        if variant == gpu::FwdVariant::fastest(dev, dims.d) {
            continue;
        }
        let tag = format!("{variant:?}").to_lowercase();
        let (oav, obv, lsev) =
            gpu::joint_attention_fwd_with(dev, &qa, &ka, &va, &qb, &kb, &vb, dims, variant)
                .unwrap();
        for (name, got, want) in [
            ("o_a", download_f32(dev, &oav), want.o_a.f32s()),
            ("o_b", download_f32(dev, &obv), want.o_b.f32s()),
        ] {
            check(
                &format!("joint_attention_fwd[{tag}].{name}"),
                dev,
                &shape,
                &got,
                want,
                1e-2,
            );
        }
        check(
            &format!("joint_attention_fwd[{tag}].lse"),
            dev,
            &shape,
            &dev.download(&lsev).unwrap(),
            want.lse.f32s(),
            lse_tolerance(variant, dims.d),
        );
    }

    let (doa, dob) = (upload_bf16(dev, &inp.do_a), upload_bf16(dev, &inp.do_b));
    let grads = gpu::joint_attention_bwd(
        dev, &qa, &ka, &va, &qb, &kb, &vb, &oa, &ob, &lse, &doa, &dob, dims,
    )
    .unwrap();
    let (doat, dobt) = (
        tensor(inp.do_a.clone(), &[b, la, h, d]),
        tensor(inp.do_b.clone(), &[b, lb, h, d]),
    );
    let want =
        cpu::joint_attention_bwd(&qat, &kat, &vat, &qbt, &kbt, &vbt, &want.lse, &doat, &dobt);
    // The row term dO·O uses the bf16 forward output (as FlashAttention does); where
    // rows are nearly one-hot its rounding doubles the dQ, dK error (≈3e-3 → ≈7e-3
    // on the peaked case, where the CPU kernel's Σ P·dP has none), hence the margin.
    let grad_tol = if qk_std > 1.0 { 1.5e-2 } else { 1e-2 };
    // The other backward kernels compute the same function.
    let mut all = vec![(String::new(), grads)];
    for variant in gpu::BwdVariant::enabled() {
        if variant == gpu::BwdVariant::fastest(dev, dims.d) {
            continue;
        }
        let g = gpu::joint_attention_bwd_with(
            dev, &qa, &ka, &va, &qb, &kb, &vb, &oa, &ob, &lse, &doa, &dob, dims, variant,
        )
        .unwrap();
        all.push((format!("[{}]", format!("{variant:?}").to_lowercase()), g));
    }
    let names = ["dq_a", "dk_a", "dv_a", "dq_b", "dk_b", "dv_b"];
    for (tag, grads) in &all {
        for ((name, got), want) in names.iter().zip(grads).zip(&want) {
            let kernel = format!("joint_attention_bwd{tag}.{name}");
            check(
                &kernel,
                dev,
                &shape,
                &download_f32(dev, got),
                want.f32s(),
                grad_tol,
            );
        }
    }
}

/// The H3–H9 forwards with their units split along the keys (`SplitPlan`): every unit split
/// two ways, the last units three ways, the last unit into single key tiles; against the CPU
/// kernel with the unsplit launch's tolerances, on a case with several query and key tiles
/// in both streams (at d = 64 and 128) and two heads.
#[test]
fn joint_attention_fwd_split_along_the_keys_matches_cpu() {
    for dev in devices() {
        for d in [64, 128] {
            let inp = Inputs::new(1, 77, 300, 2, d, 1.0, 5000 + d as u64);
            let dims = inp.dims;
            let [qat, kat, vat, qbt, kbt, vbt] = inp.tensors();
            let want = cpu::joint_attention_fwd(&qat, &kat, &vat, &qbt, &kbt, &vbt);
            let bufs = inp.qkv.each_ref().map(|v| upload_bf16(&dev, v));
            let qkv = bufs.each_ref();
            for variant in gpu::FwdVariant::enabled() {
                let Some((units, key_tiles)) = variant.split_units(dims) else {
                    continue;
                };
                if variant.resolve(d) != variant {
                    continue; // H4–H6 run H3, H8 and H9 run H7 at d = 128
                }
                let plans = split_plans(units, key_tiles, true);
                // each plan on a block a planned block, and on 3 blocks taking them in turns
                // (ADVDMD_ATTN_PERSISTENT's structure: Q tiles, ring and turns across units)
                for (plan, ctas) in plans.into_iter().flat_map(|p| [(p, None), (p, Some(3))]) {
                    let (oa, ob, lse) =
                        gpu::joint_attention_fwd_split_with(&dev, qkv, dims, variant, plan, ctas)
                            .unwrap();
                    let tag = format!(
                        "joint_attention_fwd[{variant:?} from {} x{} on {ctas:?}]",
                        plan.split_from, plan.splits
                    );
                    let shape = inp.shape();
                    for (name, got, want) in [
                        ("o_a", download_f32(&dev, &oa), want.o_a.f32s()),
                        ("o_b", download_f32(&dev, &ob), want.o_b.f32s()),
                    ] {
                        check(&format!("{tag}.{name}"), &dev, &shape, &got, want, 1e-2);
                    }
                    let got = dev.download(&lse).unwrap();
                    check(
                        &format!("{tag}.lse"),
                        &dev,
                        &shape,
                        &got,
                        want.lse.f32s(),
                        lse_tolerance(variant, d),
                    );
                }
            }
        }
    }
}

/// The H3–H12 backward with their 128-key units split along the queries (`SplitPlan`): every
/// unit two ways, the last units three ways, the last unit into single query tiles; all six
/// gradients against the CPU kernel with the unsplit launch's tolerance (dQ goes through the
/// accumulator either way; dK, dV of a split unit are its pieces' sums), at d = 64 and 128.
#[test]
fn joint_attention_bwd_split_along_the_queries_matches_cpu() {
    for dev in devices() {
        for d in [64, 128] {
            bwd_split_matches_cpu(&dev, d);
        }
    }
}

fn bwd_split_matches_cpu(dev: &KernelDevice, d: usize) {
    let inp = Inputs::new(1, 77, 300, 2, d, 1.0, 5036 + d as u64);
    let dims = inp.dims;
    let AttnDims { b, la, lb, h, .. } = dims;
    let [qat, kat, vat, qbt, kbt, vbt] = inp.tensors();
    let fwd = cpu::joint_attention_fwd(&qat, &kat, &vat, &qbt, &kbt, &vbt);
    let (doat, dobt) = (
        tensor(inp.do_a.clone(), &[b, la, h, d]),
        tensor(inp.do_b.clone(), &[b, lb, h, d]),
    );
    let want = cpu::joint_attention_bwd(&qat, &kat, &vat, &qbt, &kbt, &vbt, &fwd.lse, &doat, &dobt);
    let bufs = inp.qkv.each_ref().map(|v| upload_bf16(dev, v));
    let (oa, ob, lse) = gpu::joint_attention_fwd_with(
        dev,
        &bufs[0],
        &bufs[1],
        &bufs[2],
        &bufs[3],
        &bufs[4],
        &bufs[5],
        dims,
        gpu::FwdVariant::fastest(dev, d),
    )
    .unwrap();
    let (doa, dob) = (upload_bf16(dev, &inp.do_a), upload_bf16(dev, &inp.do_b));
    for variant in gpu::BwdVariant::enabled() {
        let Some((units, query_tiles)) = variant.split_units(dims) else {
            continue;
        };
        if variant.resolve(d) != variant {
            continue; // H12 runs H6 at d = 64
        }
        let plans = split_plans(units, query_tiles, false);
        for plan in plans {
            let grads = gpu::joint_attention_bwd_split_with(
                dev,
                bufs.each_ref(),
                [&oa, &ob, &doa, &dob],
                &lse,
                dims,
                variant,
                plan,
            )
            .unwrap();
            let names = ["dq_a", "dk_a", "dv_a", "dq_b", "dk_b", "dv_b"];
            for ((name, got), want) in names.iter().zip(&grads).zip(&want) {
                let kernel = format!(
                    "joint_attention_bwd[{variant:?} from {} x{}].{name}",
                    plan.split_from, plan.splits
                );
                let got = download_f32(dev, got);
                check(&kernel, dev, &inp.shape(), &got, want.f32s(), 1e-2);
            }
        }
    }
}

/// The split plans the split tests run over `units` units of `tiles` tiles: every unit split two
/// ways, the last two three ways, the last one into single tiles (and none split, `whole`).
fn split_plans(units: u32, tiles: u32, whole: bool) -> Vec<gpu::SplitPlan> {
    let plan = |split_from, splits| gpu::SplitPlan { split_from, splits };
    let mut plans = vec![plan(0, 2), plan(units - 2, 3), plan(units - 1, tiles)];
    if whole {
        plans.insert(0, gpu::SplitPlan::none(units));
    }
    plans
}

/// The skip lists gpu-check sets when only the variants no card has run yet fail: names in any
/// case, empty words ignored, and a word that is no variant refused by name.
#[test]
fn variant_skip_lists_parse() {
    let got = gpu::parse_variants("X", "h7, H8,,h9", &gpu::FwdVariant::ALL).unwrap();
    assert_eq!(
        got,
        [
            gpu::FwdVariant::H7,
            gpu::FwdVariant::H8,
            gpu::FwdVariant::H9
        ]
    );
    assert_eq!(
        gpu::parse_variants("X", "", &gpu::BwdVariant::ALL).unwrap(),
        []
    );
    let err =
        gpu::parse_variants("ADVDMD_ATTN_BWD_SKIP", "h4,h40", &gpu::BwdVariant::ALL).unwrap_err();
    assert!(
        err.contains("ADVDMD_ATTN_BWD_SKIP") && err.contains("h40"),
        "{err}"
    );
}

/// The split plan of the forward's last wave: none when the waves are full, the part-full
/// wave's units split as many ways as the SMs allow (at most 4, pieces of ≥ 4 key tiles).
#[test]
fn split_plan_fills_the_last_wave() {
    use gpu::SplitPlan;
    let plan = |split_from, splits| SplitPlan { split_from, splits };
    // SD3.5-medium 1024 px, batch 1: 24 heads × 35 query tiles on 132 SMs, 35 key tiles
    assert_eq!(SplitPlan::last_wave(840, 132, 35), plan(792, 2));
    assert_eq!(SplitPlan::last_wave(840, 132, 35).blocks(840), 888);
    // batch 2: 12 waves and 96 units, which split two ways would not fit one wave
    assert_eq!(SplitPlan::last_wave(1680, 132, 35), SplitPlan::none(1680));
    // 512 px: 264 units, two full waves
    assert_eq!(SplitPlan::last_wave(264, 132, 11), SplitPlan::none(264));
    // under one wave: at most 4 ways, and no piece under 4 key tiles
    assert_eq!(SplitPlan::last_wave(10, 132, 35), plan(0, 4));
    assert_eq!(SplitPlan::last_wave(50, 132, 35), plan(0, 2));
    assert_eq!(SplitPlan::last_wave(10, 132, 12), plan(0, 3));
    assert_eq!(SplitPlan::last_wave(10, 132, 7), SplitPlan::none(10));
    assert_eq!(SplitPlan::none(7).blocks(7), 7);
}

/// A plan the kernels cannot run is an error, not a launch.
#[test]
fn joint_attention_rejects_a_bad_split_plan() {
    for dev in devices() {
        let inp = Inputs::new(1, 7, 64, 1, 64, 1.0, 9);
        let bufs = inp.qkv.each_ref().map(|v| upload_bf16(&dev, v));
        let (units, key_tiles) = gpu::FwdVariant::H3.split_units(inp.dims).unwrap();
        for plan in [
            gpu::SplitPlan {
                split_from: 0,
                splits: key_tiles + 1,
            },
            gpu::SplitPlan {
                split_from: units + 1,
                splits: 2,
            },
            gpu::SplitPlan {
                split_from: 0,
                splits: 0,
            },
        ] {
            let r = gpu::joint_attention_fwd_split_with(
                &dev,
                bufs.each_ref(),
                inp.dims,
                gpu::FwdVariant::H3,
                plan,
                None,
            );
            assert!(r.is_err(), "{plan:?} was accepted");
        }
        let r = gpu::joint_attention_fwd_split_with(
            &dev,
            bufs.each_ref(),
            inp.dims,
            gpu::FwdVariant::H1,
            gpu::SplitPlan::none(2),
            None,
        );
        assert!(r.is_err(), "H1 took a split plan");
        let r = gpu::joint_attention_fwd_split_with(
            &dev,
            bufs.each_ref(),
            inp.dims,
            gpu::FwdVariant::H3,
            gpu::SplitPlan::none(units),
            Some(0),
        );
        assert!(r.is_err(), "a grid of 0 was accepted");
    }
}

/// The forward has no atomics and a fixed reduction order: two runs agree bit for bit (every
/// kernel variant).
#[test]
fn joint_attention_fwd_is_deterministic() {
    for dev in devices() {
        for variant in gpu::FwdVariant::enabled() {
            fwd_is_deterministic(&dev, variant, 64);
        }
        fwd_is_deterministic(&dev, gpu::FwdVariant::fastest(&dev, 32), 32);
    }
}

fn fwd_is_deterministic(dev: &KernelDevice, variant: gpu::FwdVariant, d: usize) {
    let inp = Inputs::new(1, 77, 130, 2, d, 1.0, 7);
    let bufs = inp.qkv.each_ref().map(|v| upload_bf16(dev, v));
    let run = || fwd_bits(dev, &bufs, inp.dims, variant);
    assert!(
        run() == run(),
        "joint_attention_fwd ({variant:?}, d = {d}) on {}: two runs differ",
        dev.name()
    );
}

/// H11's speculative softmax takes P against the reference maximum before it knows the tile's
/// maximum, and again where that moved the reference: the same P, l and O as its base (H4 at
/// d = 64, H3 at d = 128) bit for bit. On keys whose later tiles score up to ~8× higher (the
/// reference moves mid-unit, not only at a unit's first tile), and plain ones. H12, whose
/// rescales follow its row sums, against the CPU on the same inputs.
#[test]
fn speculative_softmaxes_match_their_base_and_the_cpu() {
    for dev in devices() {
        if !dev.has_wgmma() {
            eprintln!(
                "speculative softmax: {} runs no wgmma; skipped there",
                dev.name()
            );
            continue;
        }
        for d in [64, 128] {
            let base = schedule_base(d);
            let enabled = gpu::FwdVariant::enabled();
            if !enabled.contains(&gpu::FwdVariant::H11) || !enabled.contains(&base) {
                eprintln!(
                    "speculative softmax: H11 or {base:?} left out on {}; skipped",
                    dev.name()
                );
                continue;
            }
            for rising in [false, true] {
                let mut inp = Inputs::new(1, 77, 520, 2, d, 1.0, 8000 + d as u64);
                if rising {
                    // image keys past row 128 scaled by 1 + 7·r/520: scores rise along the keys
                    let row = 2 * d; // H · d elements a token
                    for (i, x) in inp.qkv[4].iter_mut().enumerate() {
                        let r = i / row;
                        if r >= 128 {
                            *x = bf16::from_f32(*x * (1.0 + 7.0 * r as f32 / 520.0)).to_f32();
                        }
                    }
                }
                let bufs = inp.qkv.each_ref().map(|v| upload_bf16(&dev, v));
                let run = |variant| fwd_bits(&dev, &bufs, inp.dims, variant);
                if enabled.contains(&gpu::FwdVariant::H12) {
                    let [qat, kat, vat, qbt, kbt, vbt] = inp.tensors();
                    let want = cpu::joint_attention_fwd(&qat, &kat, &vat, &qbt, &kbt, &vbt);
                    let (oa, ob, lse) = fwd_run(&dev, &bufs, inp.dims, gpu::FwdVariant::H12);
                    let shape = format!("{} rising keys {rising}", inp.shape());
                    for (name, got, want, tol) in [
                        ("o_a", download_f32(&dev, &oa), want.o_a.f32s(), 1e-2),
                        ("o_b", download_f32(&dev, &ob), want.o_b.f32s(), 1e-2),
                        ("lse", dev.download(&lse).unwrap(), want.lse.f32s(), 1e-5),
                    ] {
                        let kernel = format!("joint_attention_fwd[h12].{name}");
                        check(&kernel, &dev, &shape, &got, want, tol);
                    }
                }
                assert!(
                    run(gpu::FwdVariant::H11) == run(base),
                    "H11 and {base:?} differ at d = {d} (rising keys: {rising}) on {}",
                    dev.name()
                );
                println!(
                    "kernel joint_attention_fwd[h11] = [{}] bit for bit, d = {d}, rising keys {rising}, device {}",
                    format!("{base:?}").to_lowercase(),
                    dev.name()
                );
            }
        }
    }
}

/// The variants that change only a schedule: H13 how the producer fills the tiles (TMA's bulk
/// tensor copies, rows past a stream zero-filled by the copy unit), H14 is H11 (bit for bit its
/// base) fed the same way, and H16 when the consumer groups issue their products (no turns): O
/// and lse bit for bit their base's (H4 at d = 64, H3 at d = 128), with partial tiles in both
/// streams, an empty text stream, and two samples (a box must not read the next sample's rows
/// past a stream's end), on keys whose scores rise along the image stream for H14 (its redone
/// tiles).
#[test]
fn schedule_variants_match_their_base_bit_for_bit() {
    for dev in devices() {
        let enabled = gpu::FwdVariant::enabled();
        if !dev.has_wgmma() {
            eprintln!("schedule variants: {} runs no wgmma; skipped", dev.name());
            continue;
        }
        for d in [64, 128] {
            let base = schedule_base(d);
            if !enabled.contains(&base) {
                eprintln!(
                    "schedule variants: {base:?} left out on {}; skipped",
                    dev.name()
                );
                continue;
            }
            for (b, la, lb, h) in [
                (2usize, 77usize, 130usize, 2usize),
                (2, 0, 200, 1),
                (1, 140, 300, 3),
            ] {
                let mut inp = Inputs::new(b, la, lb, h, d, 1.0, 9100 + (d + la) as u64);
                // image keys scaled by 1 + 7·r/lb: scores rise along the keys
                let row = h * d;
                for (i, x) in inp.qkv[4].iter_mut().enumerate() {
                    let r = (i / row) % lb;
                    *x = bf16::from_f32(*x * (1.0 + 7.0 * r as f32 / lb as f32)).to_f32();
                }
                let bufs = inp.qkv.each_ref().map(|v| upload_bf16(&dev, v));
                let run = |variant| fwd_bits(&dev, &bufs, inp.dims, variant);
                let want = run(base);
                for variant in [
                    gpu::FwdVariant::H13,
                    gpu::FwdVariant::H14,
                    gpu::FwdVariant::H16,
                ] {
                    if !enabled.contains(&variant) {
                        eprintln!(
                            "schedule variants: {variant:?} left out on {}; skipped",
                            dev.name()
                        );
                        continue;
                    }
                    assert!(
                        run(variant) == want,
                        "{variant:?} and {base:?} differ at {} on {}",
                        inp.shape(),
                        dev.name()
                    );
                    println!(
                        "kernel joint_attention_fwd[{}] = [{}] bit for bit, {}, device {}",
                        format!("{variant:?}").to_lowercase(),
                        format!("{base:?}").to_lowercase(),
                        inp.shape(),
                        dev.name()
                    );
                }
            }
        }
    }
}

/// The bench's cuts of the default forward (`FwdAblation`) compute what each claims, unsplit:
/// with no softmax O = Σ bf16(q·k)·v over the keys (the CPU's, f32) and lse 0; with no copies
/// (zero tiles) O = 0 and lse = ln(keys); with neither, O = 0 and lse 0; with no exponentials
/// O and lse finite and O not the base's.
#[test]
fn forward_ablations_compute_what_they_claim() {
    for dev in devices() {
        for d in [64, 128] {
            let base = gpu::FwdAblation::base(d);
            let ablations = gpu::FwdAblation::enabled(&dev, d);
            if ablations.is_empty() {
                eprintln!(
                    "forward ablations: none on {} at d = {d} (no {base:?}, or ADVDMD_ATTN_ABLATIONS=0); skipped",
                    dev.name()
                );
                continue;
            }
            // a head dim without the cut kernels is refused, not launched
            let small = Inputs::new(1, 3, 8, 1, 32, 1.0, 9499);
            let small_bufs = small.qkv.each_ref().map(|v| upload_bf16(&dev, v));
            let cut = gpu::FwdAblation::Bare;
            let refused = gpu::joint_attention_fwd_ablated(
                &dev,
                small_bufs.each_ref(),
                small.dims,
                cut,
                None,
            );
            assert!(
                refused.is_err(),
                "an ablated forward at d = 32 was launched"
            );
            let inp = Inputs::new(1, 77, 200, 2, d, 1.0, 9500 + d as u64);
            let dims = inp.dims;
            let bufs = inp.qkv.each_ref().map(|v| upload_bf16(&dev, v));
            let qkv = bufs.each_ref();
            let units = base.split_units(dims).unwrap().0;
            let whole = Some(gpu::SplitPlan::none(units));
            let keys = (dims.la + dims.lb) as f32;
            let summed = sum_of_scores_times_v(&inp);
            for ablation in ablations {
                let run = |plan| {
                    let (oa, ob, lse) =
                        gpu::joint_attention_fwd_ablated(&dev, qkv, dims, ablation, plan).unwrap();
                    let mut o = download_f32(&dev, &oa);
                    o.extend(download_f32(&dev, &ob));
                    (o, dev.download(&lse).unwrap())
                };
                let (o, lse) = run(whole);
                let kernel = format!("joint_attention_fwd[{}]", ablation.tag());
                let (want_o, want_lse) = match ablation {
                    gpu::FwdAblation::NoExponentials => {
                        // P of the floored exponents: finite, positive sums, not the base's O
                        let base_o = fwd_run(&dev, &bufs, dims, base);
                        let mut w = download_f32(&dev, &base_o.0);
                        w.extend(download_f32(&dev, &base_o.1));
                        let finite = o.iter().chain(&lse).all(|x| x.is_finite());
                        assert!(
                            finite && o != w,
                            "{kernel} at {}: not finite, or the base's O",
                            inp.shape()
                        );
                        println!(
                            "kernel {kernel} finite, not the base's, {}, device {}",
                            inp.shape(),
                            dev.name()
                        );
                        continue;
                    }
                    gpu::FwdAblation::NoSoftmax => (summed.clone(), 0.0),
                    gpu::FwdAblation::NoCopies => (vec![0.0; o.len()], keys.ln()),
                    gpu::FwdAblation::Bare => (vec![0.0; o.len()], 0.0),
                };
                check(&kernel, &dev, &inp.shape(), &o, &want_o, 1e-2);
                let lse_err = lse.iter().fold(0f32, |m, x| m.max((x - want_lse).abs()));
                assert!(
                    lse_err <= 1e-4,
                    "{kernel} at {}: lse off {want_lse} by {lse_err}",
                    inp.shape()
                );
            }
        }
    }
}

/// The bench's cuts of the default backward at d = 64 (`BwdAblation`, H6's kernel): without the
/// dQ reductions, dK and dV are H6's bit for bit and dQ is 0; without copies (zero operands)
/// every gradient is 0; without exponentials every gradient is finite and not H6's — under the
/// plain launcher's plan and unsplit.
#[test]
fn backward_ablations_compute_what_they_claim() {
    for dev in devices() {
        let ablations = gpu::BwdAblation::enabled(&dev, 64);
        if ablations.is_empty() {
            eprintln!(
                "backward ablations: none on {} (no {:?}, or ADVDMD_ATTN_ABLATIONS=0); skipped",
                dev.name(),
                gpu::BwdAblation::BASE
            );
            continue;
        }
        let inp = Inputs::new(1, 77, 300, 2, 64, 1.0, 9600);
        let dims = inp.dims;
        let [qa, ka, va, qb, kb, vb] = inp.qkv.each_ref().map(|v| upload_bf16(&dev, v));
        let (doa, dob) = (upload_bf16(&dev, &inp.do_a), upload_bf16(&dev, &inp.do_b));
        let (oa, ob, lse) =
            gpu::joint_attention_fwd(&dev, &qa, &ka, &va, &qb, &kb, &vb, dims).unwrap();
        let qkv = [&qa, &ka, &va, &qb, &kb, &vb];
        let outs = [&oa, &ob, &doa, &dob];
        let bits = |g: &DevBuf<bf16>| -> Vec<u16> {
            dev.download(g)
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        let (units, tiles) = gpu::BwdAblation::BASE.split_units(dims).unwrap();
        let names = ["dq_a", "dk_a", "dv_a", "dq_b", "dk_b", "dv_b"];
        let planned = gpu::SplitPlan::last_wave(units, dev.sm_count() as u32, tiles);
        for (plan, tag) in [
            (planned, "planned"),
            (gpu::SplitPlan::none(units), "unsplit"),
        ] {
            let base = gpu::BwdAblation::BASE;
            let want = gpu::joint_attention_bwd_split_with(&dev, qkv, outs, &lse, dims, base, plan)
                .unwrap();
            for &ablation in &ablations {
                let got = gpu::joint_attention_bwd_ablated(
                    &dev,
                    qkv,
                    outs,
                    &lse,
                    dims,
                    ablation,
                    Some(plan),
                )
                .unwrap();
                for (i, name) in names.iter().enumerate() {
                    let g = bits(&got[i]);
                    let zero = g.iter().all(|&x| bf16::from_bits(x).to_f32() == 0.0);
                    let ok = match ablation {
                        gpu::BwdAblation::NoReductions if !name.starts_with("dq") => {
                            g == bits(&want[i])
                        }
                        // the exponent for Pᵀ: finite, and not H6's gradients
                        gpu::BwdAblation::NoExponentials => {
                            g.iter().all(|&x| bf16::from_bits(x).to_f32().is_finite())
                                && g != bits(&want[i])
                        }
                        _ => zero,
                    };
                    assert!(
                        ok,
                        "{} {name} ({tag}) at {}: not what the cut claims",
                        ablation.tag(),
                        inp.shape()
                    );
                }
                println!(
                    "kernel joint_attention_bwd[{}] {tag}: as claimed, {}, device {}",
                    ablation.tag(),
                    inp.shape(),
                    dev.name()
                );
            }
        }
    }
}

/// O of both streams (a's rows, then b's) with P = bf16(q·k) unscaled and no normalisation:
/// what the forward computes with its softmax cut.
fn sum_of_scores_times_v(inp: &Inputs) -> Vec<f32> {
    let AttnDims { b, la, lb, h, d } = inp.dims;
    let lt = la + lb;
    // token t of sample s, head j: its row of stream a or b
    let row = |x: usize, s: usize, t: usize, j: usize| -> &[f32] {
        let (v, l, t) = if t < la {
            (&inp.qkv[x], la, t)
        } else {
            (&inp.qkv[x + 3], lb, t - la)
        };
        let at = ((s * l + t) * h + j) * d;
        &v[at..at + d]
    };
    let mut out = vec![0f32; b * lt * h * d];
    let (mut oa, mut ob) = (Vec::new(), Vec::new());
    for s in 0..b {
        for t in 0..lt {
            for j in 0..h {
                let q = row(0, s, t, j);
                let mut acc = vec![0f32; d];
                for k in 0..lt {
                    let dot: f32 = q.iter().zip(row(1, s, k, j)).map(|(x, y)| x * y).sum();
                    let p = bf16::from_f32(dot).to_f32();
                    for (a, v) in acc.iter_mut().zip(row(2, s, k, j)) {
                        *a += p * v;
                    }
                }
                let dst = if t < la { &mut oa } else { &mut ob };
                dst.push((s, t, j, acc));
            }
        }
    }
    // [B, La, H, d] then [B, Lb, H, d]
    let mut i = 0;
    for (_, _, _, acc) in oa.into_iter().chain(ob) {
        out[i..i + d].copy_from_slice(&acc);
        i += d;
    }
    out
}

/// The backward H11 (H13) changes only how K, V, Q and dO reach shared memory (TMA) and how dQ
/// reaches its accumulator: its gradients are H6's at d = 64 (H12's at 128) — dK and dV bit for
/// bit (accumulated in one block's registers), dQ bit for bit where the reductions into its
/// accumulator run in a fixed order (the emulator) and within the parity tolerance on a GPU
/// (atomic adds) — with partial tiles in both streams, an empty text stream and two samples.
#[test]
fn tma_backward_matches_h6() {
    for dev in devices() {
        let enabled = gpu::BwdVariant::enabled();
        for (tma, base, d) in [
            (gpu::BwdVariant::H11, gpu::BwdVariant::H6, 64),
            (gpu::BwdVariant::H13, gpu::BwdVariant::H12, 128),
        ] {
            if !dev.has_wgmma() || !enabled.contains(&tma) || !enabled.contains(&base) {
                eprintln!(
                    "tma backward: {} runs no wgmma, or {tma:?} or {base:?} is left out; skipped",
                    dev.name()
                );
                continue;
            }
            tma_backward_matches_its_base(&dev, tma, base, d);
        }
    }
}

fn tma_backward_matches_its_base(
    dev: &KernelDevice,
    tma: gpu::BwdVariant,
    base: gpu::BwdVariant,
    d: usize,
) {
    let fixed_order = dev.name() == "emulator";
    let (tn, bn) = (
        format!("{tma:?}").to_lowercase(),
        format!("{base:?}").to_lowercase(),
    );
    for (b, la, lb, h) in [
        (2usize, 77usize, 130usize, 2usize),
        (2, 0, 200, 1),
        (1, 140, 300, 3),
    ] {
        let inp = Inputs::new(b, la, lb, h, d, 1.0, 9300 + la as u64 + d as u64 - 64);
        let [qa, ka, va, qb, kb, vb] = inp.qkv.each_ref().map(|v| upload_bf16(dev, v));
        let (doa, dob) = (upload_bf16(dev, &inp.do_a), upload_bf16(dev, &inp.do_b));
        let (oa, ob, lse) =
            gpu::joint_attention_fwd(dev, &qa, &ka, &va, &qb, &kb, &vb, inp.dims).unwrap();
        let grads = |variant| {
            gpu::joint_attention_bwd_with(
                dev, &qa, &ka, &va, &qb, &kb, &vb, &oa, &ob, &lse, &doa, &dob, inp.dims, variant,
            )
            .unwrap()
            .map(|g| download_f32(dev, &g))
        };
        let (got, want) = (grads(tma), grads(base));
        let names = ["dq_a", "dk_a", "dv_a", "dq_b", "dk_b", "dv_b"];
        for ((name, got), want) in names.iter().zip(&got).zip(&want) {
            if name.starts_with("dq") && !fixed_order {
                let kernel = format!("joint_attention_bwd[{tn} vs {bn}].{name}");
                check(&kernel, dev, &inp.shape(), got, want, 1e-2);
            } else {
                let same = got
                    .iter()
                    .zip(want)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same,
                    "{tma:?} and {base:?} differ in {name} at {} on {}",
                    inp.shape(),
                    dev.name()
                );
            }
        }
        println!(
            "kernel joint_attention_bwd[{tn}] = [{bn}]{}, {}, device {}",
            if fixed_order {
                " bit for bit"
            } else {
                " (dk, dv bit for bit)"
            },
            inp.shape(),
            dev.name()
        );
    }
}

/// The forward H11–H14 build on at head dim `d` (H4 at 64, H3 at 128): the variants that change
/// only a schedule (when P is taken, how tiles arrive) match its output bit for bit.
fn schedule_base(d: usize) -> gpu::FwdVariant {
    if d == 64 {
        gpu::FwdVariant::H4
    } else {
        gpu::FwdVariant::H3
    }
}

/// The forward by `variant` on q, k, v of both streams: O of each stream and lse.
fn fwd_run(
    dev: &KernelDevice,
    qkv: &[DevBuf<bf16>; 6],
    dims: AttnDims,
    variant: gpu::FwdVariant,
) -> (DevBuf<bf16>, DevBuf<bf16>, DevBuf<f32>) {
    let [qa, ka, va, qb, kb, vb] = qkv.each_ref();
    gpu::joint_attention_fwd_with(dev, qa, ka, va, qb, kb, vb, dims, variant).unwrap()
}

/// [`fwd_run`]'s outputs as bits.
fn fwd_bits(
    dev: &KernelDevice,
    qkv: &[DevBuf<bf16>; 6],
    dims: AttnDims,
    variant: gpu::FwdVariant,
) -> (Vec<u16>, Vec<u16>, Vec<u32>) {
    let (oa, ob, lse) = fwd_run(dev, qkv, dims, variant);
    let bits = |v: Vec<bf16>| v.iter().map(|x| x.to_bits()).collect::<Vec<u16>>();
    let lse = dev
        .download(&lse)
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect();
    (
        bits(dev.download(&oa).unwrap()),
        bits(dev.download(&ob).unwrap()),
        lse,
    )
}

/// The fallback's backward has no atomics either (dQ per query row, dK and dV per key row): two
/// runs agree bit for bit.
#[test]
fn joint_attention_fallback_bwd_is_deterministic() {
    for dev in devices() {
        let inp = Inputs::new(2, 5, 16, 2, 16, 1.0, 11);
        let dims = inp.dims;
        let [qa, ka, va, qb, kb, vb] = inp.qkv.each_ref().map(|v| upload_bf16(&dev, v));
        let (doa, dob) = (upload_bf16(&dev, &inp.do_a), upload_bf16(&dev, &inp.do_b));
        let (oa, ob, lse) =
            gpu::joint_attention_fwd(&dev, &qa, &ka, &va, &qb, &kb, &vb, dims).unwrap();
        let run = || {
            let grads = gpu::joint_attention_bwd(
                &dev, &qa, &ka, &va, &qb, &kb, &vb, &oa, &ob, &lse, &doa, &dob, dims,
            )
            .unwrap();
            grads.map(|g| {
                dev.download(&g)
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<u16>>()
            })
        };
        assert!(
            run() == run(),
            "joint_attention_bwd (fallback, d = 16) on {}: two runs differ",
            dev.name()
        );
    }
}

/// Head dims past the fallback's 256 (and 0), buffers that do not match the dims, and no tokens at
/// all are errors.
#[test]
fn joint_attention_rejects_bad_dims() {
    let dev = KernelDevice::emulator();
    let empty = upload_bf16(&dev, &[]);
    for d in [0, 257, 512] {
        let dims = AttnDims {
            b: 1,
            la: 0,
            lb: 8,
            h: 1,
            d,
        };
        let buf = upload_bf16(&dev, &vec![0.0; 8 * d]);
        assert!(
            gpu::joint_attention_fwd(&dev, &empty, &empty, &empty, &buf, &buf, &buf, dims).is_err(),
            "head dim {d} accepted"
        );
    }
    let buf = upload_bf16(&dev, &vec![0.0; 8 * 32]);
    for d in [16, 64] {
        let dims = AttnDims {
            b: 1,
            la: 0,
            lb: 8,
            h: 1,
            d,
        };
        assert!(
            gpu::joint_attention_fwd(&dev, &empty, &empty, &empty, &buf, &buf, &buf, dims).is_err(),
            "8×32 buffers accepted for d = {d}"
        );
    }
    let dims = AttnDims {
        b: 1,
        la: 0,
        lb: 0,
        h: 1,
        d: 32,
    };
    assert!(
        gpu::joint_attention_fwd(&dev, &empty, &empty, &empty, &empty, &empty, &empty, dims)
            .is_err()
    );
}

#[test]
fn joint_attention_flops_follow_the_fa_convention() {
    let dims = AttnDims {
        b: 2,
        la: 333,
        lb: 4096,
        h: 24,
        d: 64,
    };
    let fwd = 4.0 * 4429f64.powi(2) * 64.0 * 24.0 * 2.0;
    assert_eq!(gpu::joint_attention_flops(dims, false), fwd);
    assert_eq!(gpu::joint_attention_flops(dims, true), 2.5 * fwd);
}

/// V read in place from fused qkv tensors `[B, L, 3, H, d]` (the MMDiT's layout) and dV written
/// back into fused gradients: the same outputs, lse and gradients as the plain call on separate
/// tensors — bit for bit, except dQ on a GPU (its f32 reductions sum in no fixed order there) —
/// and the fused gradients' q and k columns left alone.
#[test]
fn joint_attention_reads_v_inside_a_fused_qkv() {
    for dev in devices() {
        for &(b, la, lb, h, d) in &[(2, 7, 64, 2, 64), (1, 33, 96, 2, 128), (2, 0, 16, 2, 64)] {
            let inp = Inputs::new(b, la, lb, h, d, 1.0, 91 + d as u64);
            let dims = inp.dims;
            let hd = h * d;
            // fused [B·L, 3·H·d] with v in the last third (q, k thirds: other values)
            let fuse = |v: &[f32], l: usize| -> Vec<f32> {
                let mut f = vec![0.5f32; b * l * 3 * hd];
                for r in 0..b * l {
                    f[r * 3 * hd + 2 * hd..(r + 1) * 3 * hd]
                        .copy_from_slice(&v[r * hd..(r + 1) * hd]);
                }
                f
            };
            let up = |v: &[f32]| upload_bf16(&dev, v);
            let [qa, ka, va, qb, kb, vb] = std::array::from_fn(|i| up(&inp.qkv[i]));
            let (fa, fb) = (up(&fuse(&inp.qkv[2], la)), up(&fuse(&inp.qkv[5], lb)));
            fn window(
                f: &DevBuf<bf16>,
                l: usize,
                hd: usize,
            ) -> advdmd::device::kernel::DevView<'_, bf16> {
                let off = if l == 0 { 0 } else { 2 * hd };
                f.view(off, f.len() - off).unwrap()
            }
            let (vfa, vfb) = (window(&fa, la, hd), window(&fb, lb, hd));
            let (oa, ob, lse) =
                gpu::joint_attention_fwd(&dev, &qa, &ka, &va, &qb, &kb, &vb, dims).unwrap();
            let (oa2, ob2, lse2) =
                gpu::joint_attention_fwd_v_ld(&dev, &qa, &ka, &vfa, &qb, &kb, &vfb, dims, 3 * hd)
                    .unwrap();
            let shape = inp.shape();
            assert_eq!(
                download_f32(&dev, &oa2),
                download_f32(&dev, &oa),
                "{shape}: o_a"
            );
            assert_eq!(
                download_f32(&dev, &ob2),
                download_f32(&dev, &ob),
                "{shape}: o_b"
            );
            assert_eq!(
                dev.download(&lse2).unwrap(),
                dev.download(&lse).unwrap(),
                "{shape}: lse"
            );
            // Every forward variant's _vfused entry reproduces its plain entry.
            for variant in gpu::FwdVariant::enabled() {
                let plain = gpu::joint_attention_fwd_with(
                    &dev, &qa, &ka, &va, &qb, &kb, &vb, dims, variant,
                )
                .unwrap();
                let fused = gpu::joint_attention_fwd_v_ld_with(
                    &dev,
                    [&qa, &ka, &vfa, &qb, &kb, &vfb],
                    dims,
                    3 * hd,
                    variant,
                )
                .unwrap();
                for (name, got, want) in [
                    (
                        "o_a",
                        download_f32(&dev, &fused.0),
                        download_f32(&dev, &plain.0),
                    ),
                    (
                        "o_b",
                        download_f32(&dev, &fused.1),
                        download_f32(&dev, &plain.1),
                    ),
                ] {
                    assert_eq!(got, want, "{shape} {variant:?}: {name}");
                }
            }

            // Every backward variant's _vfused entry reproduces its plain entry: dK, dV bit for
            // bit, dQ too on the emulator (on a GPU its f32 reductions have no fixed order).
            let (doa, dob) = (up(&inp.do_a), up(&inp.do_b));
            for variant in gpu::BwdVariant::enabled() {
                let plain = gpu::joint_attention_bwd_with(
                    &dev, &qa, &ka, &va, &qb, &kb, &vb, &oa, &ob, &lse, &doa, &dob, dims, variant,
                )
                .unwrap();
                let (ga, gb) = (up(&vec![7.0; fa.len()]), up(&vec![7.0; fb.len()]));
                let (dva, dvb) = (window(&ga, la, hd), window(&gb, lb, hd));
                let [dqa, dka, dqb, dkb] = gpu::joint_attention_bwd_v_ld_with(
                    &dev,
                    [&qa, &ka, &vfa, &qb, &kb, &vfb],
                    [&oa, &ob, &doa, &dob],
                    &lse,
                    dims,
                    3 * hd,
                    [&dva, &dvb],
                    variant,
                )
                .unwrap();
                let exact_dq = dev.is_emulator();
                for (what, got, want, exact) in [
                    ("dq_a", &dqa, &plain[0], exact_dq),
                    ("dk_a", &dka, &plain[1], true),
                    ("dq_b", &dqb, &plain[3], exact_dq),
                    ("dk_b", &dkb, &plain[4], true),
                ] {
                    let (g, w) = (download_f32(&dev, got), download_f32(&dev, want));
                    if exact {
                        assert_eq!(g, w, "{shape} {variant:?}: {what}");
                    } else {
                        check(
                            &format!("attention[v fused, {variant:?}].{what}"),
                            &dev,
                            &shape,
                            &g,
                            &w,
                            1e-2,
                        );
                    }
                }
                // dQ left in the f32 accumulators: bf16(scale · acc) is the converted dQ (the
                // same bits on the emulator), dK the same bits
                let (ga32, gb32) = (up(&vec![7.0; fa.len()]), up(&vec![7.0; fb.len()]));
                let (dva32, dvb32) = (window(&ga32, la, hd), window(&gb32, lb, hd));
                let (dq, [dka32, dkb32]) = gpu::joint_attention_bwd_v_ld_dq32(
                    &dev,
                    [&qa, &ka, &vfa, &qb, &kb, &vfb],
                    [&oa, &ob, &doa, &dob],
                    &lse,
                    dims,
                    3 * hd,
                    [&dva32, &dvb32],
                    variant,
                )
                .unwrap();
                let gpu::DqGrad::Scaled { a, b: acc_b, scale } = dq else {
                    panic!(
                        "{shape} {variant:?}: dQ converted where the accumulators were asked for"
                    );
                };
                assert_eq!(scale, dims.scale());
                for (what, acc, want) in [("dq_a", &a, &dqa), ("dq_b", &acc_b, &dqb)] {
                    let g: Vec<f32> = dev
                        .download(acc)
                        .unwrap()
                        .iter()
                        .map(|&v| bf16::from_f32(v * scale).to_f32())
                        .collect();
                    let w = download_f32(&dev, want);
                    if exact_dq {
                        assert_eq!(g, w, "{shape} {variant:?}: {what} from the accumulator");
                    } else {
                        let name = format!("attention[dq32, {variant:?}].{what}");
                        check(&name, &dev, &shape, &g, &w, 1e-2);
                    }
                }
                for (what, got, want) in [("dk_a", &dka32, &dka), ("dk_b", &dkb32, &dkb)] {
                    let (g, w) = (download_f32(&dev, got), download_f32(&dev, want));
                    assert_eq!(g, w, "{shape} {variant:?}: {what} beside the accumulators");
                }
                let (g32, g16) = (download_f32(&dev, &ga32), download_f32(&dev, &ga));
                assert_eq!(
                    g32, g16,
                    "{shape} {variant:?}: dv_a beside the accumulators"
                );
                let (g32, g16) = (download_f32(&dev, &gb32), download_f32(&dev, &gb));
                assert_eq!(
                    g32, g16,
                    "{shape} {variant:?}: dv_b beside the accumulators"
                );
                for (what, g, want, l) in
                    [("dv_a", &ga, &plain[2], la), ("dv_b", &gb, &plain[5], lb)]
                {
                    let (g, want) = (download_f32(&dev, g), download_f32(&dev, want));
                    for r in 0..b * l {
                        let row = &g[r * 3 * hd..(r + 1) * 3 * hd];
                        assert!(
                            row[..2 * hd].iter().all(|&x| x == 7.0),
                            "{shape} {variant:?}: {what} wrote q/k columns"
                        );
                        assert_eq!(
                            &row[2 * hd..],
                            &want[r * hd..(r + 1) * hd],
                            "{shape} {variant:?}: {what} row {r}"
                        );
                    }
                }
            }
            // The split backward's combine writes dV inside the fused gradient as the plain
            // launch does (H3–H8: every unit split two ways where a unit has two query tiles;
            // dK, dV bit for bit).
            for variant in gpu::BwdVariant::enabled() {
                let Some((units, tiles)) = variant.split_units(dims) else {
                    continue;
                };
                if tiles < 2 {
                    continue; // one query tile: nothing to split
                }
                let plan = gpu::SplitPlan {
                    split_from: 0,
                    splits: 2,
                };
                let run = |fused: bool| {
                    let (ga, gb) = (up(&vec![7.0; fa.len()]), up(&vec![7.0; fb.len()]));
                    let (dva, dvb) = (window(&ga, la, hd), window(&gb, lb, hd));
                    let (va_, vb_, v_ld) = if fused {
                        (&*vfa, &*vfb, 3 * hd)
                    } else {
                        (&va, &vb, hd)
                    };
                    let (pa, pb);
                    let dv: [&DevBuf<bf16>; 2] = if fused {
                        [&dva, &dvb]
                    } else {
                        pa = dev.alloc::<bf16>(va.len()).unwrap();
                        pb = dev.alloc::<bf16>(vb.len()).unwrap();
                        [&pa, &pb]
                    };
                    let [_, dka, _, dkb] = gpu::joint_attention_bwd_v_ld_split_with(
                        &dev,
                        [&qa, &ka, va_, &qb, &kb, vb_],
                        [&oa, &ob, &doa, &dob],
                        &lse,
                        dims,
                        v_ld,
                        dv,
                        variant,
                        plan,
                    )
                    .unwrap();
                    let dv_rows = |g: &DevBuf<bf16>, l: usize| -> Vec<f32> {
                        let all = download_f32(&dev, g);
                        (0..b * l)
                            .flat_map(|r| all[r * v_ld..r * v_ld + hd].to_vec())
                            .collect()
                    };
                    let (dva_rows, dvb_rows) = (dv_rows(dv[0], la), dv_rows(dv[1], lb));
                    (
                        download_f32(&dev, &dka),
                        download_f32(&dev, &dkb),
                        dva_rows,
                        dvb_rows,
                    )
                };
                assert!(units > 0);
                assert!(
                    run(true) == run(false),
                    "{shape} {variant:?} split: the fused dK, dV differ from the plain ones"
                );
            }
            println!(
                "kernel attention[v fused]           device {:<24} shape {shape:<18} identical",
                dev.name()
            );
        }
        // a stride other than the fused qkv's is refused
        let inp = Inputs::new(1, 3, 8, 2, 64, 1.0, 5);
        let [qa, ka, va, qb, kb, vb] = std::array::from_fn(|i| upload_bf16(&dev, &inp.qkv[i]));
        assert!(gpu::joint_attention_fwd_v_ld(
            &dev,
            &qa,
            &ka,
            &va,
            &qb,
            &kb,
            &vb,
            inp.dims,
            2 * 128
        )
        .is_err());
    }
}

/// `poly_exp2`, the exponentials H4 and H6 take on the FMA pipes: within 1e-4 of 2^x (relative)
/// over the range a softmax feeds it (scores minus the lazy maximum: up to +8, down past the
/// −125 floor), at most 2^−124 below −125, and finite at −inf (a masked key).
#[test]
fn poly_exp2_is_within_1e4_of_exp2() {
    use advdmd::device::kernel::{KernelArgs, LaunchCfg};
    let mut x: Vec<f32> = (0..=13_800).map(|i| 8.0 - i as f32 * 0.01).collect();
    x.extend([
        0.0,
        -0.5,
        0.5,
        -1e-7,
        -125.0,
        -125.5,
        -200.0,
        f32::NEG_INFINITY,
    ]);
    for dev in devices() {
        let xd = dev.upload(&x).unwrap();
        let y = dev.alloc::<f32>(x.len()).unwrap();
        let n = x.len();
        dev.launch(
            "poly_exp2_probe",
            LaunchCfg {
                grid: [n.div_ceil(256) as u32, 1, 1],
                block: [256, 1, 1],
                shared_bytes: 0,
            },
            KernelArgs::new().buf(&y).buf(&xd).i32(n as i32),
        )
        .unwrap();
        let got = dev.download(&y).unwrap();
        let mut worst = 0f64;
        for (&xi, &yi) in x.iter().zip(&got) {
            if xi >= -125.0 {
                let want = (xi as f64).exp2();
                let rel = ((yi as f64) - want).abs() / want;
                assert!(
                    rel <= 1e-4,
                    "poly_exp2({xi}) = {yi}, want {want} (rel {rel:.2e})"
                );
                worst = worst.max(rel);
            } else {
                assert!(
                    yi.is_finite() && (0.0..=2f32.powi(-124)).contains(&yi),
                    "poly_exp2({xi}) = {yi}"
                );
            }
        }
        println!(
            "kernel poly_exp2 device {} max_rel_err {worst:.3e}",
            dev.name()
        );
    }
}
