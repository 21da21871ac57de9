//! 2-D convolution kernels (NCHW, weights `[O, C, kh, kw]` in checkpoint layout): `im2col` and
//! its adjoint `col2im`, the GEMM-based forward and backward built on them, and a direct
//! convolution that the tests hold the GEMM path to.
//!
//! Users: the MMDiT patch embedding (kernel 2, stride 2, no padding; MMDIT.md §A.2) and the
//! discriminator head (kernel 4, stride 2, padding 1; ALGORITHM.md §2). The im2col inner order is
//! (c, kh, kw), so a column row meets the weight flattened as `[O, C·kh·kw]` with no reordering.

use super::gemm::{sgemm, MatRef};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Stride and zero padding of a 2-D convolution, each as (height, width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dSpec {
    pub stride: (usize, usize),
    pub padding: (usize, usize),
}

impl Default for Conv2dSpec {
    fn default() -> Self {
        Conv2dSpec {
            stride: (1, 1),
            padding: (0, 0),
        }
    }
}

impl Conv2dSpec {
    pub fn new(stride: (usize, usize), padding: (usize, usize)) -> Self {
        Conv2dSpec { stride, padding }
    }

    /// Output size (OH, OW) for an `h×w` input and a `kh×kw` kernel; panics when the kernel does
    /// not fit the padded input or a stride is zero.
    pub fn output_size(&self, h: usize, w: usize, kh: usize, kw: usize) -> (usize, usize) {
        let (sh, sw) = self.stride;
        let (ph, pw) = self.padding;
        assert!(
            sh > 0 && sw > 0,
            "conv2d: stride {:?} must be positive",
            self.stride
        );
        assert!(kh > 0 && kw > 0, "conv2d: empty {kh}x{kw} kernel");
        assert!(
            h + 2 * ph >= kh && w + 2 * pw >= kw,
            "conv2d: {kh}x{kw} kernel does not fit a {h}x{w} input padded by {:?}",
            self.padding
        );
        ((h + 2 * ph - kh) / sh + 1, (w + 2 * pw - kw) / sw + 1)
    }
}

fn nchw(x: &Tensor, what: &str) -> [usize; 4] {
    let &[b, c, h, w] = x.shape() else {
        panic!("{what}: input must be [B, C, H, W], got {:?}", x.shape())
    };
    [b, c, h, w]
}

/// Input row touched by output row `o` and kernel row `i`, or `None` inside the zero padding.
#[inline]
fn source_index(o: usize, i: usize, stride: usize, pad: usize, size: usize) -> Option<usize> {
    (o * stride + i).checked_sub(pad).filter(|&v| v < size)
}

/// Patches of `x [B, C, H, W]` as rows: `[B, OH·OW, C·kh·kw]`, rows in row-major (oh, ow) order,
/// each row in (c, kh, kw) order, zeros where a patch overlaps the padding.
pub fn im2col(x: &Tensor, kh: usize, kw: usize, spec: Conv2dSpec) -> Tensor {
    let [b, c, h, w] = nchw(x, "im2col");
    let (oh, ow) = spec.output_size(h, w, kh, kw);
    let k = c * kh * kw;
    let src = x.f32s();
    let mut cols = vec![0f32; b * oh * ow * k];
    if k == 0 || oh * ow == 0 {
        return Tensor::from_vec(cols, &[b, oh * ow, k]);
    }
    // One task per output row of one image keeps the batch-1 case parallel too.
    cols.par_chunks_mut(ow * k)
        .enumerate()
        .for_each(|(row, dst)| {
            let (bi, y) = (row / oh, row % oh);
            let img = &src[bi * c * h * w..(bi + 1) * c * h * w];
            for (x_out, patch) in dst.chunks_mut(k).enumerate() {
                for ci in 0..c {
                    let plane = &img[ci * h * w..(ci + 1) * h * w];
                    for i in 0..kh {
                        let seg = &mut patch[(ci * kh + i) * kw..(ci * kh + i + 1) * kw];
                        let Some(ih) = source_index(y, i, spec.stride.0, spec.padding.0, h) else {
                            continue; // already zero
                        };
                        let line = &plane[ih * w..(ih + 1) * w];
                        for (j, d) in seg.iter_mut().enumerate() {
                            if let Some(iw) =
                                source_index(x_out, j, spec.stride.1, spec.padding.1, w)
                            {
                                *d = line[iw];
                            }
                        }
                    }
                }
            }
        });
    Tensor::from_vec(cols, &[b, oh * ow, k])
}

/// The adjoint of [`im2col`]: scatters `cols [B, OH·OW, C·kh·kw]` back into an image of
/// `input_shape [B, C, H, W]`, adding where patches overlap and dropping what falls on padding.
pub fn col2im(
    cols: &Tensor,
    input_shape: &[usize],
    kh: usize,
    kw: usize,
    spec: Conv2dSpec,
) -> Tensor {
    let &[b, c, h, w] = input_shape else {
        panic!("col2im: input shape must be [B, C, H, W], got {input_shape:?}")
    };
    let (oh, ow) = spec.output_size(h, w, kh, kw);
    let k = c * kh * kw;
    assert_eq!(
        cols.shape(),
        [b, oh * ow, k],
        "col2im: columns {:?} for input {input_shape:?} and a {kh}x{kw} kernel with {spec:?}",
        cols.shape()
    );
    let src = cols.f32s();
    let mut out = vec![0f32; b * c * h * w];
    if h * w == 0 {
        return Tensor::from_vec(out, input_shape);
    }
    // Each task owns one (b, c) plane, so overlapping patches accumulate without races.
    out.par_chunks_mut(h * w)
        .enumerate()
        .for_each(|(plane_idx, plane)| {
            let (bi, ci) = (plane_idx / c, plane_idx % c);
            let img_cols = &src[bi * oh * ow * k..(bi + 1) * oh * ow * k];
            for y in 0..oh {
                for x_out in 0..ow {
                    let patch = &img_cols[(y * ow + x_out) * k..(y * ow + x_out + 1) * k];
                    for i in 0..kh {
                        let Some(ih) = source_index(y, i, spec.stride.0, spec.padding.0, h) else {
                            continue;
                        };
                        let seg = &patch[(ci * kh + i) * kw..(ci * kh + i + 1) * kw];
                        for (j, v) in seg.iter().enumerate() {
                            if let Some(iw) =
                                source_index(x_out, j, spec.stride.1, spec.padding.1, w)
                            {
                                plane[ih * w + iw] += v;
                            }
                        }
                    }
                }
            }
        });
    Tensor::from_vec(out, input_shape)
}

/// Checks operand shapes; returns (B, C, H, W, O, kh, kw, OH, OW).
fn conv_dims(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, spec: Conv2dSpec) -> [usize; 9] {
    let [b, c, h, w] = nchw(x, "conv2d");
    let &[o, wc, kh, kw] = weight.shape() else {
        panic!(
            "conv2d: weight must be [O, C, kh, kw], got {:?}",
            weight.shape()
        )
    };
    assert_eq!(
        wc,
        c,
        "conv2d: weight {:?} expects {wc} input channels, input {:?} has {c}",
        weight.shape(),
        x.shape()
    );
    if let Some(bias) = bias {
        assert_eq!(
            bias.shape(),
            [o],
            "conv2d: bias {:?} for {o} output channels",
            bias.shape()
        );
    }
    let (oh, ow) = spec.output_size(h, w, kh, kw);
    [b, c, h, w, o, kh, kw, oh, ow]
}

/// `y [B, O, OH, OW]` = conv of `x [B, C, H, W]` by `weight [O, C, kh, kw]` plus `bias [O]`.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, spec: Conv2dSpec) -> Tensor {
    let [b, _, _, _, o, kh, kw, oh, ow] = conv_dims(x, weight, bias, spec);
    let cols = im2col(x, kh, kw, spec);
    let (p, k) = (oh * ow, cols.dim(-1));
    let (cd, wd) = (cols.f32s(), weight.f32s());
    let mut y = vec![0f32; b * o * p];
    // Per image, Y_b [O, P] = W [O, K] · cols_bᵀ lands directly in NCHW: no output permute.
    for bi in 0..b {
        sgemm(
            o,
            p,
            k,
            1.0,
            MatRef::rows(wd, k),
            MatRef::rows_t(&cd[bi * p * k..(bi + 1) * p * k], k),
            &mut y[bi * o * p..(bi + 1) * o * p],
            p,
            false,
            true,
        );
    }
    if let Some(bias) = bias {
        let bd = bias.f32s();
        if p > 0 {
            y.par_chunks_mut(p).enumerate().for_each(|(row, plane)| {
                let v = bd[row % o];
                plane.iter_mut().for_each(|y| *y += v);
            });
        }
    }
    Tensor::from_vec(y, &[b, o, oh, ow])
}

