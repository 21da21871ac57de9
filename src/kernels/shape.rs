//! Layout kernels: permute, concatenation and splitting along a dimension. Tensors are contiguous
//! row-major, so every layout change is an explicit copy made here. `flat` and `dev` are the
//! device model path's layout kernels (`cuda/shape.cu`: column windows, patchify, the cropped
//! position embedding, gradient accumulation) and their CPU twins.

use crate::tensor::{numel, Tensor};
use rayon::prelude::*;

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Output dim `i` is input dim `perm[i]`.
pub fn permute(x: &Tensor, perm: &[usize]) -> Tensor {
    let shape = x.shape();
    assert_eq!(
        perm.len(),
        shape.len(),
        "permute {perm:?} of shape {shape:?}"
    );
    let mut seen = vec![false; perm.len()];
    for &p in perm {
        assert!(
            p < perm.len() && !seen[p],
            "permute: {perm:?} is not a permutation"
        );
        seen[p] = true;
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let in_strides = strides(shape);
    let src_strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let src = x.f32s();
    let r = out_shape.len();
    let mut out = vec![0f32; src.len()];
    if r == 0 || src.is_empty() {
        out.copy_from_slice(src);
        return Tensor::from_vec(out, &out_shape);
    }
    let last = out_shape[r - 1];
    let ls = src_strides[r - 1];
    out.par_chunks_mut(last).enumerate().for_each(|(row, o)| {
        let mut rem = row;
        let mut off = 0;
        for d in (0..r - 1).rev() {
            off += (rem % out_shape[d]) * src_strides[d];
            rem /= out_shape[d];
        }
        for (j, o) in o.iter_mut().enumerate() {
            *o = src[off + j * ls];
        }
    });
    Tensor::from_vec(out, &out_shape)
}

/// The inverse permutation.
pub fn inverse_permutation(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    inv
}

/// (outer, size along `dim`, inner) of a shape.
fn split_dims(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    (numel(&shape[..dim]), shape[dim], numel(&shape[dim + 1..]))
}

/// Concatenates tensors that agree on every dim but `dim`.
pub fn concat(xs: &[&Tensor], dim: usize) -> Tensor {
    assert!(!xs.is_empty(), "concat of nothing");
    let first = xs[0].shape();
    assert!(dim < first.len(), "concat dim {dim} for shape {first:?}");
    for x in xs {
        let s = x.shape();
        assert!(
            s.len() == first.len()
                && s.iter()
                    .zip(first)
                    .enumerate()
                    .all(|(i, (a, b))| i == dim || a == b),
            "concat along {dim}: shapes {first:?} and {s:?} disagree"
        );
    }
    let total: usize = xs.iter().map(|x| x.shape()[dim]).sum();
    let mut out_shape = first.to_vec();
    out_shape[dim] = total;
    let (outer, _, inner) = split_dims(first, dim);
    let mut out = Vec::with_capacity(numel(&out_shape));
    for o in 0..outer {
        for x in xs {
            let n = x.shape()[dim] * inner;
            out.extend_from_slice(&x.f32s()[o * n..(o + 1) * n]);
        }
    }
    Tensor::from_vec(out, &out_shape)
}

/// Splits along `dim` into pieces of the given sizes (which must add up to the dim).
pub fn split(x: &Tensor, dim: usize, sizes: &[usize]) -> Vec<Tensor> {
    let shape = x.shape();
    assert!(dim < shape.len(), "split dim {dim} for shape {shape:?}");
    assert_eq!(
        sizes.iter().sum::<usize>(),
        shape[dim],
        "split sizes {sizes:?} of dim {dim} in {shape:?}"
    );
    let (outer, size, inner) = split_dims(shape, dim);
    let src = x.f32s();
    let mut start = 0;
    sizes
        .iter()
        .map(|&s| {
            let mut data = Vec::with_capacity(outer * s * inner);
            for o in 0..outer {
                let base = (o * size + start) * inner;
                data.extend_from_slice(&src[base..base + s * inner]);
            }
            start += s;
            let mut piece_shape = shape.to_vec();
            piece_shape[dim] = s;
            Tensor::from_vec(data, &piece_shape)
        })
        .collect()
}

/// The twins of `cuda/shape.cu` on plain slices (f32 values standing for bf16 ones; the device
/// rounds each sum to bf16 where the CPU keeps f32).
pub mod flat {
    /// `a + x` (the device also gives the bf16 rounding of each sum).
    pub fn residual_grad_add(a: &[f32], x: &[f32]) -> Vec<f32> {
        a.iter().zip(x).map(|(p, q)| p + q).collect()
    }

    /// `dst[r, dst_off + c] = src[r, src_off + c]` for `r < rows`, `c < cols`.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_cols(
        dst: &mut [f32],
        src: &[f32],
        rows: usize,
        cols: usize,
        (dst_ld, dst_off): (usize, usize),
        (src_ld, src_off): (usize, usize),
    ) {
        for r in 0..rows {
            dst[r * dst_ld + dst_off..][..cols]
                .copy_from_slice(&src[r * src_ld + src_off..][..cols]);
        }
    }

    /// Index of image element `(b, c, y, x)` of `[B, C, H, W]` in the `[B, (H/p)·(W/p), C·p·p]`
    /// tokens, features ordered (c, kh, kw) or, `channel_last`, (kh, kw, c).
    pub fn token_index(
        (b, c, y, x): (usize, usize, usize, usize),
        (ch, h, w, p): (usize, usize, usize, usize),
        channel_last: bool,
    ) -> usize {
        let gw = w / p;
        let token = (y / p) * gw + x / p;
        let (ky, kx) = (y % p, x % p);
        let inner = if channel_last {
            (ky * p + kx) * ch + c
        } else {
            (c * p + ky) * p + kx
        };
        (b * (h / p) * gw + token) * ch * p * p + inner
    }

    /// Image `[B, C, H, W]` → tokens (`to_tokens`), or tokens → image.
    pub fn patchify(
        input: &[f32],
        (b, ch, h, w): (usize, usize, usize, usize),
        p: usize,
        channel_last: bool,
        to_tokens: bool,
    ) -> Vec<f32> {
        let mut out = vec![0f32; b * ch * h * w];
        let mut i = 0;
        for bi in 0..b {
            for c in 0..ch {
                for y in 0..h {
                    for x in 0..w {
                        let t = token_index((bi, c, y, x), (ch, h, w, p), channel_last);
                        if to_tokens {
                            out[t] = input[i];
                        } else {
                            out[i] = input[t];
                        }
                        i += 1;
                    }
                }
            }
        }
        out
    }

    /// Where the crop `(gh, gw)` at `(top, left)` of a `P×P` grid starts, per cell, in the table.
    fn table_row(cell: usize, gw: usize, p: usize, (top, left): (usize, usize)) -> usize {
        (top + cell / gw) * p + left + cell % gw
    }

    /// `tokens [B, gh·gw, D] += table[crop]`.
    pub fn add_pos_embed(
        tokens: &mut [f32],
        table: &[f32],
        (gh, gw, d): (usize, usize, usize),
        p: usize,
        corner: (usize, usize),
    ) {
        for (i, t) in tokens.iter_mut().enumerate() {
            let cell = (i / d) % (gh * gw);
            *t += table[table_row(cell, gw, p, corner) * d + i % d];
        }
    }

    /// `g_table[crop] += Σ_b dtokens[b]`.
    pub fn pos_embed_grad(
        g_table: &mut [f32],
        dtokens: &[f32],
        (gh, gw, d): (usize, usize, usize),
        p: usize,
        corner: (usize, usize),
    ) {
        for (i, g) in dtokens.iter().enumerate() {
            let cell = (i / d) % (gh * gw);
            g_table[table_row(cell, gw, p, corner) * d + i % d] += g;
        }
    }
}

