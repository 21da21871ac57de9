//! advdmd: few-step AdvDMD distillation of MMDiT diffusion transformers.
//!
//! Layers, bottom up (design/ARCHITECTURE.md): `tensor` and `device` → `kernels` (CPU reference,
//! later GPU launchers) → `ops` (differentiable primitives) → `autograd` (tape, backward) → the
//! model and trainer layers that later issues add. `checkpoint` reads and writes safetensors.

pub mod autograd;
pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod flow;
pub mod info;
pub mod kernels;
pub mod mmdit;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod tensor;
pub mod text;
pub mod train;

pub use autograd::{backward, no_grad, Param, Var};
pub use device::Device;
pub use error::{Error, Result};
pub use tensor::{DType, Rng, Tensor};
