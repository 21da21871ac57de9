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
    (1, 333, 24),
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

            let (dxc, dshc, dscc) =
                cpu::adaln_modulate_bwd(&xt, &ct, &stats, &tensor(dy.clone(), &[b, l, d]));
            let (dx, dsh, dsc) =
                gpu::adaln_modulate_bwd(&dev, &xd, &scd, &mean, &rstd, &dyd, (b, l, d)).unwrap();
            check(
                "adaln_modulate_bwd.dx",
                &dev,
                &shape,
                &download_f32(&dev, &dx),
                dxc.f32s(),
                1e-2,
            );
            check(
                "adaln_modulate_bwd.dshift",
                &dev,
                &shape,
                &dev.download(&dsh).unwrap(),
                dshc.f32s(),
                1e-4,
            );
            check(
                "adaln_modulate_bwd.dscale",
                &dev,
                &shape,
                &dev.download(&dsc).unwrap(),
                dscc.f32s(),
                1e-4,
            );
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
            check_bias_pass(&dev, &shape, (&gd, &yd, &dzd), (b, l, d), (&dg, &dyv));
        }
    }
}

/// `gated_residual_bwd_bias`: the same dgate and dy as `gated_residual_bwd` (dy bit for bit on
/// the emulator), and `Σ_rows dy` (as stored) added into the bias gradient.
fn check_bias_pass(
    dev: &KernelDevice,
    shape: &str,
    (gate, y, dz): (&DevBuf<bf16>, &DevBuf<bf16>, &DevBuf<bf16>),
    (b, l, d): (usize, usize, usize),
    (dg, dy): (&DevBuf<f32>, &DevBuf<bf16>),
) {
    let before: Vec<f32> = (0..d).map(|j| j as f32 * 0.25).collect();
    let bias = dev.upload(&before).unwrap();
    let (dg2, dy2) = gpu::gated_residual_bwd_bias(dev, (gate, d), y, dz, (b, l, d), &bias).unwrap();
    let dyh = download_f32(dev, dy);
    let want: Vec<f32> = (0..d)
        .map(|j| before[j] + (0..b * l).map(|r| dyh[r * d + j]).sum::<f32>())
        .collect();
    check(
        "gated_residual_bwd_bias.bias",
        dev,
        shape,
        &dev.download(&bias).unwrap(),
        &want,
        1e-4,
    );
    if dev.is_emulator() {
        assert_eq!(dev.download(&dy2).unwrap(), dev.download(dy).unwrap());
    }
    // the one pass sums dgate over row lanes, the two-kernel path row by row: f32 rounding apart
    let (a, w) = (dev.download(&dg2).unwrap(), dev.download(dg).unwrap());
    check("gated_residual_bwd_bias.dgate", dev, shape, &a, &w, 1e-5);
    let short = dev.alloc::<f32>(d + 1).unwrap();
    assert!(gpu::gated_residual_bwd_bias(dev, (gate, d), y, dz, (b, l, d), &short).is_err());
}

