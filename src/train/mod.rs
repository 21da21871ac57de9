//! Training and sampling: the Shapes teacher's flow-matching pretraining, the AdvDMD step on the
//! CPU and on a kernel device, the distillation run, and sampling SD3-family checkpoints.

pub mod advdmd;
pub mod advdmd_device;
pub mod checkpoint_sample;
pub mod device;
pub mod disc_head;
pub mod distill;
pub mod losses;
pub mod pretrain;
pub mod rollout;
pub mod shapes_model;
pub mod state;
