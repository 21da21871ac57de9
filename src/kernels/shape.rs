//! Layout kernels: permute, concatenation and splitting along a dimension. Tensors are contiguous
//! row-major, so every layout change is an explicit copy made here.

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
