//! The MMDiT of SD3 / SD3.5 (MMDIT.md §A): configuration detected from the weights, the forward
//! pass on the ops (its backward comes from the tape), and checkpoint IO in both layouts.

pub mod checkpoint;
pub mod config;
pub mod device;
pub mod init;
pub mod layout;
pub mod model;

pub use checkpoint::{save_mmdit, save_mmdit_sized, Layout, MmditCheckpoint, ParamSource};
pub use config::MmditConfig;
pub use model::{Mmdit, MmditInputs, MmditOutput};