/// The gated residual on views one element into their buffers (not 16-byte aligned, with
/// D % 8 == 0): the scalar path still covers every element of a grid sized for 8 per thread.
#[test]
fn gated_residual_on_misaligned_views_matches_cpu() {
    let (b, l, d) = (2, 5, 64);
    let mut rng = Rng::new(12);
    let x = randn_bf16(&mut rng, b * l * d, 1.0);
    let gate = randn_bf16(&mut rng, b * d, 1.0);
    let y = randn_bf16(&mut rng, b * l * d, 1.0);
    let dz = randn_bf16(&mut rng, b * l * d, 1.0);
    let (xt, gt, yt) = (
        tensor(x.clone(), &[b, l, d]),
        tensor(gate.clone(), &[b, d]),
        tensor(y.clone(), &[b, l, d]),
    );
    let oc = cpu::gated_residual_fwd(&xt, &gt, &yt);
    let (_, dyc) = cpu::gated_residual_bwd(&gt, &yt, &tensor(dz.clone(), &[b, l, d]));
    for dev in devices() {
        let shifted = |v: &[f32]| {
            let mut w = vec![0.0f32];
            w.extend_from_slice(v);
            upload_bf16(&dev, &w)
        };
        let (xb, gb, yb, dzb) = (shifted(&x), shifted(&gate), shifted(&y), shifted(&dz));
        let (xv, gv, yv, dzv) = (
            xb.view(1, xb.len() - 1).unwrap(),
            gb.view(1, gb.len() - 1).unwrap(),
            yb.view(1, yb.len() - 1).unwrap(),
            dzb.view(1, dzb.len() - 1).unwrap(),
        );
        let out = gpu::gated_residual_fwd(&dev, &xv, &gv, &yv, (b, l, d)).unwrap();
        let shape = "2x5x64 views at +1";
        check(
            "gated_residual_fwd[view]",
            &dev,
            shape,
            &download_f32(&dev, &out),
            oc.f32s(),
            1e-2,
        );
        let (dgv, dyv) = gpu::gated_residual_bwd(&dev, &gv, &yv, &dzv, (b, l, d)).unwrap();
        check(
            "gated_residual_bwd.dy[view]",
            &dev,
            shape,
            &download_f32(&dev, &dyv),
            dyc.f32s(),
            1e-2,
        );
        // the bias pass on misaligned views takes the two-kernel path
        check_bias_pass(&dev, shape, (&gv, &yv, &dzv), (b, l, d), (&dgv, &dyv));
    }
}

