//! The device GEMM (cuBLASLt on a GPU, the CPU GEMM under the emulator) against an f64 loop, with
//! every epilogue the model uses.

use super::*;
use advdmd::device::kernel::{EpilogueKind as E, GemmSpec};
use advdmd::kernels::gemm::dev::{
    gelu_tanh, gelu_tanh_grad, gemm_bf16, gemm_bf16_dgelu, gemm_bf16_via, EpilogueBufs,
    SmallProducts,
};

fn reference(spec: &GemmSpec, a: &[f32], b: &[f32]) -> Vec<f32> {
    let GemmSpec { m, n, k, .. } = *spec;
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for p in 0..k {
                let av = if spec.trans_a {
                    a[p * m + i]
                } else {
                    a[i * k + p]
                };
                let bv = if spec.trans_b {
                    b[j * k + p]
                } else {
                    b[p * n + j]
                };
                s += av as f64 * bv as f64;
            }
            out[i * n + j] = s as f32;
        }
    }
    out
}

/// M ≤ 8 with K % 8 == 0 (NT, None or Bias) runs `gemv_small_m` when asked: (8, 8, 8), (1, 96, 1536),
/// (3, 40, 24), and (2, 16, 2600), whose rows are longer than one round of its packs (2048);
/// (5, 24, 36) does not (K % 8 ≠ 0).
const SHAPES: &[(usize, usize, usize)] = &[
    (8, 8, 8),
    (33, 24, 40),
    (128, 256, 64),
    (77, 1536, 192),
    (1, 96, 1536),
    (3, 40, 24),
    (2, 16, 2600),
    (5, 24, 36),
];

