//! Differentiable primitives. Each op computes its forward with the kernels and records its
//! backward on the tape (ARCHITECTURE.md rule 2: no op without a backward). Ops are methods on
//! [`Var`](crate::autograd::Var) or free functions when they take several operands.

pub mod attention;
pub mod conv;
pub mod disc_head;
pub mod elementwise;
pub mod linear;
pub mod norm;
pub mod reduce;
pub mod shape;

pub use attention::joint_attention;
pub use conv::{conv2d, Conv2dSpec};
pub use disc_head::{group_norm, mean_pool_spatial};
pub use elementwise::Activation;
pub use linear::{linear, matmul};
pub use shape::{concat, PatchOrder};
