//! The two checkpoint layouts and the mapping between them (MMDIT.md A.4). Inside the engine every
//! parameter has its original SD3 name (`joint_blocks.3.x_block.attn.qkv.weight`); the diffusers
//! names are a translation at the edge: fused qkv ↔ to_q/to_k/to_v, and the final layer's and the
//! last context block's (shift, scale) ↔ diffusers' (scale, shift).

/// Module-level name pairs inside joint block `i`: (original, diffusers).
const BLOCK_MODULES: &[(&str, &str)] = &[
    ("x_block.adaLN_modulation.1", "norm1.linear"),
    ("context_block.adaLN_modulation.1", "norm1_context.linear"),
    ("x_block.attn.proj", "attn.to_out.0"),
    ("x_block.attn.ln_q", "attn.norm_q"),
    ("x_block.attn.ln_k", "attn.norm_k"),
    ("x_block.attn2.proj", "attn2.to_out.0"),
    ("x_block.attn2.ln_q", "attn2.norm_q"),
    ("x_block.attn2.ln_k", "attn2.norm_k"),
    ("x_block.mlp.fc1", "ff.net.0.proj"),
    ("x_block.mlp.fc2", "ff.net.2"),
    ("context_block.attn.proj", "attn.to_add_out"),
    ("context_block.attn.ln_q", "attn.norm_added_q"),
    ("context_block.attn.ln_k", "attn.norm_added_k"),
    ("context_block.mlp.fc1", "ff_context.net.0.proj"),
    ("context_block.mlp.fc2", "ff_context.net.2"),
];

/// Fused qkv modules inside joint block `i`: (original, diffusers q, k, v).
const BLOCK_QKV: &[(&str, [&str; 3])] = &[
    ("x_block.attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
    (
        "x_block.attn2.qkv",
        ["attn2.to_q", "attn2.to_k", "attn2.to_v"],
    ),
    (
        "context_block.attn.qkv",
        ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    ),
];

/// Top-level module pairs: (original, diffusers).
const TOP_MODULES: &[(&str, &str)] = &[
    ("x_embedder.proj", "pos_embed.proj"),
    (
        "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_1",
    ),
    (
        "t_embedder.mlp.2",
        "time_text_embed.timestep_embedder.linear_2",
    ),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("context_embedder", "context_embedder"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear"),
    ("final_layer.linear", "proj_out"),
];

/// How a diffusers tensor relates to an original one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// The same tensor.
    Whole,
    /// Rows `i·n/3 .. (i+1)·n/3` of a fused qkv tensor (i = 0, 1, 2 for q, k, v).
    QkvChunk(usize),
    /// The two halves (along dim 0) exchanged: (shift, scale) ↔ (scale, shift).
    SwappedHalves,
}

fn split_param(name: &str) -> Option<(&str, &str)> {
    let (module, leaf) = name.rsplit_once('.')?;
    matches!(leaf, "weight" | "bias").then_some((module, leaf))
}

/// The diffusers tensors an original parameter becomes, in order (three for a fused qkv).
/// `depth` tells which block is last (its context modulation is swapped). `None` for a name
/// that is not an MMDiT parameter.
pub fn original_to_diffusers(name: &str, depth: usize) -> Option<Vec<(String, Part)>> {
    if name == "pos_embed" {
        return Some(vec![("pos_embed.pos_embed".into(), Part::Whole)]);
    }
    let (module, leaf) = split_param(name)?;
    if let Some(&(_, d)) = TOP_MODULES.iter().find(|(o, _)| *o == module) {
        let part = if module == "final_layer.adaLN_modulation.1" {
            Part::SwappedHalves
        } else {
            Part::Whole
        };
        return Some(vec![(format!("{d}.{leaf}"), part)]);
    }
    let rest = module.strip_prefix("joint_blocks.")?;
    let (idx, inner) = rest.split_once('.')?;
    let i: usize = idx.parse().ok()?;
    if let Some((_, qkv)) = BLOCK_QKV.iter().find(|(o, _)| *o == inner) {
        return Some(
            qkv.iter()
                .enumerate()
                .map(|(c, d)| {
                    (
                        format!("transformer_blocks.{i}.{d}.{leaf}"),
                        Part::QkvChunk(c),
                    )
                })
                .collect(),
        );
    }
    let &(_, d) = BLOCK_MODULES.iter().find(|(o, _)| *o == inner)?;
    let part = if inner == "context_block.adaLN_modulation.1" && i + 1 == depth {
        Part::SwappedHalves
    } else {
        Part::Whole
    };
    Some(vec![(format!("transformer_blocks.{i}.{d}.{leaf}"), part)])
}

/// The original parameter a diffusers tensor belongs to, and how. `None` for a name that is not
/// an MMDiT parameter.
pub fn diffusers_to_original(name: &str, depth: usize) -> Option<(String, Part)> {
    if name == "pos_embed.pos_embed" {
        return Some(("pos_embed".into(), Part::Whole));
    }
    let (module, leaf) = split_param(name)?;
    if let Some(&(o, _)) = TOP_MODULES.iter().find(|(_, d)| *d == module) {
        let part = if o == "final_layer.adaLN_modulation.1" {
            Part::SwappedHalves
        } else {
            Part::Whole
        };
        return Some((format!("{o}.{leaf}"), part));
    }
    let rest = module.strip_prefix("transformer_blocks.")?;
    let (idx, inner) = rest.split_once('.')?;
    let i: usize = idx.parse().ok()?;
    for (o, qkv) in BLOCK_QKV {
        if let Some(c) = qkv.iter().position(|d| *d == inner) {
            return Some((format!("joint_blocks.{i}.{o}.{leaf}"), Part::QkvChunk(c)));
        }
    }
    let &(o, _) = BLOCK_MODULES.iter().find(|(_, d)| *d == inner)?;
    let part = if o == "context_block.adaLN_modulation.1" && i + 1 == depth {
        Part::SwappedHalves
    } else {
        Part::Whole
    };
    Some((format!("joint_blocks.{i}.{o}.{leaf}"), part))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_round_trips_on_every_kind_of_name() {
        let names = [
            "pos_embed",
            "x_embedder.proj.weight",
            "t_embedder.mlp.2.bias",
            "final_layer.adaLN_modulation.1.weight",
            "joint_blocks.0.x_block.attn.qkv.weight",
            "joint_blocks.0.x_block.attn2.ln_q.weight",
            "joint_blocks.2.context_block.adaLN_modulation.1.bias",
            "joint_blocks.1.context_block.mlp.fc2.weight",
        ];
        for n in names {
            let ds = original_to_diffusers(n, 3).unwrap();
            for (d, part) in &ds {
                assert_eq!(
                    diffusers_to_original(d, 3),
                    Some((n.to_string(), part.clone())),
                    "{n} ↔ {d}"
                );
            }
        }
        assert_eq!(
            original_to_diffusers("joint_blocks.2.context_block.adaLN_modulation.1.bias", 3)
                .unwrap()[0]
                .1,
            Part::SwappedHalves
        );
        assert_eq!(
            original_to_diffusers("joint_blocks.1.context_block.adaLN_modulation.1.bias", 3)
                .unwrap()[0]
                .1,
            Part::Whole
        );
        assert!(diffusers_to_original("text_encoders.clip_l.foo.weight", 3).is_none());
    }
}
