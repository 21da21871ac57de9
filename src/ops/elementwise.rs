//! Broadcasting arithmetic, scaling and the pointwise activations.

use crate::autograd::{record, Var};
pub use crate::kernels::elementwise::Activation;
use crate::kernels::elementwise::{
    self as k, activation_bwd, activation_fwd, binary, sum_to_shape,
};
use crate::tensor::Tensor;

impl Var {
    /// `self + other`, broadcasting.
    pub fn add(&self, other: &Var) -> Var {
        let (sa, sb) = (self.shape().to_vec(), other.shape().to_vec());
        record(
            "add",
            &[self, other],
            k::add(self.value(), other.value()),
            move |g, need| {
                vec![
                    need[0].then(|| sum_to_shape(g, &sa)),
                    need[1].then(|| sum_to_shape(g, &sb)),
                ]
            },
        )
    }

    /// `self − other`, broadcasting.
    pub fn sub(&self, other: &Var) -> Var {
        let (sa, sb) = (self.shape().to_vec(), other.shape().to_vec());
        let out = binary(self.value(), other.value(), |x, y| x - y);
        record("sub", &[self, other], out, move |g, need| {
            vec![
                need[0].then(|| sum_to_shape(g, &sa)),
                need[1].then(|| sum_to_shape(&g.map(|v| -v), &sb)),
            ]
        })
    }

    /// `self · other` elementwise, broadcasting.
    pub fn mul(&self, other: &Var) -> Var {
        let (a, b) = (self.value().clone(), other.value().clone());
        let out = binary(&a, &b, |x, y| x * y);
        record("mul", &[self, other], out, move |g, need| {
            vec![
                need[0].then(|| sum_to_shape(&binary(g, &b, |g, y| g * y), a.shape())),
                need[1].then(|| sum_to_shape(&binary(g, &a, |g, x| g * x), b.shape())),
            ]
        })
    }

    /// `self · s` for a constant scalar.
    pub fn scale(&self, s: f32) -> Var {
        record(
            "scale",
            &[self],
            self.value().map(|v| v * s),
            move |g, _| vec![Some(g.map(|v| v * s))],
        )
    }

    /// `self + c` for a constant scalar.
    pub fn add_scalar(&self, c: f32) -> Var {
        record(
            "add_scalar",
            &[self],
            self.value().map(|v| v + c),
            |g, _| vec![Some(g.clone())],
        )
    }

    pub fn activation(&self, act: Activation) -> Var {
        let x = self.value().clone();
        record(
            "activation",
            &[self],
            activation_fwd(&x, act),
            move |g, _| vec![Some(activation_bwd(&x, g, act))],
        )
    }

    /// GELU with the tanh approximation.
    pub fn gelu(&self) -> Var {
        self.activation(Activation::GeluTanh)
    }

    pub fn silu(&self) -> Var {
        self.activation(Activation::Silu)
    }

    pub fn leaky_relu(&self, slope: f32) -> Var {
        self.activation(Activation::LeakyRelu(slope))
    }

    /// log(1 + eˣ).
    pub fn softplus(&self) -> Var {
        self.activation(Activation::Softplus)
    }

    /// log σ(x) = −softplus(−x).
    pub fn log_sigmoid(&self) -> Var {
        self.activation(Activation::LogSigmoid)
    }

    pub fn exp(&self) -> Var {
        self.activation(Activation::Exp)
    }
}

/// Sums a broadcast gradient back to a shape (re-exported for ops that broadcast internally).
pub fn reduce_to(g: &Tensor, shape: &[usize]) -> Tensor {
    sum_to_shape(g, shape)
}