/// The modulation rows at a stride (chunks as windows of a `[B, n·D]` modulation output, as the
/// model passes them) give what the same rows packed `[B, D]` give, bit for bit on the emulator:
/// adaLN forward and backward, the gated residual forward and backward (with the bias pass), on
/// the vector path (D % 8 == 0) and the scalar one.
#[test]
fn strided_modulation_rows_match_packed_ones() {
    for dev in devices() {
        for &(b, l, d) in &[(2usize, 5usize, 64usize), (2, 5, 37), (3, 2, 1536)] {
            let mut rng = Rng::new(31 + d as u64);
            let n = 3;
            let ld = n * d;
            let m = randn_bf16(&mut rng, b * ld, 0.5);
            let md = upload_bf16(&dev, &m);
            // chunk j packed, and as a window of m
            let packed = |j: usize| {
                let v: Vec<f32> = (0..b)
                    .flat_map(|s| m[s * ld + j * d..s * ld + j * d + d].to_vec())
                    .collect();
                upload_bf16(&dev, &v)
            };
            let win = |j: usize| md.view(j * d, (b - 1) * ld + d).unwrap();
            let (p0, p1, p2) = (packed(0), packed(1), packed(2));
            let (w0, w1, w2) = (win(0), win(1), win(2));
            let x = upload_bf16(&dev, &randn_bf16(&mut rng, b * l * d, 1.0));
            let y = upload_bf16(&dev, &randn_bf16(&mut rng, b * l * d, 1.0));
            let dz = upload_bf16(&dev, &randn_bf16(&mut rng, b * l * d, 1.0));
            let dims = (b, l, d);
            let bits = |v: &DevBuf<bf16>| dev.download(v).unwrap();
            let f = |v: &DevBuf<f32>| dev.download(v).unwrap();
            let shape = format!("{b}x{l}x{d} at stride {ld}");
            let same_bf = |what: &str, a: &DevBuf<bf16>, w: &DevBuf<bf16>| {
                if dev.is_emulator() {
                    assert_eq!(bits(a), bits(w), "{what} {shape}");
                } else {
                    check(
                        what,
                        &dev,
                        &shape,
                        &download_f32(&dev, a),
                        &download_f32(&dev, w),
                        1e-2,
                    );
                }
            };
            let same_f = |what: &str, a: &DevBuf<f32>, w: &DevBuf<f32>| {
                if dev.is_emulator() {
                    assert_eq!(f(a), f(w), "{what} {shape}");
                } else {
                    check(what, &dev, &shape, &f(a), &f(w), 1e-4);
                }
            };

            let (ya, ma, ra) = gpu::adaln_modulate_fwd(&dev, &x, &p0, &p1, dims, 1e-6).unwrap();
            let (yb, mb, rb) =
                gpu::adaln_modulate_fwd_ld(&dev, &x, (&w0, &w1, ld), dims, 1e-6).unwrap();
            same_bf("adaln fwd", &ya, &yb);
            same_f("adaln mean", &ma, &mb);
            let (dxa, dsa, dca) =
                gpu::adaln_modulate_bwd(&dev, &x, &p1, &ma, &ra, &dz, dims).unwrap();
            let (dxb, dsb, dcb) =
                gpu::adaln_modulate_bwd_ld(&dev, &x, (&w1, ld), &mb, &rb, &dz, dims).unwrap();
            same_bf("adaln bwd dx", &dxa, &dxb);
            same_f("adaln bwd dshift", &dsa, &dsb);
            same_f("adaln bwd dscale", &dca, &dcb);

            let oa = gpu::gated_residual_fwd(&dev, &x, &p2, &y, dims).unwrap();
            let ob = gpu::gated_residual_fwd_ld(&dev, &x, (&w2, ld), &y, dims).unwrap();
            same_bf("gated fwd", &oa, &ob);
            let (ga, da) = gpu::gated_residual_bwd(&dev, &p2, &y, &dz, dims).unwrap();
            let (gb, db) = gpu::gated_residual_bwd_ld(&dev, (&w2, ld), &y, &dz, dims).unwrap();
            same_f("gated bwd dgate", &ga, &gb);
            same_bf("gated bwd dy", &da, &db);
            let (bias_a, bias_b) = (dev.zeros::<f32>(d).unwrap(), dev.zeros::<f32>(d).unwrap());
            let (ga2, da2) =
                gpu::gated_residual_bwd_bias(&dev, (&p2, d), &y, &dz, dims, &bias_a).unwrap();
            let (gb2, db2) =
                gpu::gated_residual_bwd_bias(&dev, (&w2, ld), &y, &dz, dims, &bias_b).unwrap();
            same_f("gated bwd+bias dgate", &ga2, &gb2);
            same_bf("gated bwd+bias dy", &da2, &db2);
            same_f("gated bwd+bias bias", &bias_a, &bias_b);
            // a stride that does not fit the buffer is refused
            assert!(gpu::gated_residual_fwd_ld(&dev, &x, (&w2, ld + 8), &y, dims).is_err());
            println!(
                "strided modulation rows on {}: {shape} as packed",
                dev.name()
            );
        }
    }
}

/// `colsum_acc` (a bias gradient: column sums of bf16 rows added into f32): the 16-byte
/// `colsum_partial_vec` where D % 8 == 0, the scalar kernel otherwise, against f64 sums.
#[test]
fn column_sums_add_into_f32() {
    for dev in devices() {
        for (rows, d) in [(5, 37), (300, 64), (9, 1536), (1, 8)] {
            let mut rng = Rng::new(41 + (rows * d) as u64);
            let a = randn_bf16(&mut rng, rows * d, 1.0);
            let old: Vec<f32> = (0..d).map(|j| 0.1 * j as f32 - 2.0).collect();
            let (ad, gd) = (upload_bf16(&dev, &a), dev.upload(&old).unwrap());
            gpu::colsum_acc(&dev, &ad, (rows, d), &gd).unwrap();
            let mut want: Vec<f64> = old.iter().map(|&v| v as f64).collect();
            a.iter()
                .enumerate()
                .for_each(|(i, &v)| want[i % d] += v as f64);
            let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
            let shape = format!("{rows}x{d}");
            check(
                "colsum_acc",
                &dev,
                &shape,
                &dev.download(&gd).unwrap(),
                &want,
                1e-5,
            );
            assert!(gpu::colsum_acc(&dev, &ad, (rows + 1, d), &gd).is_err());
        }
    }
}

