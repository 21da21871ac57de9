//! cuda/qknorm.cu ↔ src/kernels/qknorm.rs.

use super::*;
use advdmd::kernels::qknorm::{self as cpu, dev as gpu};

/// (rows, head dim): the register path with 4, 8, 16 and 32 lanes per row, the forward's two
/// vectors per lane (320), widths that are not a multiple of 8 (37, 1000 → scalar path), and row
/// counts that are not multiples of the rows per block.
const SHAPES: &[(usize, usize)] = &[
    (1, 64),
    (7, 64),
    (300, 64),
    (33, 128),
    (2, 24),
    (19, 256),
    (3, 320),
    (5, 37),
    (4, 1000),
];

#[test]
fn rms_norm_fwd_and_bwd_match_cpu() {
    for dev in devices() {
        for &(rows, d) in SHAPES {
            let mut rng = Rng::new(31 + d as u64 + rows as u64);
            let x = randn_bf16(&mut rng, rows * d, 1.5);
            let w: Vec<f32> = randn_bf16(&mut rng, d, 0.3)
                .iter()
                .map(|v| bf16::from_f32(1.0 + v).to_f32())
                .collect();
            let dy = randn_bf16(&mut rng, rows * d, 1.0);
            let shape = format!("{rows}x{d}");
            let (xd, wd, dyd) = (
                upload_bf16(&dev, &x),
                upload_bf16(&dev, &w),
                upload_bf16(&dev, &dy),
            );

            let (y, rstd) = gpu::rms_norm_fwd(&dev, &xd, &wd, (rows, d), 1e-6).unwrap();
            let (xt, wt) = (tensor(x.clone(), &[rows, d]), tensor(w.clone(), &[d]));
            let (yc, rstd_c) = cpu::rms_norm_fwd(&xt, &wt, 1e-6);
            check(
                "rms_norm_fwd",
                &dev,
                &shape,
                &download_f32(&dev, &y),
                yc.f32s(),
                1e-2,
            );
            check(
                "rms_norm_fwd.rstd",
                &dev,
                &shape,
                &dev.download(&rstd).unwrap(),
                &rstd_c,
                1e-5,
            );

            let (dxc, dwc) = cpu::rms_norm_bwd(&xt, &wt, &rstd_c, &tensor(dy.clone(), &[rows, d]));
            let (dx, dw) = gpu::rms_norm_bwd(&dev, &xd, &wd, &rstd, &dyd, (rows, d)).unwrap();
            check(
                "rms_norm_bwd.dx",
                &dev,
                &shape,
                &download_f32(&dev, &dx),
                dxc.f32s(),
                1e-2,
            );
            check(
                "rms_norm_bwd.dweight",
                &dev,
                &shape,
                &dev.download(&dw).unwrap(),
                dwc.f32s(),
                1e-4,
            );

            // Three partial rows: every block walks the rows several times (the large-batch case).
            let dx3 = dev.alloc::<bf16>(rows * d).unwrap();
            let dw3 = dev.alloc::<f32>(d).unwrap();
            gpu::rms_norm_bwd_into(&dev, &dx3, &dw3, &xd, &wd, &rstd, &dyd, (rows, d), 3).unwrap();
            check(
                "rms_norm_bwd.dx[3 parts]",
                &dev,
                &shape,
                &download_f32(&dev, &dx3),
                dxc.f32s(),
                1e-2,
            );
            check(
                "rms_norm_bwd.dweight[3 parts]",
                &dev,
                &shape,
                &dev.download(&dw3).unwrap(),
                dwc.f32s(),
                1e-4,
            );
        }
    }
}