/// Gradients of [`conv2d`] for output gradient `dy [B, O, OH, OW]`: (dx, dweight, dbias), each
/// computed only when its flag is set.
pub fn conv2d_backward(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    spec: Conv2dSpec,
    need: (bool, bool, bool),
) -> (Option<Tensor>, Option<Tensor>, Option<Tensor>) {
    let [b, c, _, _, o, kh, kw, oh, ow] = conv_dims(x, weight, None, spec);
    assert_eq!(
        dy.shape(),
        [b, o, oh, ow],
        "conv2d backward: output gradient {:?} for input {:?} and weight {:?}",
        dy.shape(),
        x.shape(),
        weight.shape()
    );
    let (p, k) = (oh * ow, c * kh * kw);
    let (gd, wd) = (dy.f32s(), weight.f32s());
    let dx = need.0.then(|| {
        let mut dcols = vec![0f32; b * p * k];
        // dcols_b [P, K] = dY_bᵀ · W
        for bi in 0..b {
            sgemm(
                p,
                k,
                o,
                1.0,
                MatRef::rows_t(&gd[bi * o * p..(bi + 1) * o * p], p),
                MatRef::rows(wd, k),
                &mut dcols[bi * p * k..(bi + 1) * p * k],
                k,
                false,
                true,
            );
        }
        col2im(
            &Tensor::from_vec(dcols, &[b, p, k]),
            x.shape(),
            kh,
            kw,
            spec,
        )
    });
    let dw = need.1.then(|| {
        // The columns are rebuilt rather than kept from the forward: they are kh·kw/(sh·sw)
        // times the input's size, and the tape would hold them for the whole graph's lifetime.
        let cols = im2col(x, kh, kw, spec);
        let cd = cols.f32s();
        let mut dw = vec![0f32; o * k];
        // dW [O, K] = Σ_b dY_b [O, P] · cols_b [P, K]
        for bi in 0..b {
            sgemm(
                o,
                k,
                p,
                1.0,
                MatRef::rows(&gd[bi * o * p..(bi + 1) * o * p], p),
                MatRef::rows(&cd[bi * p * k..(bi + 1) * p * k], k),
                &mut dw,
                k,
                bi > 0,
                true,
            );
        }
        Tensor::from_vec(dw, weight.shape())
    });
    let db = need.2.then(|| {
        let mut db = vec![0f64; o];
        if p > 0 {
            for (row, plane) in gd.chunks(p).enumerate() {
                db[row % o] += plane.iter().map(|&v| v as f64).sum::<f64>();
            }
        }
        Tensor::from_vec(db.into_iter().map(|v| v as f32).collect(), &[o])
    });
    (dx, dw, db)
}

