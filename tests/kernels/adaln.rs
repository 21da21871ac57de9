//! cuda/adaln.cu ↔ src/kernels/adaln.rs.

use super::*;
use advdmd::kernels::adaln::{self as cpu, dev as gpu};

const SHAPES: &[(usize, usize, usize)] = &[
    (2, 5, 4104),
    (1, 1, 8),
    (2, 7, 24),
    (2, 33, 1536),
    (1, 5, 37),
    (3, 4, 3072),
    (1, 3, 3080),
];

#[test]
fn adaln_modulate_fwd_and_bwd_match_cpu() {
    for dev in devices() {
        for &(b, l, d) in SHAPES {
            let mut rng = Rng::new(17 + d as u64);
            let x = randn_bf16(&mut rng, b * l * d, 1.5);
            let shift = randn_bf16(&mut rng, b * d, 0.5);
            let scale = randn_bf16(&mut rng, b * d, 0.5);
            let dy = randn_bf16(&mut rng, b * l * d, 1.0);
            let shape = format!("{b}x{l}x{d}");
            let (xd, shd, scd, dyd) = (
                upload_bf16(&dev, &x),
                upload_bf16(&dev, &shift),
                upload_bf16(&dev, &scale),
                upload_bf16(&dev, &dy),
            );
            let (y, mean, rstd) =
                gpu::adaln_modulate_fwd(&dev, &xd, &shd, &scd, (b, l, d), 1e-6).unwrap();
            let xt = tensor(x.clone(), &[b, l, d]);
            let (st, ct) = (
                tensor(shift.clone(), &[b, d]),
                tensor(scale.clone(), &[b, d]),
            );
            let (yc, stats) = cpu::adaln_modulate_fwd(&xt, &st, &ct, 1e-6);
            check(
                "adaln_modulate_fwd",
                &dev,
                &shape,
                &download_f32(&dev, &y),
                yc.f32s(),
                1e-2,
            );
            check(
                "adaln_modulate_fwd.mean",
                &dev,
                &shape,
                &dev.download(&mean).unwrap(),
                &stats.mean,
                1e-4,
            );
            check(
                "adaln_modulate_fwd.rstd",
                &dev,
                &shape,
                &dev.download(&rstd).unwrap(),
                &stats.rstd,
                1e-4,
            );

            // the one-reduction forward (shifted sums) against the same CPU twin
            let (y1, mean1, rstd1) = (
                dev.alloc::<half::bf16>(b * l * d).unwrap(),
                dev.alloc::<f32>(b * l).unwrap(),
                dev.alloc::<f32>(b * l).unwrap(),
            );
            gpu::adaln_modulate_fwd_into_with(
                &dev,
                &y1,
                &mean1,
                &rstd1,
                &xd,
                &shd,
                &scd,
                (b, l, d),
                1e-6,
                gpu::AdalnFwd::Shifted,
            )
            .unwrap();
            for (what, got, want, tol) in [
                ("", download_f32(&dev, &y1), yc.f32s().to_vec(), 1e-2),
                (
                    ".mean",
                    dev.download(&mean1).unwrap(),
                    stats.mean.clone(),
                    1e-4,
                ),
                (
                    ".rstd",
                    dev.download(&rstd1).unwrap(),
                    stats.rstd.clone(),
                    1e-4,
                ),
            ] {
                check(
                    &format!("adaln_modulate_fwd[shifted]{what}"),
                    &dev,
                    &shape,
                    &got,
                    &want,
                    tol,
                );
            }
            let (dxc, dshc, dscc) =
                cpu::adaln_modulate_bwd(&xt, &ct, &stats, &tensor(dy.clone(), &[b, l, d]));
            // both paths; few blocks as well, so that blocks take several 4-row groups
            for (tag, path) in [
                ("", gpu::AdalnBwd::Split),
                ("[fused]", gpu::AdalnBwd::Fused { blocks: 256 }),
                ("[fused 3]", gpu::AdalnBwd::Fused { blocks: 3 }),
            ] {
                let (dx, dsh, dsc) = gpu::adaln_modulate_bwd_with(
                    &dev,
                    &xd,
                    &scd,
                    &mean,
                    &rstd,
                    &dyd,
                    (b, l, d),
                    path,
                )
                .unwrap();
                check(
                    &format!("adaln_modulate_bwd{tag}.dx"),
                    &dev,
                    &shape,
                    &download_f32(&dev, &dx),
                    dxc.f32s(),
                    1e-2,
                );
                check(
                    &format!("adaln_modulate_bwd{tag}.dshift"),
                    &dev,
                    &shape,
                    &dev.download(&dsh).unwrap(),
                    dshc.f32s(),
                    1e-4,
                );
                check(
                    &format!("adaln_modulate_bwd{tag}.dscale"),
                    &dev,
                    &shape,
                    &dev.download(&dsc).unwrap(),
                    dscc.f32s(),
                    1e-4,
                );
            }
        }
    }
}