/// q and k normalised in place inside a fused qkv tensor `[tokens, 3, H, D]` (`RowLayout`): the
/// forward reads them there, the backward writes dx there and leaves the other columns alone.
/// D = 64 and 128 (register path) and 36 (the scalar path).
#[test]
fn rms_norm_reads_and_writes_rows_inside_a_fused_qkv() {
    for dev in devices() {
        for &(tokens, heads, d) in &[(7, 3, 64), (5, 2, 128), (4, 3, 36)] {
            let (rows, width) = (tokens * heads, 3 * heads * d);
            let mut rng = Rng::new(77 + d as u64);
            let fused = randn_bf16(&mut rng, tokens * width, 1.5);
            let w: Vec<f32> = randn_bf16(&mut rng, d, 0.3)
                .iter()
                .map(|v| bf16::from_f32(1.0 + v).to_f32())
                .collect();
            let dy = randn_bf16(&mut rng, rows * d, 1.0);
            let (fd, wd, dyd) = (
                upload_bf16(&dev, &fused),
                upload_bf16(&dev, &w),
                upload_bf16(&dev, &dy),
            );
            for which in 0..2 {
                let shape = format!("{tokens}x3x{heads}x{d} part {which}");
                let part: Vec<f32> = (0..tokens)
                    .flat_map(|t| {
                        let o = t * width + which * heads * d;
                        fused[o..o + heads * d].to_vec()
                    })
                    .collect();
                let (xt, wt) = (tensor(part, &[rows, d]), tensor(w.clone(), &[d]));
                let (yc, rstd_c) = cpu::rms_norm_fwd(&xt, &wt, 1e-6);
                let (dxc, dwc) =
                    cpu::rms_norm_bwd(&xt, &wt, &rstd_c, &tensor(dy.clone(), &[rows, d]));
                let layout = gpu::RowLayout {
                    heads,
                    ld: width,
                    off: which * heads * d,
                };
                let (y, rstd) =
                    gpu::rms_norm_fwd_laid(&dev, &fd, layout, &wd, (rows, d), 1e-6).unwrap();
                check(
                    "rms_norm_fwd[laid]",
                    &dev,
                    &shape,
                    &download_f32(&dev, &y),
                    yc.f32s(),
                    1e-2,
                );
                let sentinel = vec![7.0f32; tokens * width];
                let dfused = upload_bf16(&dev, &sentinel);
                let dw =
                    gpu::rms_norm_bwd_laid(&dev, &dfused, &fd, layout, &wd, &rstd, &dyd, (rows, d))
                        .unwrap();
                let got = download_f32(&dev, &dfused);
                let mut dx = Vec::with_capacity(rows * d);
                for t in 0..tokens {
                    for c in 0..width {
                        let mine = (which * heads * d..(which + 1) * heads * d).contains(&c);
                        if mine {
                            dx.push(got[t * width + c]);
                        } else {
                            assert_eq!(
                                got[t * width + c],
                                7.0,
                                "{shape}: column {c} of token {t} written"
                            );
                        }
                    }
                }
                check("rms_norm_bwd[laid].dx", &dev, &shape, &dx, dxc.f32s(), 1e-2);
                check(
                    "rms_norm_bwd[laid].dweight",
                    &dev,
                    &shape,
                    &dev.download(&dw).unwrap(),
                    dwc.f32s(),
                    1e-4,
                );
            }
            // a layout that does not fit the buffer is refused
            let bad = gpu::RowLayout {
                heads,
                ld: width,
                off: 3 * heads * d,
            };
            assert!(gpu::rms_norm_fwd_laid(&dev, &fd, bad, &wd, (rows, d), 1e-6).is_err());
        }
    }
}

/// q's and k's norms in one launch (`rms_norm_fwd_laid_pair`, `rms_norm_bwd_laid_pair`): the same
/// bits as one launch each — y, rstd, both dx inside one fused gradient (the v columns left
/// alone), and the weight gradients written over stale values or added to held ones; a pair of
/// layouts with different strides is refused.
#[test]
fn rms_norm_pairs_give_the_bits_of_single_launches() {
    for dev in devices() {
        for &(tokens, heads, d) in &[(7, 3, 64), (5, 2, 128), (4, 3, 36)] {
            let (rows, width) = (tokens * heads, 3 * heads * d);
            let mut rng = Rng::new(91 + d as u64);
            let fused = upload_bf16(&dev, &randn_bf16(&mut rng, tokens * width, 1.5));
            let ws = [0, 1].map(|_| upload_bf16(&dev, &randn_bf16(&mut rng, d, 0.3)));
            let dys = [0, 1].map(|_| upload_bf16(&dev, &randn_bf16(&mut rng, rows * d, 1.0)));
            let layouts = [0, 1].map(|j| gpu::RowLayout {
                heads,
                ld: width,
                off: j * heads * d,
            });
            let dims = (rows, d);
            let single = [0, 1].map(|j| {
                gpu::rms_norm_fwd_laid(&dev, &fused, layouts[j], &ws[j], dims, 1e-6).unwrap()
            });
            let pair =
                gpu::rms_norm_fwd_laid_pair(&dev, &fused, layouts, [&ws[0], &ws[1]], dims, 1e-6)
                    .unwrap();
            for j in 0..2 {
                assert_eq!(
                    bits(&dev, &single[j].0),
                    bits(&dev, &pair[j].0),
                    "y {j}, d {d}"
                );
                let (a, b) = (dev.download(&single[j].1), dev.download(&pair[j].1));
                assert_eq!(a.unwrap(), b.unwrap(), "rstd {j}, d {d}");
            }
            let sentinel = vec![7.0f32; tokens * width];
            let (dx_single, dx_pair) = (upload_bf16(&dev, &sentinel), upload_bf16(&dev, &sentinel));
            let dw_single = [0, 1].map(|j| {
                let (rstd, dy) = (&single[j].1, &dys[j]);
                gpu::rms_norm_bwd_laid(&dev, &dx_single, &fused, layouts[j], &ws[j], rstd, dy, dims)
                    .unwrap()
            });
            // q's slot stale (overwritten), k's holding 1.5 (added to)
            let held = [dev.upload(&vec![-3.0f32; d]), dev.upload(&vec![1.5f32; d])];
            let held = held.map(|h| h.unwrap());
            gpu::rms_norm_bwd_laid_pair(
                &dev,
                &dx_pair,
                &fused,
                layouts,
                [&ws[0], &ws[1]],
                [&single[0].1, &single[1].1],
                [&dys[0], &dys[1]],
                dims,
                Some([(&held[0], false), (&held[1], true)]),
            )
            .unwrap();
            assert_eq!(bits(&dev, &dx_single), bits(&dev, &dx_pair), "dx, d {d}");
            let (q1, k1) = (
                dev.download(&dw_single[0]).unwrap(),
                dev.download(&dw_single[1]).unwrap(),
            );
            assert_eq!(dev.download(&held[0]).unwrap(), q1, "dweight q, d {d}");
            let k_added: Vec<f32> = k1.iter().map(|v| 1.5 + v).collect();
            assert_eq!(dev.download(&held[1]).unwrap(), k_added, "dweight k, d {d}");
            let mut skew = layouts;
            skew[1].ld += 8;
            let refused =
                gpu::rms_norm_fwd_laid_pair(&dev, &fused, skew, [&ws[0], &ws[1]], dims, 1e-6);
            assert!(refused.is_err());
            println!(
                "rms_norm pairs on {}: d {d}, the bits of single launches",
                dev.name()
            );
        }
    }
}

