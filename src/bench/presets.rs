//! The models the benchmarks run: the three published SD3-family configurations (MMDIT.md A.1)
//! and the committed Shapes teacher's, each with the input sizes a benchmark feeds it, built with
//! fresh random weights through `mmdit::init`. `benches/mmdit.rs` builds its models here too.

use super::flops::CallShape;
use crate::autograd::Var;
use crate::device::host_memory::Footprint;
use crate::error::{Error, Result};
use crate::mmdit::init::init_params;
use crate::mmdit::{Mmdit, MmditConfig};
use crate::tensor::{Rng, Tensor};
use crate::train::shapes_model::ShapesModel;
use std::path::Path;

/// SD3's VAE downsamples 8× (a 512 px image is a 64×64 latent).
pub const SD3_VAE_FACTOR: usize = 8;
/// SD3's latent channels.
pub const SD3_LATENT_CHANNELS: usize = 16;
/// Context tokens of the SD3 presets: 77 CLIP + 256 T5 tokens, diffusers' default
/// `max_sequence_length` (MMDIT.md A.5).
pub const SD3_TEXT_TOKENS: usize = 77 + 256;

/// A model configuration to benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    Sd35Medium,
    Sd35Large,
    Sd3Medium,
    /// The committed Shapes teacher's configuration (read from its folder).
    Shapes,
}

impl Preset {
    pub const ALL: [Preset; 4] = [
        Preset::Sd35Medium,
        Preset::Sd35Large,
        Preset::Sd3Medium,
        Preset::Shapes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Sd35Medium => "sd3.5-medium",
            Preset::Sd35Large => "sd3.5-large",
            Preset::Sd3Medium => "sd3-medium",
            Preset::Shapes => "shapes",
        }
    }

    /// The published configuration (MMDIT.md A.1) of an SD3 preset; `None` for `shapes`, whose
    /// configuration lives in the teacher's folder.
    pub fn sd3_config(self) -> Option<MmditConfig> {
        let (depth, hidden, qk_norm, dual, pos) = match self {
            Preset::Sd35Medium => (24, 1536, true, (0..=12).collect(), 384),
            Preset::Sd35Large => (38, 2432, true, Vec::new(), 192),
            Preset::Sd3Medium => (24, 1536, false, Vec::new(), 192),
            Preset::Shapes => return None,
        };
        // hidden = 64·depth, heads = depth (MMDIT.md A.1).
        Some(MmditConfig {
            depth,
            hidden,
            heads: hidden / 64,
            head_dim: 64,
            patch: 2,
            in_channels: SD3_LATENT_CHANNELS,
            out_channels: SD3_LATENT_CHANNELS,
            pos_embed_max_size: pos,
            context_dim: 4096,
            pooled_dim: 2048,
            freq_dim: 256,
            mlp_hidden: 4 * hidden,
            qk_norm,
            dual_attention_blocks: dual,
        })
    }
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Preset, String> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
                format!("unknown model `{s}` (expected one of {})", names.join(", "))
            })
    }
}

/// A configuration together with the input a benchmark feeds it.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    pub preset: Preset,
    pub config: MmditConfig,
    /// Side of the square input the MMDiT sees (latent for SD3, pixels for Shapes).
    pub input_side: usize,
    /// Side of the image it stands for (`--res`).
    pub resolution: usize,
    pub text_tokens: usize,
}

impl ModelSpec {
    /// The spec of `preset` at `resolution` px (`None`: 512 for SD3, the teacher's 16 for Shapes).
    /// The Shapes configuration comes from the teacher folder `teacher`.
    pub fn new(preset: Preset, resolution: Option<usize>, teacher: &Path) -> Result<ModelSpec> {
        match preset.sd3_config() {
            Some(config) => {
                let resolution = resolution.unwrap_or(512);
                let spec = ModelSpec {
                    preset,
                    config,
                    input_side: resolution / SD3_VAE_FACTOR,
                    resolution,
                    text_tokens: SD3_TEXT_TOKENS,
                };
                spec.check_resolution(SD3_VAE_FACTOR)?;
                Ok(spec)
            }
            None => {
                let teacher_model = ShapesModel::load(teacher)?;
                ModelSpec::shapes(&teacher_model, resolution)
            }
        }
    }

    /// The spec of a loaded Shapes model (pixel space: the input is the image itself).
    pub fn shapes(model: &ShapesModel, resolution: Option<usize>) -> Result<ModelSpec> {
        let resolution = resolution.unwrap_or(crate::train::shapes_model::RESOLUTION);
        let spec = ModelSpec {
            preset: Preset::Shapes,
            config: model.mmdit.config.clone(),
            input_side: resolution,
            resolution,
            text_tokens: model.text.config.max_len,
        };
        spec.check_resolution(1)?;
        Ok(spec)
    }

    /// The resolution maps onto a whole patch grid that the position embedding covers.
    fn check_resolution(&self, factor: usize) -> Result<()> {
        let (p, grid_max) = (self.config.patch, self.config.pos_embed_max_size);
        let unit = factor * p;
        let max = grid_max * unit;
        if self.resolution == 0 || self.resolution % unit != 0 || self.resolution > max {
            return Err(Error::Invalid(format!(
                "--res {}: {} takes a multiple of {unit} px up to {max} px (patch {p}, {grid_max}×{grid_max} position grid)",
                self.resolution,
                self.preset.name()
            )));
        }
        Ok(())
    }

    pub fn image_tokens(&self) -> usize {
        (self.input_side / self.config.patch).pow(2)
    }