/// Direct convolution with f64 accumulation: the reference for the GEMM path.
pub fn conv2d_naive(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    spec: Conv2dSpec,
) -> Tensor {
    let [b, c, h, w, o, kh, kw, oh, ow] = conv_dims(x, weight, bias, spec);
    let (xd, wd) = (x.f32s(), weight.f32s());
    let mut y = vec![0f32; b * o * oh * ow];
    for bi in 0..b {
        for oc in 0..o {
            for y_out in 0..oh {
                for x_out in 0..ow {
                    let mut s = bias.map_or(0.0, |bias| bias.f32s()[oc] as f64);
                    for ci in 0..c {
                        for i in 0..kh {
                            for j in 0..kw {
                                let ih =
                                    (y_out * spec.stride.0 + i) as isize - spec.padding.0 as isize;
                                let iw =
                                    (x_out * spec.stride.1 + j) as isize - spec.padding.1 as isize;
                                if ih < 0 || iw < 0 || ih as usize >= h || iw as usize >= w {
                                    continue;
                                }
                                let xv = xd[((bi * c + ci) * h + ih as usize) * w + iw as usize];
                                let wv = wd[((oc * c + ci) * kh + i) * kw + j];
                                s += xv as f64 * wv as f64;
                            }
                        }
                    }
                    y[((bi * o + oc) * oh + y_out) * ow + x_out] = s as f32;
                }
            }
        }
    }
    Tensor::from_vec(y, &[b, o, oh, ow])
}