#[test]
fn gemm_with_every_epilogue_matches_reference() {
    for dev in devices() {
        for &(m, n, k) in SHAPES {
            for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
                let mut rng = Rng::new((m * 31 + n * 7 + k) as u64);
                let a = randn_bf16(&mut rng, m * k, 1.0);
                let b = randn_bf16(&mut rng, k * n, 0.2);
                let bias = randn_bf16(&mut rng, n, 0.5);
                let (ad, bd, biasd) = (
                    upload_bf16(&dev, &a),
                    upload_bf16(&dev, &b),
                    upload_bf16(&dev, &bias),
                );
                let base = GemmSpec {
                    m,
                    n,
                    k,
                    trans_a,
                    trans_b,
                    epilogue: E::None,
                };
                let prod = reference(&base, &a, &b);
                let shape = format!("{m}x{n}x{k} t{}{}", trans_a as u8, trans_b as u8);
                let c = dev.alloc(m * n).unwrap();

                // the model's routing, and our small-M kernel by name (`gemv_small_m` where it
                // applies: the default sends those products to the library)
                for via in [SmallProducts::Fastest, SmallProducts::OwnKernels] {
                    let none = EpilogueBufs::default();
                    gemm_bf16_via(&dev, base, &ad, &bd, &c, none, via).unwrap();
                    check("gemm", &dev, &shape, &download_f32(&dev, &c), &prod, 1e-2);

                    let spec = GemmSpec {
                        epilogue: E::Bias,
                        ..base
                    };
                    let ep = EpilogueBufs {
                        bias: Some(&biasd),
                        ..Default::default()
                    };
                    gemm_bf16_via(&dev, spec, &ad, &bd, &c, ep, via).unwrap();
                    let want: Vec<f32> = prod
                        .iter()
                        .enumerate()
                        .map(|(i, v)| v + bias[i % n])
                        .collect();
                    let c = download_f32(&dev, &c);
                    check("gemm+bias", &dev, &shape, &c, &want, 1e-2);
                }

                let spec = GemmSpec {
                    epilogue: E::GeluBias,
                    ..base
                };
                gemm_bf16(
                    &dev,
                    spec,
                    &ad,
                    &bd,
                    &c,
                    EpilogueBufs {
                        bias: Some(&biasd),
                        ..Default::default()
                    },
                )
                .unwrap();
                let want: Vec<f32> = prod
                    .iter()
                    .enumerate()
                    .map(|(i, v)| gelu_tanh(v + bias[i % n]))
                    .collect();
                check(
                    "gemm+gelu_bias",
                    &dev,
                    &shape,
                    &download_f32(&dev, &c),
                    &want,
                    1e-2,
                );

                if n % 8 != 0 || trans_a || trans_b {
                    continue; // the aux epilogues: the layouts the MLP uses, ld a multiple of 8
                }
                let aux = dev.alloc(m * n).unwrap();
                let spec = GemmSpec {
                    epilogue: E::GeluAuxBias,
                    ..base
                };
                gemm_bf16(
                    &dev,
                    spec,
                    &ad,
                    &bd,
                    &c,
                    EpilogueBufs {
                        bias: Some(&biasd),
                        aux: Some(&aux),
                        ..Default::default()
                    },
                )
                .unwrap();
                let pre: Vec<f32> = prod
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v + bias[i % n])
                    .collect();
                check(
                    "gemm+gelu_aux_bias.aux",
                    &dev,
                    &shape,
                    &download_f32(&dev, &aux),
                    &pre,
                    1e-2,
                );
                let want: Vec<f32> = pre.iter().map(|&x| gelu_tanh(x)).collect();
                check(
                    "gemm+gelu_aux_bias",
                    &dev,
                    &shape,
                    &download_f32(&dev, &c),
                    &want,
                    1e-2,
                );

                // DGELU with bias gradient, reading the aux just written (rounded to bf16).
                let aux_host = download_f32(&dev, &aux);
                let bgrad = dev.alloc(n).unwrap();
                let spec = GemmSpec {
                    epilogue: E::DGeluBgrad,
                    ..base
                };
                gemm_bf16(
                    &dev,
                    spec,
                    &ad,
                    &bd,
                    &c,
                    EpilogueBufs {
                        aux: Some(&aux),
                        bias_grad: Some(&bgrad),
                        ..Default::default()
                    },
                )
                .unwrap();
                let want: Vec<f32> = prod
                    .iter()
                    .zip(&aux_host)
                    .map(|(v, &x)| v * gelu_tanh_grad(x))
                    .collect();
                check(
                    "gemm+dgelu_bgrad",
                    &dev,
                    &shape,
                    &download_f32(&dev, &c),
                    &want,
                    2e-2,
                );
                let mut bg = vec![0f32; n];
                want.iter().enumerate().for_each(|(i, v)| bg[i % n] += v);
                check(
                    "gemm+dgelu_bgrad.bias_grad",
                    &dev,
                    &shape,
                    &download_f32(&dev, &bgrad),
                    &bg,
                    2e-2,
                );

                // The same as a plain GEMM, GELU's backward and a column sum added into an f32
                // bias gradient (the model's path).
                let (dh, dpre) = (dev.alloc(m * n).unwrap(), dev.alloc(m * n).unwrap());
                let old: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 1.0).collect();
                let bg32 = dev.upload(&old).unwrap();
                gemm_bf16_dgelu(&dev, (m, n, k), &ad, &bd, &aux, &dh, &dpre, Some(&bg32)).unwrap();
                check(
                    "gemm_bf16_dgelu",
                    &dev,
                    &shape,
                    &download_f32(&dev, &dpre),
                    &want,
                    2e-2,
                );
                let want_bg: Vec<f32> = old.iter().zip(&bg).map(|(o, g)| o + g).collect();
                check(
                    "gemm_bf16_dgelu.bias_grad",
                    &dev,
                    &shape,
                    &dev.download(&bg32).unwrap(),
                    &want_bg,
                    2e-2,
                );
            }
            // Weight gradient with the bias gradient: dW[N_out, K_in] = dYᵀ·X, db = Σ_tokens dY.
            let (tokens, out_f, in_f) = (m, n, k);
            let mut rng = Rng::new(99 + m as u64);
            let dy = randn_bf16(&mut rng, tokens * out_f, 1.0);
            let x = randn_bf16(&mut rng, tokens * in_f, 1.0);
            let spec = GemmSpec {
                m: out_f,
                n: in_f,
                k: tokens,
                trans_a: true,
                trans_b: false,
                epilogue: E::BgradB,
            };
            let (dyd, xd) = (upload_bf16(&dev, &dy), upload_bf16(&dev, &x));
            let dw = dev.alloc(out_f * in_f).unwrap();
            let db = dev.alloc(out_f).unwrap();
            gemm_bf16(
                &dev,
                spec,
                &dyd,
                &xd,
                &dw,
                EpilogueBufs {
                    bias_grad: Some(&db),
                    ..Default::default()
                },
            )
            .unwrap();
            let shape = format!("wgrad {tokens}x{out_f}x{in_f}");
            check(
                "gemm+bgradb",
                &dev,
                &shape,
                &download_f32(&dev, &dw),
                &reference(&spec, &dy, &x),
                1e-2,
            );
            let mut want = vec![0f32; out_f];
            dy.iter()
                .enumerate()
                .for_each(|(i, v)| want[i % out_f] += v);
            check(
                "gemm+bgradb.bias_grad",
                &dev,
                &shape,
                &download_f32(&dev, &db),
                &want,
                2e-2,
            );
        }
    }
}

