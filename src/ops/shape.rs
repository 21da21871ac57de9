//! Layout ops: reshape, permute, split, concat, and patchify/unpatchify for the MMDiT.

use crate::autograd::{record, record_multi, Var};
use crate::kernels::shape as k;
use crate::tensor::Tensor;

impl Var {
    /// Same data, new shape (`usize::MAX` infers one dimension).
    pub fn reshape(&self, shape: &[usize]) -> Var {
        let old = self.shape().to_vec();
        record(
            "reshape",
            &[self],
            self.value().reshape(shape),
            move |g, _| vec![Some(g.reshape(&old))],
        )
    }

    /// Output dim `i` is input dim `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> Var {
        let inv = k::inverse_permutation(perm);
        record(
            "permute",
            &[self],
            k::permute(self.value(), perm),
            move |g, _| vec![Some(k::permute(g, &inv))],
        )
    }

    /// Splits along `dim` into pieces of the given sizes.
    pub fn split(&self, dim: isize, sizes: &[usize]) -> Vec<Var> {
        let d = self.value().axis(dim);
        let parts = k::split(self.value(), d, sizes);
        record_multi("split", &[self], parts, move |g, _| {
            let refs: Vec<&Tensor> = g.iter().collect();
            vec![Some(k::concat(&refs, d))]
        })
    }

    /// Splits along `dim` into `n` equal chunks (`chunk` in PyTorch).
    pub fn chunk(&self, n: usize, dim: isize) -> Vec<Var> {
        let size = self.value().dim(dim);
        assert!(
            n > 0 && size % n == 0,
            "chunk: {size} is not divisible by {n}"
        );
        self.split(dim, &vec![size / n; n])
    }

    /// Splits a `[B, C, H, W]` image into `p×p` patches: `[B, (H/p)(W/p), C·p·p]`, tokens in
    /// row-major (h, w) order. `order` says how each patch's values are laid out.
    pub fn patchify(&self, p: usize, order: PatchOrder) -> Var {
        let &[b, c, h, w] = self.shape() else {
            panic!("patchify needs [B, C, H, W], got {:?}", self.shape())
        };
        assert!(
            h % p == 0 && w % p == 0,
            "patchify: {h}x{w} is not a multiple of {p}"
        );
        let (gh, gw) = (h / p, w / p);
        // [B, C, gh, p, gw, p]: dims b=0 c=1 gh=2 ph=3 gw=4 pw=5
        let perm: &[usize] = match order {
            PatchOrder::ChannelFirst => &[0, 2, 4, 1, 3, 5],
            PatchOrder::ChannelLast => &[0, 2, 4, 3, 5, 1],
        };
        self.reshape(&[b, c, gh, p, gw, p])
            .permute(perm)
            .reshape(&[b, gh * gw, c * p * p])
    }

    /// The inverse of [`Var::patchify`]: `[B, gh·gw, C·p·p]` back to `[B, C, gh·p, gw·p]`.
    pub fn unpatchify(&self, p: usize, gh: usize, gw: usize, order: PatchOrder) -> Var {
        let &[b, n, f] = self.shape() else {
            panic!(
                "unpatchify needs [B, tokens, features], got {:?}",
                self.shape()
            )
        };
        assert_eq!(n, gh * gw, "unpatchify: {n} tokens for a {gh}x{gw} grid");
        assert_eq!(f % (p * p), 0, "unpatchify: {f} features for patch {p}");
        let c = f / (p * p);
        let (split, perm): (Vec<usize>, &[usize]) = match order {
            // [B, gh, gw, C, p, p] → [B, C, gh, p, gw, p]
            PatchOrder::ChannelFirst => (vec![b, gh, gw, c, p, p], &[0, 3, 1, 4, 2, 5]),
            // [B, gh, gw, p, p, C] → [B, C, gh, p, gw, p]  (SD3's nhwpqc → nchpwq)
            PatchOrder::ChannelLast => (vec![b, gh, gw, p, p, c], &[0, 5, 1, 3, 2, 4]),
        };
        self.reshape(&split)
            .permute(perm)
            .reshape(&[b, c, gh * p, gw * p])
    }
}

/// How a patch's `C·p·p` values are ordered (MMDIT.md A.2: the patch embedding reads (c, kh, kw),
/// the final layer writes (p, q, c)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchOrder {
    /// (c, kh, kw): the im2col order of a `[D, C, p, p]` conv weight.
    ChannelFirst,
    /// (kh, kw, c): SD3's unpatchify order.
    ChannelLast,
}

/// Concatenates along `dim` (negative counts from the end).
pub fn concat(xs: &[&Var], dim: isize) -> Var {
    assert!(!xs.is_empty(), "concat of nothing");
    let d = xs[0].value().axis(dim);
    let values: Vec<&Tensor> = xs.iter().map(|x| x.value()).collect();
    let sizes: Vec<usize> = xs.iter().map(|x| x.shape()[d]).collect();
    record("concat", xs, k::concat(&values, d), move |g, need| {
        k::split(g, d, &sizes)
            .into_iter()
            .zip(need)
            .map(|(g, &n)| n.then_some(g))
            .collect()
    })
}