    pub fn call_shape(&self, batch: usize) -> CallShape {
        CallShape {
            batch,
            image_tokens: self.image_tokens(),
            text_tokens: self.text_tokens,
        }
    }

    pub fn weight_bytes(&self) -> u64 {
        4 * self.config.param_count() as u64
    }

    /// Tokens of one sample, both streams.
    pub fn tokens(&self) -> usize {
        self.image_tokens() + self.text_tokens
    }

    /// The least host memory a CPU run on `batch` samples allocates: the f32 weights, with a
    /// `backward` their gradients, and the activations' floor.
    pub fn cpu_footprint(&self, batch: usize, backward: bool) -> Footprint {
        let weights = self.weight_bytes();
        let activations =
            self.config
                .activation_floor_bytes(batch as u64, self.tokens() as u64, backward);
        Footprint::new()
            .with("f32 weights", weights)
            .with("their gradients", if backward { weights } else { 0 })
            .with("activations", activations)
    }

    /// On the emulator the device's buffers are host memory too: the host's f32 model and its
    /// upload at `device_bytes_per_param` (`DeviceParams::*_BYTES_PER_PARAM`).
    pub fn emulated_footprint(&self, device_bytes_per_param: u64) -> Footprint {
        let p = self.config.param_count() as u64;
        Footprint::new()
            .with("f32 weights on the host", self.weight_bytes())
            .with(
                "their upload to the emulated device",
                p.saturating_mul(device_bytes_per_param),
            )
    }

    /// The MMDiT with fresh random weights (`mmdit::init`: Xavier linears, adaLN-Zero).
    pub fn random_model(&self, seed: u64) -> Mmdit {
        random_mmdit(&self.config, seed)
    }

    /// Random inputs for `batch` samples.
    pub fn random_inputs(&self, batch: usize, seed: u64) -> RandomInputs {
        let mut rng = Rng::new(seed);
        let c = &self.config;
        let side = self.input_side;
        RandomInputs {
            x: Tensor::randn(&[batch, c.in_channels, side, side], &mut rng),
            context: Tensor::randn(&[batch, self.text_tokens, c.context_dim], &mut rng),
            pooled: Tensor::randn(&[batch, c.pooled_dim], &mut rng),
            // Spread over the schedule so no timestep is special.
            timestep: (0..batch)
                .map(|i| 1000.0 * (i as f32 + 0.5) / batch as f32)
                .collect(),
        }
    }
}

pub const GIB: f64 = (1u64 << 30) as f64;

/// An MMDiT of any configuration with fresh random weights.
pub fn random_mmdit(config: &MmditConfig, seed: u64) -> Mmdit {
    let mut rng = Rng::new(seed);
    Mmdit::new(config.clone(), init_params(config, &mut rng))
}

/// One batch of random MMDiT inputs (as tensors, so each run wraps them in fresh `Var`s).
pub struct RandomInputs {
    pub x: Tensor,
    pub context: Tensor,
    pub pooled: Tensor,
    pub timestep: Vec<f32>,
}

impl RandomInputs {
    /// `(x, context, pooled)` as autograd leaves; `x` takes a gradient when `grad_x`.
    pub fn vars(&self, grad_x: bool) -> (Var, Var, Var) {
        let x = if grad_x {
            Var::input(self.x.clone())
        } else {
            Var::constant(self.x.clone())
        };
        (
            x,
            Var::constant(self.context.clone()),
            Var::constant(self.pooled.clone()),
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An SD3.5-medium-shaped spec at toy size: QK norm, a dual-attention block, 16 latent
    /// channels, an 8×8 latent (64 px) and 5 text tokens.
    pub(crate) fn tiny_sd3_spec() -> ModelSpec {
        let mut config = Preset::Sd35Medium.sd3_config().expect("an SD3 preset");
        config.depth = 2;
        config.hidden = 32;
        config.heads = 2;
        config.head_dim = 16;
        config.mlp_hidden = 64;
        config.context_dim = 24;
        config.pooled_dim = 12;
        config.freq_dim = 16;
        config.pos_embed_max_size = 8;
        config.dual_attention_blocks = vec![0];
        ModelSpec {
            preset: Preset::Sd35Medium,
            config,
            input_side: 8,
            resolution: 64,
            text_tokens: 5,
        }
    }

    #[test]
    fn sd3_presets_have_the_published_shapes() {
        let m = Preset::Sd35Medium.sd3_config().unwrap();
        assert_eq!((m.depth, m.hidden, m.heads, m.head_dim), (24, 1536, 24, 64));
        assert_eq!(m.dual_attention_blocks, (0..=12).collect::<Vec<_>>());
        assert_eq!(m.family(), "SD3.5-medium (MMDiT-X)");
        assert_eq!(
            Preset::Sd35Large.sd3_config().unwrap().family(),
            "SD3.5-large"
        );
        assert_eq!(
            Preset::Sd3Medium.sd3_config().unwrap().family(),
            "SD3-medium"
        );
        for p in Preset::ALL {
            assert_eq!(p.name().parse::<Preset>(), Ok(p));
        }
    }

    #[test]
    fn resolutions_map_to_latent_tokens() {
        let teacher = Path::new("/nonexistent");
        let s = ModelSpec::new(Preset::Sd35Large, Some(1024), teacher).unwrap();
        assert_eq!((s.input_side, s.image_tokens()), (128, 4096));
        assert!(ModelSpec::new(Preset::Sd3Medium, Some(8), teacher).is_err());
        assert!(ModelSpec::new(Preset::Sd3Medium, Some(192 * 16 + 16), teacher).is_err());
    }
}