/// The backward with dx added into the residual stream's f32 gradient (`adaln_modulate_bwd_acc_ld`,
/// one pass where the vector kernel runs) equals dx from `adaln_modulate_bwd_ld` followed by
/// `residual_grad_add`, bit for bit: into a new buffer with the bf16 rounding, in place without it,
/// at widths that take the vector kernel and the row kernel (d = 37).
#[test]
fn adaln_backward_adds_into_the_residual_gradient() {
    use advdmd::kernels::shape::dev::residual_grad_add;
    for dev in devices() {
        for &(b, l, d) in &[(2, 33, 1536), (1, 5, 37), (2, 7, 24)] {
            let mut rng = Rng::new(23 + d as u64);
            let n = b * l * d;
            let up = |v: &[f32]| upload_bf16(&dev, v);
            let (xd, shd, scd, dyd) = (
                up(&randn_bf16(&mut rng, n, 1.5)),
                up(&randn_bf16(&mut rng, b * d, 0.5)),
                up(&randn_bf16(&mut rng, b * d, 0.5)),
                up(&randn_bf16(&mut rng, n, 1.0)),
            );
            let acc: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 0.37 - 2.0).collect();
            let (_, mean, rstd) =
                gpu::adaln_modulate_fwd(&dev, &xd, &shd, &scd, (b, l, d), 1e-6).unwrap();
            let sc = (&scd, d);
            // the two-kernel reference
            let (dx, dsh, dsc) =
                gpu::adaln_modulate_bwd_ld(&dev, &xd, sc, &mean, &rstd, &dyd, (b, l, d)).unwrap();
            let a = dev.upload(&acc).unwrap();
            let (want, want16) = (dev.alloc::<f32>(n).unwrap(), dev.alloc::<bf16>(n).unwrap());
            residual_grad_add(&dev, &want, Some(&want16), &a, &dx).unwrap();
            let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let (want, want16) = (
                bits(dev.download(&want).unwrap()),
                bits(download_f32(&dev, &want16)),
            );
            let shape = format!("{b}x{l}x{d}");
            let acc = |out, out16, a| {
                let dims = (b, l, d);
                gpu::adaln_modulate_bwd_acc_ld(
                    &dev,
                    &xd,
                    sc,
                    &mean,
                    &rstd,
                    &dyd,
                    dims,
                    (out, out16, a),
                )
            };
            // into a new buffer, with the bf16 rounding
            let (out, out16) = (dev.alloc::<f32>(n).unwrap(), dev.alloc::<bf16>(n).unwrap());
            let (gsh, gsc) = acc(&out, Some(&out16), &a).unwrap();
            assert_eq!(bits(dev.download(&out).unwrap()), want, "{shape}: out");
            assert_eq!(bits(download_f32(&dev, &out16)), want16, "{shape}: out16");
            assert_eq!(dev.download(&gsh).unwrap(), dev.download(&dsh).unwrap());
            assert_eq!(dev.download(&gsc).unwrap(), dev.download(&dsc).unwrap());
            // in place, no rounding
            acc(&a, None, &a).unwrap();
            assert_eq!(bits(dev.download(&a).unwrap()), want, "{shape}: in place");
            // a wrong length is refused
            let short = dev.alloc::<f32>(n - 1).unwrap();
            let r = acc(&short, None, &a);
            assert!(r.is_err(), "{shape}: a short output was accepted");
        }
    }
}

