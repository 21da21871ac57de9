//! cuda/conv.cu ↔ src/kernels/conv.rs `tokens` (the gather is exact; the adjoint sums ≤ 4
//! terms and rounds once to bf16).

use super::*;
use advdmd::kernels::conv::tokens::{self, dev as gpu, ConvDims};

/// Both kernels of each pair: the plain ones (C = 3, not a multiple of 8; and the im2col of a
/// 400-pixel-wide image, whose one-row band passes the tiled kernel's shared memory) and the
/// tiled ones (C = 16, 24: a last block of 8 channels, 32), over several bands of rows (40 × 40
/// and 64 × 64 at stride 2, 9 × 7 at stride 1).
#[test]
fn token_im2col_and_col2im_match_cpu() {
    for dev in devices() {
        for (h, w, k, stride, pad, c) in [
            (6, 4, 4, 2, 1, 3),
            (5, 5, 3, 1, 1, 3),
            (4, 4, 1, 1, 0, 3),
            (6, 4, 4, 2, 1, 16),
            (40, 40, 4, 2, 1, 24),
            (64, 64, 4, 2, 1, 8),
            (9, 7, 3, 1, 1, 32),
            (5, 400, 4, 2, 1, 8),
        ] {
            let d = ConvDims {
                b: 2,
                h,
                w,
                c,
                kh: k,
                kw: k,
                stride,
                pad,
            };
            let mut rng = Rng::new(h as u64 * 7 + k as u64 + c as u64 * 131);
            let x = randn_bf16(&mut rng, d.b * h * w * d.c, 1.0);
            let cols = dev.alloc::<bf16>(d.b * d.rows() * d.spatial()).unwrap();
            gpu::im2col(&dev, &cols, &upload_bf16(&dev, &x), &d).unwrap();
            let shape = format!("{h}x{w}x{c} k{k} s{stride} p{pad}");
            assert_eq!(
                download_f32(&dev, &cols),
                tokens::im2col(&x, &d),
                "im2col {shape}"
            );

            let dc = randn_bf16(&mut rng, cols.len(), 1.0);
            let dx = dev.alloc::<bf16>(x.len()).unwrap();
            gpu::col2im(&dev, &dx, &upload_bf16(&dev, &dc), &d).unwrap();
            check(
                "col2im_tokens",
                &dev,
                &shape,
                &download_f32(&dev, &dx),
                &tokens::col2im(&dc, &d),
                8e-3,
            );
            // the plain kernels give the same bits (the tiled col2im sums in their order)
            let plain = dev.alloc::<bf16>(cols.len()).unwrap();
            gpu::im2col_with(&dev, &plain, &upload_bf16(&dev, &x), &d, false).unwrap();
            assert_eq!(
                download_f32(&dev, &plain),
                download_f32(&dev, &cols),
                "im2col {shape}: tiled against plain"
            );
            let plain = dev.alloc::<bf16>(x.len()).unwrap();
            gpu::col2im_with(&dev, &plain, &upload_bf16(&dev, &dc), &d, false).unwrap();
            assert_eq!(
                download_f32(&dev, &plain),
                download_f32(&dev, &dx),
                "col2im {shape}: tiled against plain"
            );
            assert!(gpu::im2col(&dev, &dx, &dx, &d).is_err());
        }
    }
}

/// `col2im` is the adjoint of `im2col`: ⟨im2col(x), y⟩ = ⟨x, col2im(y)⟩ on the CPU twins.
#[test]
fn token_col2im_is_the_adjoint() {
    let d = ConvDims {
        b: 1,
        h: 6,
        w: 6,
        c: 2,
        kh: 4,
        kw: 4,
        stride: 2,
        pad: 1,
    };
    let mut rng = Rng::new(5);
    let x: Vec<f32> = (0..72).map(|_| rng.normal()).collect();
    let y: Vec<f32> = (0..d.rows() * d.spatial()).map(|_| rng.normal()).collect();
    let cols = tokens::im2col(&x, &d);
    // the bias row of y pairs with ones, not with x: leave it out
    let k = d.rows() - 1;
    let lhs: f64 = cols[..k * d.spatial()]
        .iter()
        .zip(&y)
        .map(|(a, b)| (*a * *b) as f64)
        .sum();
    let rhs: f64 = x
        .iter()
        .zip(&tokens::col2im(&y, &d))
        .map(|(a, b)| (*a * *b) as f64)
        .sum();
    assert!(
        (lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0),
        "{lhs} vs {rhs}"
    );
}
