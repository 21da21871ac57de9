//! cuda/shape.cu ↔ src/kernels/shape.rs `flat` (layout moves are exact; sums round to bf16).

use super::*;
use advdmd::kernels::shape::dev::{self as gpu, Cols, PosCrop};
use advdmd::kernels::shape::flat;

#[test]
fn copy_cols_moves_exactly_the_window() {
    for dev in devices() {
        let mut rng = Rng::new(3);
        // (rows, cols, dst (ld, off), src (ld, off)): element-wise, then the 16-byte path
        // (every window 8-aligned), over a row count that is not a multiple of anything; then
        // the element-wise rows of ≥ 128 columns in chunks (the head's bias-augmented weight:
        // an odd destination stride; a chunk past the row's end)
        for (rows, cols, dw, sw) in [
            (37, 5, (9, 3), (16, 10)),
            (37, 24, (40, 8), (72, 48)),
            (37, 300, (301, 0), (300, 0)),
            (5, 600, (603, 2), (611, 7)),
        ] {
            let src = randn_bf16(&mut rng, rows * sw.0, 1.0);
            let dst0 = randn_bf16(&mut rng, rows * dw.0, 1.0);
            let (s, d) = (upload_bf16(&dev, &src), upload_bf16(&dev, &dst0));
            let win = |(ld, off)| Cols { ld, off };
            gpu::copy_cols(&dev, &d, win(dw), &s, win(sw), rows, cols).unwrap();
            let mut want = dst0.clone();
            flat::copy_cols(&mut want, &src, rows, cols, dw, sw);
            assert_eq!(
                download_f32(&dev, &d),
                want,
                "copy_cols {rows}x{cols} on {}",
                dev.name()
            );
        }
        let (s, d) = (
            upload_bf16(&dev, &randn_bf16(&mut rng, 37 * 16, 1.0)),
            upload_bf16(&dev, &randn_bf16(&mut rng, 37 * 9, 1.0)),
        );
        let bad = gpu::copy_cols(
            &dev,
            &d,
            Cols { ld: 9, off: 5 },
            &s,
            Cols { ld: 16, off: 0 },
            37,
            5,
        );
        assert!(bad.is_err(), "a window past the row end must be refused");
    }
}

#[test]
fn patchify_round_trips_in_both_orders() {
    for dev in devices() {
        let mut rng = Rng::new(5);
        let dims = (2, 3, 6, 4);
        let n = 2 * 3 * 6 * 4;
        let img = randn_bf16(&mut rng, n, 1.0);
        let x = upload_bf16(&dev, &img);
        for channel_last in [false, true] {
            let tokens = dev.alloc::<bf16>(n).unwrap();
            gpu::patchify(&dev, &tokens, &x, dims, 2, channel_last, true).unwrap();
            let want = flat::patchify(&img, dims, 2, channel_last, true);
            assert_eq!(
                download_f32(&dev, &tokens),
                want,
                "patchify on {}",
                dev.name()
            );
            let back = dev.alloc::<bf16>(n).unwrap();
            gpu::patchify(&dev, &back, &tokens, dims, 2, channel_last, false).unwrap();
            assert_eq!(
                download_f32(&dev, &back),
                img,
                "unpatchify on {}",
                dev.name()
            );
        }
        // the channel-first order of one patch is (c, kh, kw): element (c=1, y=1, x=0) of image 0
        // is feature 1·4 + 1·2 + 0 = 6 of token 0
        let t = flat::token_index((0, 1, 1, 0), (3, 6, 4, 2), false);
        assert_eq!(t, 6);
        assert!(gpu::patchify(&dev, &x, &x, (2, 3, 5, 4), 2, false, true).is_err());
    }
}