/// The weight-gradient GEMM that adds its f32 product (and bias gradient) into existing f32
/// gradients: the sum of the old contents and the product, to f32 accuracy of the bf16 operands
/// (tighter than any bf16 output could be), with and without the bias epilogue.
#[test]
fn accumulating_weight_gradient_gemm_adds_in_f32() {
    use advdmd::kernels::gemm::dev::{gemm_bf16_acc_f32, gemm_bf16_f32};
    for dev in devices() {
        // K ≤ 8 with in_f % 8 == 0 runs `weight_grad_small_k` (the modulation layers' gradient:
        // one row per sample), the rest cuBLASLt (the CPU GEMM under the emulator)
        for &(tokens, out_f, in_f) in &[
            (40, 24, 33),
            (256, 128, 64),
            (333, 192, 77),
            (1, 96, 1536),
            (5, 40, 24),
            (8, 300, 136),
            (3, 16, 12),
        ] {
            let mut rng = Rng::new(7 + tokens as u64);
            let dy = randn_bf16(&mut rng, tokens * out_f, 1.0);
            let x = randn_bf16(&mut rng, tokens * in_f, 1.0);
            let old_w: Vec<f32> = (0..out_f * in_f).map(|_| rng.normal()).collect();
            let old_b: Vec<f32> = (0..out_f).map(|_| rng.normal()).collect();
            let (dyd, xd) = (upload_bf16(&dev, &dy), upload_bf16(&dev, &x));
            // `overwrite` (a gradient's first write since zero_grad): the product alone, the
            // old values unread; the bias gradient is added either way
            for (with_bias, overwrite) in
                [(false, false), (true, false), (false, true), (true, true)]
            {
                let spec = GemmSpec {
                    m: out_f,
                    n: in_f,
                    k: tokens,
                    trans_a: true,
                    trans_b: false,
                    epilogue: if with_bias { E::BgradB } else { E::None },
                };
                let (gw, gb) = (dev.upload(&old_w).unwrap(), dev.upload(&old_b).unwrap());
                let bias = with_bias.then_some(&gb);
                if overwrite {
                    gemm_bf16_f32(
                        &dev,
                        spec,
                        &dyd,
                        &xd,
                        &gw,
                        bias,
                        true,
                        SmallProducts::OwnKernels,
                    )
                    .unwrap();
                } else {
                    gemm_bf16_acc_f32(&dev, spec, &dyd, &xd, &gw, bias).unwrap();
                }
                let want: Vec<f32> = reference(&spec, &dy, &x)
                    .iter()
                    .zip(&old_w)
                    .map(|(p, o)| if overwrite { *p } else { p + o })
                    .collect();
                let op = if overwrite { "=" } else { "+=" };
                let shape = format!("wgrad{op} {tokens}x{out_f}x{in_f} bias={with_bias}");
                check(
                    "gemm_acc_f32",
                    &dev,
                    &shape,
                    &dev.download(&gw).unwrap(),
                    &want,
                    1e-4,
                );
                let mut want_b = old_b.clone();
                if with_bias {
                    dy.iter()
                        .enumerate()
                        .for_each(|(i, v)| want_b[i % out_f] += v);
                }
                let got_b = dev.download(&gb).unwrap();
                check("gemm_acc_f32.bias", &dev, &shape, &got_b, &want_b, 1e-4);
            }
            // a bias epilogue needs its gradient buffer, and nothing else is accepted
            let bad = GemmSpec {
                m: out_f,
                n: in_f,
                k: tokens,
                trans_a: true,
                trans_b: false,
                epilogue: E::Bias,
            };
            let gw = dev.upload(&old_w).unwrap();
            assert!(gemm_bf16_acc_f32(&dev, bad, &dyd, &xd, &gw, None).is_err());
        }
    }
}

