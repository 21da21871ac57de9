//! cuda/disc_head.cu ↔ src/kernels/disc_head.rs (with the LeakyReLU of src/kernels/elementwise.rs).

use super::*;
use advdmd::kernels::disc_head::{self as cpu, dev as gpu};
use advdmd::kernels::elementwise::{activation_bwd, activation_fwd, Activation};

const SLOPE: f32 = 0.2;

/// (B, C, S, groups): register kernels (S % 8 == 0) with 1, 2, 4 and 8 packs per thread (the
/// backward's loop kernel at 8), the loop kernels' vector path (a group over 8192 packs) and scalar
/// path (odd S), one channel per group, a group of more channels than the block has warps, and
/// channels of several warps' packs.
const GN_SHAPES: &[(usize, usize, usize, usize)] = &[
    (2, 8, 16, 4),
    (1, 6, 9, 3),
    (3, 12, 7, 12),
    (2, 64, 64, 32),
    (1, 48, 24, 1),
    (2, 16, 1, 4),
    (3, 32, 256, 2),
    (1, 12, 1024, 1),
    (2, 48, 1024, 2),
    (1, 6, 8192, 1),
    (1, 3, 24000, 1),
];

#[test]
fn group_norm_fwd_and_bwd_match_cpu() {
    for dev in devices() {
        for &(b, c, s, groups) in GN_SHAPES {
            for leaky in [Some(SLOPE), None] {
                let mut rng = Rng::new(41 + (b * c * s) as u64);
                // Per-channel offsets: the means are far from 0, as after a convolution.
                let mut x = randn_bf16(&mut rng, b * c * s, 1.3);
                for (i, v) in x.iter_mut().enumerate() {
                    *v = bf16::from_f32(*v + 0.5 * ((i / s) % c) as f32 / c as f32).to_f32();
                }
                let w: Vec<f32> = randn_bf16(&mut rng, c, 0.3)
                    .iter()
                    .map(|v| bf16::from_f32(1.0 + v).to_f32())
                    .collect();
                let bias = randn_bf16(&mut rng, c, 0.3);
                let dy = randn_bf16(&mut rng, b * c * s, 1.0);
                let tag = if leaky.is_some() { "+leaky" } else { "" };
                let shape = format!("{b}x{c}x{s}/g{groups}");
                let (xd, wd, bd, dyd) = (
                    upload_bf16(&dev, &x),
                    upload_bf16(&dev, &w),
                    upload_bf16(&dev, &bias),
                    upload_bf16(&dev, &dy),
                );

                let (y, mean, rstd) =
                    gpu::group_norm_fwd(&dev, &xd, &wd, &bd, (b, c, s), groups, 1e-5, leaky)
                        .unwrap();
                let xt = tensor(x.clone(), &[b, c, s]);
                let (wt, bt) = (tensor(w.clone(), &[c]), tensor(bias.clone(), &[c]));
                let (pre, mc, rc) = cpu::group_norm_fwd(&xt, groups, &wt, &bt, 1e-5);
                let yc = match leaky {
                    Some(sl) => activation_fwd(&pre, Activation::LeakyRelu(sl)),
                    None => pre.clone(),
                };
                check(
                    &format!("group_norm_fwd{tag}"),
                    &dev,
                    &shape,
                    &download_f32(&dev, &y),
                    yc.f32s(),
                    1e-2,
                );
                check(
                    "group_norm_fwd.mean",
                    &dev,
                    &shape,
                    &dev.download(&mean).unwrap(),
                    mc.f32s(),
                    1e-4,
                );
                check(
                    "group_norm_fwd.rstd",
                    &dev,
                    &shape,
                    &dev.download(&rstd).unwrap(),
                    rc.f32s(),
                    1e-4,
                );

                let dyt = tensor(dy.clone(), &[b, c, s]);
                let dpre = match leaky {
                    Some(sl) => activation_bwd(&pre, &dyt, Activation::LeakyRelu(sl)),
                    None => dyt,
                };
                let (dxc, dwc, dbc) = cpu::group_norm_bwd(&xt, &mc, &rc, &wt, &dpre, groups);
                let (dx, dw, db) = gpu::group_norm_bwd(
                    &dev,
                    &xd,
                    &mean,
                    &rstd,
                    &wd,
                    &bd,
                    &dyd,
                    (b, c, s),
                    groups,
                    leaky,
                )
                .unwrap();
                check(
                    &format!("group_norm_bwd{tag}.dx"),
                    &dev,
                    &shape,
                    &download_f32(&dev, &dx),
                    dxc.f32s(),
                    1e-2,
                );
                check(
                    &format!("group_norm_bwd{tag}.dweight"),
                    &dev,
                    &shape,
                    &dev.download(&dw).unwrap(),
                    dwc.f32s(),
                    1e-4,
                );
                check(
                    &format!("group_norm_bwd{tag}.dbias"),
                    &dev,
                    &shape,
                    &dev.download(&db).unwrap(),
                    dbc.f32s(),
                    1e-4,
                );
            }
        }
    }
}