/// Launchers of `cuda/shape.cu`.
pub mod dev {
    use crate::device::kernel::{
        blocks_for, DevBuf, KernelArgs, KernelDevice, KernelError, KernelResult, LaunchCfg,
    };
    use half::bf16;

    const THREADS: u32 = 256;

    fn cfg(n: usize) -> LaunchCfg {
        LaunchCfg::linear(blocks_for(n, THREADS).min(65_535), THREADS)
    }

    fn invalid(msg: String) -> KernelError {
        KernelError::Invalid(msg)
    }

    /// A window of columns: `ld` the row length, `off` the first column.
    #[derive(Clone, Copy, Debug)]
    pub struct Cols {
        pub ld: usize,
        pub off: usize,
    }

    impl Cols {
        /// Whether `rows × cols` of this window fit a buffer of `len` elements.
        fn fits(self, len: usize, rows: usize, cols: usize) -> bool {
            cols == 0 || rows == 0 || (self.off + cols <= self.ld && len >= rows * self.ld)
        }
    }

    /// `dst[r, dst.off + c] = src[r, src.off + c]` for `r < rows`, `c < cols`: a chunk of a
    /// modulation vector, q/k/v out of a fused projection, or their gradients back into one.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_cols(
        dev: &KernelDevice,
        dst: &DevBuf<bf16>,
        dst_cols: Cols,
        src: &DevBuf<bf16>,
        src_cols: Cols,
        rows: usize,
        cols: usize,
    ) -> KernelResult<()> {
        if !dst_cols.fits(dst.len(), rows, cols) || !src_cols.fits(src.len(), rows, cols) {
            return Err(invalid(format!(
                "copy_cols: {rows}×{cols} from {src_cols:?} ({} elements) to {dst_cols:?} ({})",
                src.len(),
                dst.len()
            )));
        }
        if rows * cols == 0 {
            return Ok(());
        }
        // the kernel's 16-byte path (same test as in shape.cu)
        let aligned = (cols | dst_cols.ld | dst_cols.off | src_cols.ld | src_cols.off) % 8 == 0
            && (dst.device_ptr() | src.device_ptr()) % 16 == 0;
        let per_thread = if aligned { 8 } else { 1 };
        dev.launch(
            "copy_cols_bf16",
            cfg(rows * cols / per_thread),
            KernelArgs::new()
                .buf(dst)
                .buf(src)
                .i64(rows as i64)
                .i32(cols as i32)
                .i32(dst_cols.ld as i32)
                .i32(dst_cols.off as i32)
                .i32(src_cols.ld as i32)
                .i32(src_cols.off as i32),
        )
    }

    /// Image `[B, C, H, W]` ↔ tokens `[B, (H/p)·(W/p), C·p·p]` (see `flat::token_index`).
    pub fn patchify(
        dev: &KernelDevice,
        out: &DevBuf<bf16>,
        input: &DevBuf<bf16>,
        (b, c, h, w): (usize, usize, usize, usize),
        p: usize,
        channel_last: bool,
        to_tokens: bool,
    ) -> KernelResult<()> {
        let n = b * c * h * w;
        if p == 0 || h % p != 0 || w % p != 0 || out.len() != n || input.len() != n {
            return Err(invalid(format!(
                "patchify: [{b}, {c}, {h}, {w}] by {p} with buffers of {} and {}",
                out.len(),
                input.len()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        dev.launch(
            "patchify_bf16",
            cfg(n),
            KernelArgs::new()
                .buf(out)
                .buf(input)
                .i32(b as i32)
                .i32(c as i32)
                .i32(h as i32)
                .i32(w as i32)
                .i32(p as i32)
                .i32(channel_last as i32)
                .i32(to_tokens as i32),
        )
    }

    /// The crop of a `P×P×D` position table added to (or, for the gradient, summed from)
    /// `[B, gh·gw, D]` tokens.
    #[derive(Clone, Copy, Debug)]
    pub struct PosCrop {
        pub b: usize,
        pub gh: usize,
        pub gw: usize,
        pub d: usize,
        pub p: usize,
        pub top: usize,
        pub left: usize,
    }

    impl PosCrop {
        fn check(&self, tokens: usize, table: usize) -> KernelResult<()> {
            let ok = self.top + self.gh <= self.p
                && self.left + self.gw <= self.p
                && tokens == self.b * self.gh * self.gw * self.d
                && table >= self.p * self.p * self.d;
            if !ok {
                return Err(invalid(format!(
                    "position crop {self:?} with {tokens} token and {table} table elements"
                )));
            }
            Ok(())
        }
        fn args(&self, a: KernelArgs) -> KernelArgs {
            a.i32(self.b as i32)
                .i32(self.gh as i32)
                .i32(self.gw as i32)
                .i32(self.d as i32)
                .i32(self.p as i32)
                .i32(self.top as i32)
                .i32(self.left as i32)
        }
    }

    /// `tokens += table[crop]` in place.
    pub fn add_pos_embed(
        dev: &KernelDevice,
        tokens: &DevBuf<bf16>,
        table: &DevBuf<bf16>,
        crop: PosCrop,
    ) -> KernelResult<()> {
        crop.check(tokens.len(), table.len())?;
        if tokens.is_empty() {
            return Ok(());
        }
        dev.launch(
            "add_pos_embed",
            cfg(tokens.len()),
            crop.args(KernelArgs::new().buf(tokens).buf(table)),
        )
    }

    /// `g_table[crop] += Σ_b dtokens[b]` (f32 gradient of the table).
    pub fn pos_embed_grad(
        dev: &KernelDevice,
        g_table: &DevBuf<f32>,
        dtokens: &DevBuf<bf16>,
        crop: PosCrop,
    ) -> KernelResult<()> {
        crop.check(dtokens.len(), g_table.len())?;
        if dtokens.is_empty() {
            return Ok(());
        }
        dev.launch(
            "pos_embed_grad",
            cfg(crop.gh * crop.gw * crop.d),
            crop.args(KernelArgs::new().buf(g_table).buf(dtokens)),
        )
    }

    fn same_len(a: usize, b: usize, what: &str) -> KernelResult<()> {
        if a != b {
            return Err(invalid(format!("{what}: buffers of {a} and {b} elements")));
        }
        Ok(())
    }

    /// `y = a + b` (`y` may be `a`: the launch passes pointers, and each element is read before
    /// it is written by the same thread).
    pub fn add(
        dev: &KernelDevice,
        y: &DevBuf<bf16>,
        a: &DevBuf<bf16>,
        b: &DevBuf<bf16>,
    ) -> KernelResult<()> {
        same_len(y.len(), a.len(), "add_bf16")?;
        same_len(a.len(), b.len(), "add_bf16")?;
        if y.is_empty() {
            return Ok(());
        }
        dev.launch(
            "add_bf16",
            cfg(y.len()),
            KernelArgs::new().buf(y).buf(a).buf(b).i64(y.len() as i64),
        )
    }

    /// `g += x` for a bf16 `x` into f32 `g` (gradients into the f32 gradient buffer).
    pub fn accumulate_bf16(
        dev: &KernelDevice,
        g: &DevBuf<f32>,
        x: &DevBuf<bf16>,
    ) -> KernelResult<()> {
        same_len(g.len(), x.len(), "accumulate_f32_bf16")?;
        if g.is_empty() {
            return Ok(());
        }
        dev.launch(
            "accumulate_f32_bf16",
            cfg(g.len()),
            KernelArgs::new().buf(g).buf(x).i64(g.len() as i64),
        )
    }

    /// A modulation's gradient `dst [rows, n·d]` (bf16) from its `n ≤ 9` chunks' f32 gradients
    /// `[rows, d]`: chunk `j` into columns `j·d..(j+1)·d`, zeros for a chunk without one. One
    /// launch (`gather_chunks_bf16`).
    pub fn gather_chunks_bf16(
        dev: &KernelDevice,
        dst: &DevBuf<bf16>,
        (rows, d): (usize, usize),
        chunks: &[Option<&DevBuf<f32>>],
    ) -> KernelResult<()> {
        let n = chunks.len();
        let sizes_ok = chunks.iter().flatten().all(|c| c.len() == rows * d);
        if n == 0 || n > 9 || dst.len() != rows * n * d || !sizes_ok {
            return Err(invalid(format!(
                "gather_chunks: {n} chunks of [{rows}, {d}] (at most 9, each {} elements) into {}",
                rows * d,
                dst.len()
            )));
        }
        if dst.is_empty() {
            return Ok(());
        }
        let mut args = KernelArgs::new()
            .buf(dst)
            .i64(rows as i64)
            .i32(d as i32)
            .i32(n as i32);
        for j in 0..9 {
            args = match chunks.get(j).copied().flatten() {
                Some(c) => args.buf(c),
                None => args.null(),
            };
        }
        dev.launch("gather_chunks_bf16", cfg(dst.len()), args)
    }

    /// `out = a + x` (x bf16, `out` may be `a` itself) and, with `out16`, its bf16 rounding: the
    /// residual stream's gradient in one pass (a copy, an accumulation and a cast before).
    pub fn residual_grad_add(
        dev: &KernelDevice,
        out: &DevBuf<f32>,
        out16: Option<&DevBuf<bf16>>,
        a: &DevBuf<f32>,
        x: &DevBuf<bf16>,
    ) -> KernelResult<()> {
        same_len(out.len(), a.len(), "residual_grad_add")?;
        same_len(out.len(), x.len(), "residual_grad_add")?;
        if let Some(o) = out16 {
            same_len(out.len(), o.len(), "residual_grad_add")?;
        }
        let n = out.len();
        if n == 0 {
            return Ok(());
        }
        let args = KernelArgs::new().buf(out);
        let args = match out16 {
            Some(o) => args.buf(o),
            None => args.null(),
        };
        let work = if n % 8 == 0 { n / 8 } else { n };
        dev.launch(
            "residual_grad_add",
            cfg(work),
            args.buf(a).buf(x).i64(n as i64),
        )
    }

    /// `g += x`, both f32.
    pub fn accumulate_f32(
        dev: &KernelDevice,
        g: &DevBuf<f32>,
        x: &DevBuf<f32>,
    ) -> KernelResult<()> {
        same_len(g.len(), x.len(), "accumulate_f32")?;
        if g.is_empty() {
            return Ok(());
        }
        dev.launch(
            "accumulate_f32",
            cfg(g.len()),
            KernelArgs::new().buf(g).buf(x).i64(g.len() as i64),
        )
    }

    /// `dst = src[idx[slot]·L .. (idx[slot] + 1)·L]` (L = `dst.len()`): one block of a stack of
    /// `src.len() / L`, chosen by an index the host staged in device memory — so a replayed graph
    /// picks the block of its replay. The index must be below the block count (checked where it
    /// is staged; the kernel trusts it).
    pub fn select_block_f32(
        dev: &KernelDevice,
        dst: &DevBuf<f32>,
        src: &DevBuf<f32>,
        idx: &DevBuf<i32>,
        slot: usize,
    ) -> KernelResult<()> {
        let len = dst.len();
        if len == 0 || src.len() % len != 0 || slot >= idx.len() {
            return Err(invalid(format!(
                "select_block_f32: a block of {len} from {} elements, index slot {slot} of {}",
                src.len(),
                idx.len()
            )));
        }
        dev.launch(
            "select_block_f32",
            cfg(len),
            KernelArgs::new()
                .buf(dst)
                .buf(src)
                .buf(idx)
                .i32(slot as i32)
                .i64(len as i64),
        )
    }
}