#[test]
fn gated_residual_fwd_and_bwd_match_cpu() {
    for dev in devices() {
        for &(b, l, d) in SHAPES {
            let mut rng = Rng::new(5 + d as u64);
            let x = randn_bf16(&mut rng, b * l * d, 1.0);
            let gate = randn_bf16(&mut rng, b * d, 1.0);
            let y = randn_bf16(&mut rng, b * l * d, 1.0);
            let dz = randn_bf16(&mut rng, b * l * d, 1.0);
            let shape = format!("{b}x{l}x{d}");
            let (xd, gd, yd, dzd) = (
                upload_bf16(&dev, &x),
                upload_bf16(&dev, &gate),
                upload_bf16(&dev, &y),
                upload_bf16(&dev, &dz),
            );
            let out = gpu::gated_residual_fwd(&dev, &xd, &gd, &yd, (b, l, d)).unwrap();
            let (xt, gt, yt) = (
                tensor(x, &[b, l, d]),
                tensor(gate, &[b, d]),
                tensor(y, &[b, l, d]),
            );
            let oc = cpu::gated_residual_fwd(&xt, &gt, &yt);
            check(
                "gated_residual_fwd",
                &dev,
                &shape,
                &download_f32(&dev, &out),
                oc.f32s(),
                1e-2,
            );
            let (dg, dyv) = gpu::gated_residual_bwd(&dev, &gd, &yd, &dzd, (b, l, d)).unwrap();
            let (dgc, dyc) = cpu::gated_residual_bwd(&gt, &yt, &tensor(dz, &[b, l, d]));
            check(
                "gated_residual_bwd.dgate",
                &dev,
                &shape,
                &dev.download(&dg).unwrap(),
                dgc.f32s(),
                1e-4,
            );
            check(
                "gated_residual_bwd.dy",
                &dev,
                &shape,
                &download_f32(&dev, &dyv),
                dyc.f32s(),
                1e-2,
            );
        }
    }
}

/// The shifted one-reduction forward when the shift is a poor guess: rows offset by 50 whose
/// first element sits 8 standard deviations from the mean still match the two-pass CPU twin.
#[test]
fn adaln_shifted_forward_survives_an_outlying_first_element() {
    let (b, l, d) = (1, 6, 1536);
    let mut rng = Rng::new(5);
    let mut x = randn_bf16(&mut rng, b * l * d, 1.0);
    for r in 0..l {
        for v in &mut x[r * d..(r + 1) * d] {
            *v = half::bf16::from_f32(*v + 50.0).to_f32();
        }
        x[r * d] = 58.0;
    }
    let shift = randn_bf16(&mut rng, b * d, 0.5);
    let scale = randn_bf16(&mut rng, b * d, 0.5);
    let xt = tensor(x.clone(), &[b, l, d]);
    let (yc, stats) = cpu::adaln_modulate_fwd(
        &xt,
        &tensor(shift.clone(), &[b, d]),
        &tensor(scale.clone(), &[b, d]),
        1e-6,
    );
    for dev in devices() {
        let (xd, shd, scd) = (
            upload_bf16(&dev, &x),
            upload_bf16(&dev, &shift),
            upload_bf16(&dev, &scale),
        );
        let (y, mean, rstd) = (
            dev.alloc::<half::bf16>(b * l * d).unwrap(),
            dev.alloc::<f32>(b * l).unwrap(),
            dev.alloc::<f32>(b * l).unwrap(),
        );
        gpu::adaln_modulate_fwd_into_with(
            &dev,
            &y,
            &mean,
            &rstd,
            &xd,
            &shd,
            &scd,
            (b, l, d),
            1e-6,
            gpu::AdalnFwd::Shifted,
        )
        .unwrap();
        let shape = "1x6x1536 offset 50";
        let y = download_f32(&dev, &y);
        check(
            "adaln_modulate_fwd[shifted]",
            &dev,
            shape,
            &y,
            yc.f32s(),
            1e-2,
        );
        let rstd = dev.download(&rstd).unwrap();
        check(
            "adaln_modulate_fwd[shifted].rstd",
            &dev,
            shape,
            &rstd,
            &stats.rstd,
            1e-4,
        );
    }
}
