//! Kernel families. Each file holds the CPU reference of one family (f32, rayon-parallel); the
//! GPU launchers for the same family join it once the CUDA layer exists, and a test compares the
//! two (ARCHITECTURE.md rule 3). Kernels work on tensors and slices and know nothing of autograd
//! or transformers.

pub mod adaln;
pub mod attention;
pub mod conv;
pub mod disc_head;
pub mod elementwise;
pub mod gemm;
pub mod optim;
pub mod qknorm;
pub mod rl;
pub mod sde;
pub mod shape;

/// Work below this many multiply-adds runs on the calling thread: rayon's overhead would
/// dominate, and kernels called from inside a parallel loop must not nest parallelism needlessly.
pub const PARALLEL_MIN_WORK: usize = 1 << 15;