/// A gated residual and the adaLN of its output in one pass (`gated_residual_adaln_fwd_ld`) — or of
/// its input (`gated_residual_adaln_of_x_fwd_ld`) — equal the two kernels each replaces, bit for
/// bit: the residual `mid`, y, mean and rstd, with the
/// modulation chunks at a stride (the model's windows of modulation rows; the gate's from another
/// product, at another stride), at widths that take the vector kernels and one that does not
/// (d = 37).
#[test]
fn gated_residual_then_adaln_in_one_pass_equals_the_two_kernels() {
    for dev in devices() {
        for &(b, l, d) in &[(2, 33, 1536), (1, 5, 4104), (2, 7, 24), (1, 5, 37)] {
            let mut rng = Rng::new(31 + d as u64);
            let n = b * l * d;
            let ld = 6 * d;
            let up = |v: &[f32]| upload_bf16(&dev, v);
            let x = up(&randn_bf16(&mut rng, n, 1.0));
            let yres = up(&randn_bf16(&mut rng, n, 1.0));
            let mods = up(&randn_bf16(&mut rng, b * ld, 0.5));
            // chunks 3 (shift), 4 (scale) of each sample's modulation row; the gate, chunk 5 of
            // another block's rows of 9 chunks (the MLP's residual fused with the next adaLN)
            let chunk = |j: usize| mods.view(j * d, b * ld - j * d).unwrap();
            let (shift, scale) = (chunk(3), chunk(4));
            let gate_ld = 9 * d;
            let gate_mods = up(&randn_bf16(&mut rng, b * gate_ld, 0.5));
            let gate = gate_mods.view(5 * d, b * gate_ld - 5 * d).unwrap();
            let dims = (b, l, d);
            let mid = gpu::gated_residual_fwd_ld(&dev, &x, (&gate, gate_ld), &yres, dims).unwrap();
            let shape = format!("{b}x{l}x{d}");
            let bits16 = |v: &DevBuf<bf16>| bits16(&dev, v);
            let bits32 = |v: &DevBuf<f32>| bits32(&dev, v);
            // the adaLN of the sum (a block's residual with the next adaLN), then of the input x
            // (an MMDiT-X block's first residual beside attn2's adaLN)
            let mut ys = Vec::new();
            for (fused, normalised, of) in [
                (gpu::gated_residual_adaln_fwd_ld as Fused, &mid, "the sum"),
                (gpu::gated_residual_adaln_of_x_fwd_ld, &x, "x"),
            ] {
                let (y, mean, rstd) =
                    gpu::adaln_modulate_fwd_ld(&dev, normalised, (&shift, &scale, ld), dims, 1e-6)
                        .unwrap();
                let mods = (&*shift, &*scale, ld);
                let (mid2, y2, mean2, rstd2) =
                    fused(&dev, &x, &yres, (&gate, gate_ld), mods, dims, 1e-6).unwrap();
                assert_eq!(bits16(&mid2), bits16(&mid), "{shape}: mid, adaLN of {of}");
                assert_eq!(bits16(&y2), bits16(&y), "{shape}: y, adaLN of {of}");
                assert_eq!(bits32(&mean2), bits32(&mean), "{shape}: mean of {of}");
                assert_eq!(bits32(&rstd2), bits32(&rstd), "{shape}: rstd of {of}");
                ys.push(bits16(&y2));
            }
            assert_ne!(ys[0], ys[1], "{shape}: the adaLN of x and of the sum agree");
        }
    }
}