/// A linear layer over at most 8 rows and a weight gradient over at most 8 rows run the
/// memory-bound kernels of small_gemm.cu (not cuBLASLt), credited their FLOPs in a profile.
#[test]
fn small_products_run_their_own_kernels() {
    use advdmd::kernels::gemm::dev::gemm_bf16_f32;
    for dev in devices() {
        let (m, n, k) = (2, 96, 64);
        let mut rng = Rng::new(5);
        let (x, w) = (
            randn_bf16(&mut rng, m * k, 1.0),
            randn_bf16(&mut rng, n * k, 1.0),
        );
        let (xd, wd, bias) = (
            upload_bf16(&dev, &x),
            upload_bf16(&dev, &w),
            upload_bf16(&dev, &w[..n]),
        );
        let fwd = GemmSpec {
            m,
            n,
            k,
            trans_a: false,
            trans_b: true,
            epilogue: E::Bias,
        };
        let wgrad = GemmSpec {
            m: n,
            n: k,
            k: m,
            trans_a: true,
            trans_b: false,
            epilogue: E::BgradB,
        };
        let dy = upload_bf16(&dev, &randn_bf16(&mut rng, m * n, 1.0));
        // both products sent `via`: their profile, y and the weight and bias gradients
        let run = |via: SmallProducts| {
            let y = dev.alloc(m * n).unwrap();
            let (gw, gb) = (
                dev.zeros::<f32>(n * k).unwrap(),
                dev.zeros::<f32>(n).unwrap(),
            );
            let p = dev
                .profile(|| {
                    let ep = EpilogueBufs {
                        bias: Some(&bias),
                        ..Default::default()
                    };
                    gemm_bf16_via(&dev, fwd, &xd, &wd, &y, ep, via)?;
                    gemm_bf16_f32(&dev, wgrad, &dy, &xd, &gw, Some(&gb), false, via)
                })
                .unwrap();
            (p, y, gw, gb)
        };
        let (p, y, gw, gb) = run(SmallProducts::OwnKernels);
        for name in ["gemv_small_m", "weight_grad_small_k"] {
            let row = p
                .rows
                .iter()
                .find(|r| r.name == name)
                .unwrap_or_else(|| panic!("{name}: {:?}", p.rows));
            assert_eq!(
                (row.calls, row.flops),
                (1, 2 * (m * n * k) as u64),
                "{name}"
            );
        }
        // the library path the bench compares them with: no kernel of ours, the same products
        let (p, y2, gw2, gb2) = run(SmallProducts::Library);
        assert!(
            p.rows
                .iter()
                .all(|r| r.name != "gemv_small_m" && r.name != "weight_grad_small_k"),
            "{:?}",
            p.rows
        );
        let f = |b: &DevBuf<bf16>| download_f32(&dev, b);
        check("gemv vs cuBLASLt", &dev, "2x96x64", &f(&y2), &f(&y), 1e-2);
        for (name, a, b) in [("weight_grad", &gw2, &gw), ("weight_grad.bias", &gb2, &gb)] {
            let (got, want) = (dev.download(a).unwrap(), dev.download(b).unwrap());
            check(name, &dev, "96x64x2", &got, &want, 1e-4);
        }
    }
}

/// `c (+)= a·b` over at most 8 rows of `a` with `b` read along its rows (NN: a modulation layer's
/// input gradient added into the f32 gradient of its input) runs `gemv_small_m_nn_partial` and
/// `sum_splits`: against the f64 reference, accumulating and overwriting, with column counts past
/// and short of a 256-column tile, K not a multiple of the splits' rows, and a K shorter than the
/// 8 rows a split asks for; the profile names the kernel with the product's FLOPs.
#[test]
fn small_m_nn_products_add_into_f32() {
    use advdmd::kernels::gemm::dev::gemm_bf16_f32;
    for dev in devices() {
        for &(m, n, k) in &[
            (1, 64, 48),
            (2, 264, 200),
            (8, 520, 1000),
            (3, 8, 5),
            (5, 1536, 96),
        ] {
            let mut rng = Rng::new(31 + (m * n + k) as u64);
            let (a, b) = (
                randn_bf16(&mut rng, m * k, 1.0),
                randn_bf16(&mut rng, k * n, 1.0),
            );
            let old: Vec<f32> = (0..m * n).map(|_| rng.normal()).collect();
            let (ad, bd) = (upload_bf16(&dev, &a), upload_bf16(&dev, &b));
            let spec = GemmSpec {
                m,
                n,
                k,
                trans_a: false,
                trans_b: false,
                epilogue: E::None,
            };
            let product = reference(&spec, &a, &b);
            for overwrite in [false, true] {
                let c = dev.upload(&old).unwrap();
                let p = dev
                    .profile(|| {
                        // (our kernel by name: the default sends these products to the library)
                        let via = SmallProducts::OwnKernels;
                        gemm_bf16_f32(&dev, spec, &ad, &bd, &c, None, overwrite, via)
                    })
                    .unwrap();
                let row = p.rows.iter().find(|r| r.name == "gemv_small_m_nn_partial");
                let row = row.unwrap_or_else(|| panic!("{:?}", p.rows));
                assert_eq!((row.calls, row.flops), (1, 2 * (m * n * k) as u64));
                let want: Vec<f32> = product
                    .iter()
                    .zip(&old)
                    .map(|(p, o)| if overwrite { *p } else { p + o })
                    .collect();
                let op = if overwrite { "=" } else { "+=" };
                let shape = format!("nn{op} {m}x{n}x{k}");
                check(
                    "gemv_small_m_nn",
                    &dev,
                    &shape,
                    &dev.download(&c).unwrap(),
                    &want,
                    1e-4,
                );
            }
        }
    }
}