/// The head's convolution over token-major features (`cuda/conv.cu`): `[B, H·W, C]` tokens
/// gathered into per-sample columns `[B, K+1, OH·OW]` (K = C·KH·KW in (c, kh, kw) order, a last
/// row of ones for the bias), and the adjoint. CPU twins of `im2col_tokens` / `col2im_tokens`.
pub mod tokens {
    /// Sizes of one token-major convolution.
    #[derive(Clone, Copy, Debug)]
    pub struct ConvDims {
        pub b: usize,
        pub h: usize,
        pub w: usize,
        pub c: usize,
        pub kh: usize,
        pub kw: usize,
        pub stride: usize,
        pub pad: usize,
    }

    impl ConvDims {
        pub fn out(&self) -> (usize, usize) {
            (
                (self.h + 2 * self.pad - self.kh) / self.stride + 1,
                (self.w + 2 * self.pad - self.kw) / self.stride + 1,
            )
        }
        /// Rows of one sample's columns, the bias row included.
        pub fn rows(&self) -> usize {
            self.c * self.kh * self.kw + 1
        }
        pub fn spatial(&self) -> usize {
            let (oh, ow) = self.out();
            oh * ow
        }
        /// The input pixel `(iy, ix)` that output `(oy, ox)` reads at tap `(kh, kw)`, if inside.
        fn tap(
            &self,
            (oy, ox): (usize, usize),
            (kh, kw): (usize, usize),
        ) -> Option<(usize, usize)> {
            let iy = (oy * self.stride + kh).checked_sub(self.pad)?;
            let ix = (ox * self.stride + kw).checked_sub(self.pad)?;
            (iy < self.h && ix < self.w).then_some((iy, ix))
        }
    }

    /// `[B, K+1, OH·OW]` columns of `x [B, H·W, C]`.
    pub fn im2col(x: &[f32], d: &ConvDims) -> Vec<f32> {
        let (rows, s) = (d.rows(), d.spatial());
        let ow = d.out().1;
        let mut cols = vec![0f32; d.b * rows * s];
        for b in 0..d.b {
            for c in 0..d.c {
                for kh in 0..d.kh {
                    for kw in 0..d.kw {
                        let k = (c * d.kh + kh) * d.kw + kw;
                        for p in 0..s {
                            if let Some((iy, ix)) = d.tap((p / ow, p % ow), (kh, kw)) {
                                cols[(b * rows + k) * s + p] =
                                    x[((b * d.h + iy) * d.w + ix) * d.c + c];
                            }
                        }
                    }
                }
            }
            cols[(b * rows + rows - 1) * s..(b * rows + rows) * s].fill(1.0);
        }
        cols
    }

    /// The adjoint of [`im2col`] (the bias row ignored): `[B, H·W, C]`.
    pub fn col2im(dcols: &[f32], d: &ConvDims) -> Vec<f32> {
        let (rows, s) = (d.rows(), d.spatial());
        let ow = d.out().1;
        let mut dx = vec![0f32; d.b * d.h * d.w * d.c];
        for b in 0..d.b {
            for c in 0..d.c {
                for kh in 0..d.kh {
                    for kw in 0..d.kw {
                        let k = (c * d.kh + kh) * d.kw + kw;
                        for p in 0..s {
                            if let Some((iy, ix)) = d.tap((p / ow, p % ow), (kh, kw)) {
                                dx[((b * d.h + iy) * d.w + ix) * d.c + c] +=
                                    dcols[(b * rows + k) * s + p];
                            }
                        }
                    }
                }
            }
        }
        dx
    }

    /// Launchers of `cuda/conv.cu`.
    pub mod dev {
        use super::ConvDims;
        use crate::device::kernel::{
            blocks_for, DevBuf, KernelArgs, KernelDevice, KernelError, KernelResult, LaunchCfg,
        };
        use half::bf16;

        fn args(a: KernelArgs, d: &ConvDims) -> KernelArgs {
            let (oh, ow) = d.out();
            [d.b, d.h, d.w, d.c, d.kh, d.kw, d.stride, d.pad, oh, ow]
                .iter()
                .fold(a, |a, &v| a.i32(v as i32))
        }

        fn check(d: &ConvDims, x: usize, cols: usize) -> KernelResult<()> {
            let ok = d.stride > 0
                && d.h + 2 * d.pad >= d.kh
                && d.w + 2 * d.pad >= d.kw
                && x == d.b * d.h * d.w * d.c
                && cols == d.b * d.rows() * d.spatial();
            if ok {
                Ok(())
            } else {
                Err(KernelError::Invalid(format!(
                    "token convolution {d:?}: {x} input and {cols} column elements"
                )))
            }
        }