#[test]
fn pos_embed_adds_and_sums_the_crop() {
    for dev in devices() {
        let mut rng = Rng::new(7);
        let (b, gh, gw, d, p, top, left) = (3, 2, 3, 8, 5, 1, 2);
        let table = randn_bf16(&mut rng, p * p * d, 1.0);
        let tok = randn_bf16(&mut rng, b * gh * gw * d, 1.0);
        let crop = PosCrop {
            b,
            gh,
            gw,
            d,
            p,
            top,
            left,
        };
        let (t, tab) = (upload_bf16(&dev, &tok), upload_bf16(&dev, &table));
        gpu::add_pos_embed(&dev, &t, &tab, crop).unwrap();
        let mut want = tok.clone();
        flat::add_pos_embed(&mut want, &table, (gh, gw, d), p, (top, left));
        check(
            "add_pos_embed",
            &dev,
            "3x6x8",
            &download_f32(&dev, &t),
            &want,
            4e-3,
        );

        let g0: Vec<f32> = (0..p * p * d).map(|i| i as f32 * 0.01).collect();
        let g = dev.upload(&g0).unwrap();
        gpu::pos_embed_grad(&dev, &g, &upload_bf16(&dev, &tok), crop).unwrap();
        let mut want = g0.clone();
        flat::pos_embed_grad(&mut want, &tok, (gh, gw, d), p, (top, left));
        check(
            "pos_embed_grad",
            &dev,
            "3x6x8",
            &dev.download(&g).unwrap(),
            &want,
            1e-5,
        );
        let bad = PosCrop { top: 4, ..crop };
        assert!(gpu::add_pos_embed(&dev, &t, &tab, bad).is_err());
    }
}

#[test]
fn accumulation_kernels_add() {
    for dev in devices() {
        let mut rng = Rng::new(9);
        let n = 1001;
        let (a, b) = (randn_bf16(&mut rng, n, 1.0), randn_bf16(&mut rng, n, 1.0));
        let (da, db) = (upload_bf16(&dev, &a), upload_bf16(&dev, &b));
        gpu::add(&dev, &da, &da, &db).unwrap();
        let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        check(
            "add_bf16",
            &dev,
            "1001",
            &download_f32(&dev, &da),
            &sum,
            4e-3,
        );

        let g = dev.upload(&a).unwrap();
        gpu::accumulate_bf16(&dev, &g, &db).unwrap();
        check(
            "accumulate_f32_bf16",
            &dev,
            "1001",
            &dev.download(&g).unwrap(),
            &sum,
            1e-6,
        );
        let g2 = dev.upload(&a).unwrap();
        gpu::accumulate_f32(&dev, &g2, &dev.upload(&b).unwrap()).unwrap();
        check(
            "accumulate_f32",
            &dev,
            "1001",
            &dev.download(&g2).unwrap(),
            &sum,
            1e-6,
        );
        assert!(gpu::add(&dev, &da, &da, &dev.alloc::<bf16>(3).unwrap()).is_err());
    }
}

/// `gather_chunks_bf16`: every chunk into its columns, each value rounded once, zeros for the
/// chunks without a gradient; bad shapes are errors.
#[test]
fn gather_chunks_writes_every_column() {
    for dev in devices() {
        let mut rng = Rng::new(11);
        for (rows, d, n) in [(3, 24, 6), (2, 40, 9), (1, 8, 1)] {
            let srcs: Vec<Vec<f32>> = (0..n)
                .map(|_| (0..rows * d).map(|_| rng.normal()).collect())
                .collect();
            let bufs: Vec<_> = srcs.iter().map(|v| dev.upload(v).unwrap()).collect();
            // every third chunk without a gradient
            let chunks: Vec<_> = (0..n).map(|j| (j % 3 != 1).then(|| &bufs[j])).collect();
            let dst = upload_bf16(&dev, &randn_bf16(&mut rng, rows * n * d, 1.0));
            gpu::gather_chunks_bf16(&dev, &dst, (rows, d), &chunks).unwrap();
            let mut want = vec![0f32; rows * n * d];
            for r in 0..rows {
                for (j, src) in srcs.iter().enumerate() {
                    for c in 0..d {
                        if j % 3 != 1 {
                            want[r * n * d + j * d + c] = bf16::from_f32(src[r * d + c]).to_f32();
                        }
                    }
                }
            }
            let shape = format!("{rows}x{n}x{d}");
            check(
                "gather_chunks_bf16",
                &dev,
                &shape,
                &download_f32(&dev, &dst),
                &want,
                0.0,
            );
            assert!(gpu::gather_chunks_bf16(&dev, &dst, (rows, d + 1), &chunks).is_err());
        }
        let too_many: Vec<Option<&DevBuf<f32>>> = vec![None; 10];
        let dst = dev.alloc::<bf16>(10 * 8).unwrap();
        assert!(gpu::gather_chunks_bf16(&dev, &dst, (1, 8), &too_many).is_err());
    }
}