/// q's output gradient read from the attention's f32 dQ accumulator (`rms_norm_bwd2_dq32`): the
/// bits of the bf16 launch fed bf16(scale · acc) — dx of both, and both weight gradients — on the
/// register path (d 64, 128, several steps a block) and the scalar one (d 36).
#[test]
fn rms_norm_pair_reads_dq_from_the_attention_accumulator() {
    for dev in devices() {
        for &(tokens, heads, d) in &[(7, 3, 64), (300, 2, 64), (5, 2, 128), (4, 3, 36)] {
            let (rows, width) = (tokens * heads, 3 * heads * d);
            let mut rng = Rng::new(17 + d as u64);
            let fused = upload_bf16(&dev, &randn_bf16(&mut rng, tokens * width, 1.5));
            let ws = [0, 1].map(|_| upload_bf16(&dev, &randn_bf16(&mut rng, d, 0.3)));
            // accumulator values in f32 (not bf16-representable), the attention's 1/√d scale
            let acc: Vec<f32> = (0..rows * d).map(|_| rng.normal() * 3.0).collect();
            let scale = 1.0 / (d as f32).sqrt();
            let dq16: Vec<f32> = acc
                .iter()
                .map(|&v| bf16::from_f32(v * scale).to_f32())
                .collect();
            let (acc, dq16) = (dev.upload(&acc).unwrap(), upload_bf16(&dev, &dq16));
            let dk = upload_bf16(&dev, &randn_bf16(&mut rng, rows * d, 1.0));
            let layouts = [0, 1].map(|j| gpu::RowLayout {
                heads,
                ld: width,
                off: j * heads * d,
            });
            let dims = (rows, d);
            let w = [&ws[0], &ws[1]];
            let [(_, rq), (_, rk)] =
                gpu::rms_norm_fwd_laid_pair(&dev, &fused, layouts, w, dims, 1e-6).unwrap();
            let sentinel = vec![7.0f32; tokens * width];
            let dx = [0, 1].map(|_| upload_bf16(&dev, &sentinel));
            let held = [0, 1].map(|_| [-3.0f32, 1.5].map(|v| dev.upload(&vec![v; d]).unwrap()));
            fn dws(h: &[DevBuf<f32>; 2]) -> Option<[(&DevBuf<f32>, bool); 2]> {
                Some([(&h[0], false), (&h[1], true)])
            }
            gpu::rms_norm_bwd_laid_pair(
                &dev,
                &dx[0],
                &fused,
                layouts,
                w,
                [&rq, &rk],
                [&dq16, &dk],
                dims,
                dws(&held[0]),
            )
            .unwrap();
            gpu::rms_norm_bwd_laid_pair_dq32(
                &dev,
                &dx[1],
                &fused,
                layouts,
                w,
                [&rq, &rk],
                (&acc, scale),
                &dk,
                dims,
                dws(&held[1]),
            )
            .unwrap();
            assert_eq!(bits(&dev, &dx[0]), bits(&dev, &dx[1]), "dx, d {d}");
            assert_ne!(
                bits(&dev, &dx[1]),
                bits(&dev, &upload_bf16(&dev, &sentinel)),
                "dx written, d {d}"
            );
            for (j, (a, b)) in held[0].iter().zip(&held[1]).enumerate() {
                let (a, b) = (dev.download(a).unwrap(), dev.download(b).unwrap());
                assert_eq!(a, b, "dweight {j}, d {d}");
            }
            // a short accumulator is refused
            let short = dev.alloc::<f32>(rows * d - 1).unwrap();
            let refused = gpu::rms_norm_bwd_laid_pair_dq32(
                &dev,
                &dx[1],
                &fused,
                layouts,
                w,
                [&rq, &rk],
                (&short, scale),
                &dk,
                dims,
                None,
            );
            assert!(refused.is_err(), "short accumulator, d {d}");
            println!(
                "rms_norm pair from the dQ accumulator on {}: d {d}, the bits of the bf16 launch",
                dev.name()
            );
        }
    }
}

fn bits(dev: &KernelDevice, b: &DevBuf<bf16>) -> Vec<u16> {
    dev.download(b)
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}