#[test]
fn mean_pool_fwd_and_bwd_match_cpu() {
    for dev in devices() {
        for &(b, c, s) in &[
            (1usize, 1usize, 1usize),
            (3, 1, 16),
            (5, 3, 37),
            (4, 16, 1024),
            (3, 2, 1096),
            (2, 5, 8),
        ] {
            let mut rng = Rng::new(61 + (b * c * s) as u64);
            let x = randn_bf16(&mut rng, b * c * s, 1.0);
            let dy: Vec<f32> = (0..b * c).map(|_| rng.normal()).collect();
            let shape = format!("{b}x{c}x{s}");
            let out = gpu::mean_pool_fwd(&dev, &upload_bf16(&dev, &x), (b * c, s)).unwrap();
            let want = cpu::mean_pool_spatial(&tensor(x, &[b, c, s]));
            check(
                "mean_pool_fwd",
                &dev,
                &shape,
                &dev.download(&out).unwrap(),
                want.f32s(),
                1e-5,
            );
            let dx = gpu::mean_pool_bwd(&dev, &dev.upload(&dy).unwrap(), (b * c, s)).unwrap();
            let want = cpu::mean_pool_spatial_bwd(&tensor(dy, &[b, c]), &[b, c, s]);
            check(
                "mean_pool_bwd",
                &dev,
                &shape,
                &download_f32(&dev, &dx),
                want.f32s(),
                1e-2,
            );
        }
    }
}

#[test]
fn head_logits_fwd_and_bwd_match_cpu() {
    for dev in devices() {
        let mut rng = Rng::new(17);
        for (b, h) in [(1, 8), (5, 33), (300, 64)] {
            let pooled: Vec<f32> = (0..b * h).map(|_| rng.normal()).collect();
            let w = randn_bf16(&mut rng, h, 0.3);
            let bias = randn_bf16(&mut rng, 1, 0.3);
            let dl: Vec<f32> = (0..b).map(|_| rng.normal()).collect();
            let (pd, wd, bd, dld) = (
                dev.upload(&pooled).unwrap(),
                upload_bf16(&dev, &w),
                upload_bf16(&dev, &bias),
                dev.upload(&dl).unwrap(),
            );
            let logits = dev.alloc::<f32>(b).unwrap();
            gpu::head_logits_fwd(&dev, &logits, &pd, &wd, &bd).unwrap();
            let want = cpu::head_logits(&pooled, &w, bias[0]);
            let shape = format!("[{b}, {h}]");
            check(
                "head_logits_fwd",
                &dev,
                &shape,
                &dev.download(&logits).unwrap(),
                &want,
                1e-5,
            );
            let (gw0, gb0) = (randn_bf16(&mut rng, h, 1.0), vec![0.25f32]);
            let (gw, gb) = (dev.upload(&gw0).unwrap(), dev.upload(&gb0).unwrap());
            let dpooled = dev.alloc::<f32>(b * h).unwrap();
            gpu::head_logits_bwd(&dev, &dpooled, Some((&gw, &gb)), &dld, &pd, &wd).unwrap();
            let (dp, dw, db) = cpu::head_logits_bwd(&dl, &pooled, &w);
            let dw_acc: Vec<f32> = gw0.iter().zip(&dw).map(|(a, d)| a + d).collect();
            check(
                "head_logits_bwd dpooled",
                &dev,
                &shape,
                &dev.download(&dpooled).unwrap(),
                &dp,
                1e-6,
            );
            check(
                "head_logits_bwd dw",
                &dev,
                &shape,
                &dev.download(&gw).unwrap(),
                &dw_acc,
                1e-5,
            );
            check(
                "head_logits_bwd db",
                &dev,
                &shape,
                &dev.download(&gb).unwrap(),
                &[gb0[0] + db],
                1e-5,
            );
            // without parameter gradients only dpooled is written
            gpu::head_logits_bwd(&dev, &dpooled, None, &dld, &pd, &wd).unwrap();
            assert_eq!(dev.download(&gb).unwrap(), vec![gb0[0] + db]);
        }
        let (p, w, bias, out) = (
            dev.zeros::<f32>(10).unwrap(),
            upload_bf16(&dev, &[0.0; 4]),
            upload_bf16(&dev, &[0.0]),
            dev.alloc::<f32>(3).unwrap(),
        );
        assert!(
            gpu::head_logits_fwd(&dev, &out, &p, &w, &bias).is_err(),
            "10 ≠ 3·4 pooled"
        );
    }
}