/// Two adaLNs of the same x with their dx added into the residual gradient in one pass
/// (`adaln_modulate_bwd_acc2_ld`, an MMDiT-X block's first and attn2's) equal two
/// `adaln_modulate_bwd_acc_ld` calls in order — the f32 gradient, its bf16 rounding and both
/// parameter gradients bit for bit — with the scale chunks at strides (two chunks of one
/// modulation row), at widths that take the vector kernel and ones that do not (37; 9000 > 8192
/// columns).
#[test]
fn two_adalns_of_one_x_add_their_dx_in_one_pass() {
    for dev in devices() {
        for &(b, l, d) in &[
            (2, 33, 1536),
            (1, 5, 4104),
            (2, 7, 24),
            (1, 5, 37),
            (1, 2, 9000),
        ] {
            let mut rng = Rng::new(47 + d as u64);
            let (n, ld) = (b * l * d, 9 * d);
            let up = |v: &[f32]| upload_bf16(&dev, v);
            let x = up(&randn_bf16(&mut rng, n, 1.3));
            let mods = up(&randn_bf16(&mut rng, b * ld, 0.5));
            let dys = [0, 1].map(|_| up(&randn_bf16(&mut rng, n, 1.0)));
            let chunk = |j: usize| mods.view(j * d, b * ld - j * d).unwrap();
            let (shifts, scales) = ([chunk(6), chunk(0)], [chunk(7), chunk(1)]);
            let dims = (b, l, d);
            let stats = [0, 1].map(|j| {
                let (_, mean, rstd) =
                    gpu::adaln_modulate_fwd_ld(&dev, &x, (&shifts[j], &scales[j], ld), dims, 1e-6)
                        .unwrap();
                (mean, rstd)
            });
            let start: Vec<f32> = (0..n).map(|i| (i % 17) as f32 * 0.25 - 2.0).collect();
            // two passes: the first adds into a, the second into that and rounds it
            let (out1, out1_16) = (dev.upload(&start).unwrap(), dev.alloc::<bf16>(n).unwrap());
            let mut want = Vec::new();
            for j in 0..2 {
                let out16 = (j == 1).then_some(&out1_16);
                let (mean, rstd) = &stats[j];
                want.push(
                    gpu::adaln_modulate_bwd_acc_ld(
                        &dev,
                        &x,
                        (&scales[j], ld),
                        mean,
                        rstd,
                        &dys[j],
                        dims,
                        (&out1, out16, &out1),
                    )
                    .unwrap(),
                );
            }
            let (out2, out2_16) = (dev.upload(&start).unwrap(), dev.alloc::<bf16>(n).unwrap());
            let pair = [0, 1].map(|j| gpu::LnBwdIn {
                scale: (&scales[j], ld),
                mean: &stats[j].0,
                rstd: &stats[j].1,
                dy: &dys[j],
            });
            let got = gpu::adaln_modulate_bwd_acc2_ld(
                &dev,
                &x,
                pair,
                dims,
                (&out2, Some(&out2_16), &out2),
            )
            .unwrap();
            let shape = format!("{b}x{l}x{d}");
            let f32s = |v: &DevBuf<f32>| dev.download(v).unwrap();
            let bits16 = |v: &DevBuf<bf16>| bits16(&dev, v);
            assert_eq!(f32s(&out2), f32s(&out1), "{shape}: the f32 gradient");
            assert_ne!(f32s(&out2), start, "{shape}: nothing added");
            assert_eq!(
                bits16(&out2_16),
                bits16(&out1_16),
                "{shape}: its bf16 rounding"
            );
            for j in 0..2 {
                assert_eq!(f32s(&got[j].0), f32s(&want[j].0), "{shape}: dshift {j}");
                assert_eq!(f32s(&got[j].1), f32s(&want[j].1), "{shape}: dscale {j}");
            }
            println!(
                "adaLN pair backward on {}: {shape}, the bits of two passes",
                dev.name()
            );
        }
    }
}

/// The launchers of a gated residual with an adaLN in one pass.
type Fused = fn(
    &KernelDevice,
    &DevBuf<bf16>,
    &DevBuf<bf16>,
    (&DevBuf<bf16>, usize),
    (&DevBuf<bf16>, &DevBuf<bf16>, usize),
    (usize, usize, usize),
    f32,
) -> advdmd::device::kernel::KernelResult<(
    DevBuf<bf16>,
    DevBuf<bf16>,
    DevBuf<f32>,
    DevBuf<f32>,
)>;

fn bits16(dev: &KernelDevice, v: &DevBuf<bf16>) -> Vec<u16> {
    dev.download(v)
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn bits32(dev: &KernelDevice, v: &DevBuf<f32>) -> Vec<u32> {
    dev.download(v)
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}
