//! Training loops: the Shapes teacher's flow-matching pretraining (here), the AdvDMD step (later).

pub mod advdmd;
pub mod advdmd_device;
pub mod device;
pub mod disc_head;
pub mod distill;
pub mod losses;
pub mod pretrain;
pub mod rollout;
pub mod shapes_model;
pub mod state;
