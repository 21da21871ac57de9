//! Reductions and the mean-squared error.

use crate::autograd::{record, Var};
use crate::tensor::Tensor;

impl Var {
    /// Sum of all elements (a scalar, shape `[]`).
    pub fn sum(&self) -> Var {
        let shape = self.shape().to_vec();
        let s = self.value().f32s().iter().map(|&v| v as f64).sum::<f64>() as f32;
        record("sum", &[self], Tensor::scalar(s), move |g, _| {
            vec![Some(Tensor::full(&shape, g.item()))]
        })
    }

    /// Mean of all elements (a scalar).
    pub fn mean(&self) -> Var {
        let n = self.value().numel().max(1) as f32;
        self.sum().scale(1.0 / n)
    }

    /// Sum over dimension `dim` (negative counts from the end), which is kept with size 1 when
    /// `keepdim`.
    pub fn sum_dim(&self, dim: isize, keepdim: bool) -> Var {
        let x = self.value();
        let d = x.axis(dim);
        let shape = x.shape().to_vec();
        let outer: usize = shape[..d].iter().product();
        let (n, inner) = (shape[d], shape[d + 1..].iter().product::<usize>());
        let src = x.f32s();
        let mut out = vec![0f32; outer * inner];
        for o in 0..outer {
            for i in 0..n {
                let row = &src[(o * n + i) * inner..(o * n + i + 1) * inner];
                for (acc, v) in out[o * inner..(o + 1) * inner].iter_mut().zip(row) {
                    *acc += v;
                }
            }
        }
        let mut kept = shape.clone();
        kept[d] = 1;
        let out_shape: Vec<usize> = if keepdim {
            kept.clone()
        } else {
            shape
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != d)
                .map(|(_, &s)| s)
                .collect()
        };
        record(
            "sum_dim",
            &[self],
            Tensor::from_vec(out, &out_shape),
            move |g, _| {
                let g = g.reshape(&kept);
                vec![Some(crate::kernels::elementwise::binary(
                    &Tensor::zeros(&shape),
                    &g,
                    |_, g| g,
                ))]
            },
        )
    }

    /// Mean over dimension `dim`.
    pub fn mean_dim(&self, dim: isize, keepdim: bool) -> Var {
        let n = self.value().dim(dim).max(1) as f32;
        self.sum_dim(dim, keepdim).scale(1.0 / n)
    }

    /// mean((self − target)²), a scalar.
    pub fn mse(&self, target: &Var) -> Var {
        assert_eq!(self.shape(), target.shape(), "mse: shapes differ");
        let (a, b) = (self.value().clone(), target.value().clone());
        let n = a.numel().max(1) as f64;
        let s = a
            .f32s()
            .iter()
            .zip(b.f32s())
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            / n;
        record(
            "mse",
            &[self, target],
            Tensor::scalar(s as f32),
            move |g, need| {
                let c = 2.0 * g.item() / n as f32;
                let d = crate::kernels::elementwise::binary(&a, &b, |x, y| c * (x - y));
                vec![need[0].then(|| d.clone()), need[1].then(|| d.map(|v| -v))]
            },
        )
    }
}