/// `residual_grad_add`: the f32 sum exactly (one f32 add of an exact bf16), its bf16 rounding
/// exactly, in place or not, on the vector path (n % 8 == 0) and the scalar one.
#[test]
fn residual_grad_add_sums_and_rounds_in_one_pass() {
    for dev in devices() {
        let mut rng = Rng::new(10);
        for n in [4096, 1001, 8] {
            let a: Vec<f32> = (0..n).map(|_| rng.normal() * 3.0).collect();
            let x = randn_bf16(&mut rng, n, 1.0);
            let want = advdmd::kernels::shape::flat::residual_grad_add(&a, &x);
            let (da, dx) = (dev.upload(&a).unwrap(), upload_bf16(&dev, &x));
            let out = dev.alloc::<f32>(n).unwrap();
            let out16 = dev.alloc::<bf16>(n).unwrap();
            gpu::residual_grad_add(&dev, &out, Some(&out16), &da, &dx).unwrap();
            assert_eq!(dev.download(&out).unwrap(), want, "sum, n = {n}");
            let rounded: Vec<bf16> = want.iter().map(|&v| bf16::from_f32(v)).collect();
            assert_eq!(dev.download(&out16).unwrap(), rounded, "bf16, n = {n}");
            // in place, without the bf16 copy
            gpu::residual_grad_add(&dev, &da, None, &da, &dx).unwrap();
            check(
                "residual_grad_add",
                &dev,
                &n.to_string(),
                &dev.download(&da).unwrap(),
                &want,
                0.0,
            );
        }
        let (f, h) = (dev.alloc::<f32>(8).unwrap(), dev.alloc::<bf16>(7).unwrap());
        assert!(gpu::residual_grad_add(&dev, &f, Some(&h), &f, &dev.alloc(8).unwrap()).is_err());
    }
}

#[test]
fn views_are_windows_of_their_buffer() {
    let dev = KernelDevice::emulator();
    let base = dev.upload(&[1f32, 2., 3., 4., 5.]).unwrap();
    let v = base.view(1, 3).unwrap();
    assert_eq!(dev.download(&v).unwrap(), vec![2., 3., 4.]);
    dev.memset_zero(&v).unwrap();
    drop(v);
    assert_eq!(dev.download(&base).unwrap(), vec![1., 0., 0., 0., 5.]);
    assert!(base.view(3, 3).is_err());
    assert!(base.view(usize::MAX, 2).is_err());
}

#[test]
fn select_block_picks_the_staged_block() {
    for dev in devices() {
        let (blocks, len) = (4, 37);
        let src: Vec<f32> = (0..blocks * len).map(|i| i as f32 * 0.5).collect();
        let s = dev.upload(&src).unwrap();
        let idx = dev.upload(&[2i32, 3]).unwrap();
        let d = dev.alloc::<f32>(len).unwrap();
        for slot in 0..2 {
            gpu::select_block_f32(&dev, &d, &s, &idx, slot).unwrap();
            let b = [2, 3][slot];
            assert_eq!(
                dev.download(&d).unwrap(),
                src[b * len..(b + 1) * len],
                "select_block slot {slot} on {}",
                dev.name()
            );
        }
        let short = dev.alloc::<f32>(36).unwrap();
        assert!(
            gpu::select_block_f32(&dev, &short, &s, &idx, 0).is_err(),
            "a block size that does not divide the stack is refused"
        );
        assert!(gpu::select_block_f32(&dev, &d, &s, &idx, 2).is_err());
    }
}
