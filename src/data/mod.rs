//! Training data: the procedural Shapes world (design/TOY.md: prompts, scene sampling, the
//! renderer and dataset folders) and the precomputed latents and prompt embeddings of a real
//! checkpoint's distillation (`latents`).

pub mod latents;
pub mod shapes;

pub use shapes::{
    all_prompts, render, render_u8, sample_batch, sample_scene, scene_for_prompt, vocabulary,
    write_dataset, Color, Item, Object, Prompt, Relation, Scene, ShapeKind, Side, Task, CANVAS,
};