        fn cfg(n: usize) -> LaunchCfg {
            LaunchCfg::linear(blocks_for(n, 256).min(65_535), 256)
        }

        /// Channels a block of the tiled kernels takes (`kConvTileChannels`).
        const TILE_CHANNELS: usize = 16;
        /// The tiled kernels' shared memory bound: within the default 48 KB, so that any card
        /// takes them without an opt-in.
        const TILE_SMEM: usize = 48 * 1024;

        /// The tiled kernel's launch over bands of `band` rows of `rows` (with `bytes(band)` of
        /// shared memory), `band` the rows that give a block ~256 items of `per_row` each and fit
        /// [`TILE_SMEM`]; `None` (the plain kernel) where C is not a multiple of 8 (16-byte packs
        /// of a pixel), no band of one row fits, or a dimension passes the grid's limits.
        fn tiled(
            d: &ConvDims,
            rows: usize,
            per_row: usize,
            bytes: impl Fn(usize) -> usize,
        ) -> Option<(LaunchCfg, usize)> {
            if d.c % 8 != 0 || rows == 0 || per_row == 0 {
                return None;
            }
            let mut band = 256usize.div_ceil(per_row).clamp(1, rows);
            while band > 1 && bytes(band) > TILE_SMEM {
                band -= 1;
            }
            let grid = [d.c.div_ceil(TILE_CHANNELS), d.b, rows.div_ceil(band)];
            (bytes(band) <= TILE_SMEM && grid[1] <= 65_535 && grid[2] <= 65_535).then(|| {
                let cfg = LaunchCfg {
                    grid: grid.map(|g| g as u32),
                    block: [256, 1, 1],
                    shared_bytes: bytes(band) as u32,
                };
                (cfg, band)
            })
        }

        /// `im2col_tokens_tiled` where it applies, else `im2col_tokens`.
        pub fn im2col(
            dev: &KernelDevice,
            cols: &DevBuf<bf16>,
            x: &DevBuf<bf16>,
            d: &ConvDims,
        ) -> KernelResult<()> {
            im2col_with(dev, cols, x, d, true)
        }

        /// [`im2col`], the tiled kernel allowed or not (`false`: the plain one; for the bench's
        /// and the tests' A/B).
        pub fn im2col_with(
            dev: &KernelDevice,
            cols: &DevBuf<bf16>,
            x: &DevBuf<bf16>,
            d: &ConvDims,
            allow_tiled: bool,
        ) -> KernelResult<()> {
            check(d, x.len(), cols.len())?;
            if cols.is_empty() {
                return Ok(());
            }
            let a = KernelArgs::new().buf(cols).buf(x);
            let (oh, ow) = d.out();
            // a band of R output rows reads (R − 1)·stride + KH input rows of 16 channels
            let smem = |r: usize| TILE_CHANNELS * ((r - 1) * d.stride + d.kh) * d.w * 2;
            match tiled(d, oh, ow, smem).filter(|_| allow_tiled) {
                Some((cfg, r)) => dev.launch("im2col_tokens_tiled", cfg, args(a, d).i32(r as i32)),
                None => dev.launch("im2col_tokens", cfg(cols.len()), args(a, d)),
            }
        }

        /// `col2im_tokens_tiled` where it applies, else `col2im_tokens`.
        pub fn col2im(
            dev: &KernelDevice,
            dx: &DevBuf<bf16>,
            dcols: &DevBuf<bf16>,
            d: &ConvDims,
        ) -> KernelResult<()> {
            col2im_with(dev, dx, dcols, d, true)
        }

        /// [`col2im`], the tiled kernel allowed or not.
        pub fn col2im_with(
            dev: &KernelDevice,
            dx: &DevBuf<bf16>,
            dcols: &DevBuf<bf16>,
            d: &ConvDims,
            allow_tiled: bool,
        ) -> KernelResult<()> {
            check(d, dx.len(), dcols.len())?;
            if dx.is_empty() {
                return Ok(());
            }
            let a = KernelArgs::new().buf(dx).buf(dcols);
            // a band of RI input rows: 16 f32 sums a pixel
            let smem = |r: usize| r * d.w * TILE_CHANNELS * 4;
            match tiled(d, d.h, d.w, smem).filter(|_| allow_tiled) {
                Some((cfg, r)) => dev.launch("col2im_tokens_tiled", cfg, args(a, d).i32(r as i32)),
                None => dev.launch("col2im_tokens", cfg(dx.len()), args(a, d)),
            }
        }
    }
}
