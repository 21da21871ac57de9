//! The MMDiT on a kernel device — a CUDA GPU, or the SIMT emulator in CI (ARCHITECTURE.md
//! "Numbers and precision"): bf16 weights and activations, f32 master weights and f32 gradients,
//! GEMMs through `kernels::gemm::dev` (cuBLASLt on a GPU) and every other op through the
//! hand-written kernels' launchers.
//!
//! The backward is written out by hand, llm.c-style, rather than taped: the forward keeps exactly
//! what the backward reads in a [`Saved`] record, and the backward walks the blocks in reverse.
//! The CPU [`Mmdit`] stays the oracle (`tests/mmdit_device.rs` holds this model to it).
//!
//! Parameters live in `nn::device::DeviceParams` (flat f32 masters, bf16 copy, f32 gradients, one
//! aligned slot per tensor under the original SD3 names, as in the CPU model).

use half::bf16;

use super::config::MmditConfig;
use super::model::Mmdit;
use crate::device::kernel::{
    DevBuf, DevView, EpilogueKind, GemmSpec, KernelDevice, KernelError, KernelResult,
};
use crate::error::Result;
use crate::kernels::adaln::dev as adaln;
use crate::kernels::attention::dev::{self as attn, AttnDims};
use crate::kernels::elementwise::dev as ew;
use crate::kernels::elementwise::Activation;
use crate::kernels::gemm::dev::{
    gemm_bf16, gemm_bf16_acc_f32, gemm_bf16_dgelu, gemm_bf16_f32, EpilogueBufs, SmallProducts,
};
use crate::kernels::qknorm::dev as qknorm;
use crate::kernels::shape::dev::{self as layout, Cols, PosCrop};
use crate::nn::device::DeviceParams;
use crate::nn::timestep_features;
use crate::nn::ParamSource;
use crate::ops::norm::LN_EPS;
use crate::tensor::Tensor;

/// RMSNorm eps of SD3.5's QK norm (as the CPU model).
const QK_NORM_EPS: f32 = 1e-6;

/// The MMDiT's parameters on a device, and its forward and backward. It reads through to its
/// [`DeviceParams`] (`m.grads`, `m.zero_grad()`, ...).
pub struct DeviceMmdit {
    pub config: MmditConfig,
    pub dev: KernelDevice,
    pub params: DeviceParams,
}

impl std::ops::Deref for DeviceMmdit {
    type Target = DeviceParams;
    fn deref(&self) -> &DeviceParams {
        &self.params
    }
}

/// One batch of inputs on the device.
pub struct DeviceInputs {
    /// Latents `[B, C, H, W]`.
    pub x: DevBuf<bf16>,
    /// Sinusoidal timestep features `[B, freq_dim]`.
    pub t_features: DevBuf<bf16>,
    /// `[B, pooled_dim]`.
    pub pooled: DevBuf<bf16>,
    /// `[B, Lc, context_dim]`.
    pub context: DevBuf<bf16>,
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub context_len: usize,
}

/// Gradients of the inputs (bf16), shaped like them.
pub struct InputGrads {
    pub x: DevBuf<bf16>,
    pub pooled: DevBuf<bf16>,
    pub context: DevBuf<bf16>,
}

/// A LayerNorm-modulate's output with the statistics its backward reads.
struct Ln {
    y: DevBuf<bf16>,
    mean: DevBuf<f32>,
    rstd: DevBuf<f32>,
}

/// q, k, v of one attention (QK-normed when the model has QK norm) and what their backward reads.
///
/// With QK norm, q and k are normalised straight out of the fused projection `[rows, 3·H·d]`
/// (which is kept: it holds the norms' inputs), and at head dims 64 and 128 the attention reads V
/// in place there too — no column copies. Otherwise q, k, v are copied out and `fused` dropped.
struct Qkv {
    q: DevBuf<bf16>,
    k: DevBuf<bf16>,
    /// V as its own `[rows, H·d]` tensor; `None`: V is read in place from `fused`.
    v: Option<DevBuf<bf16>>,
    fused: Option<DevBuf<bf16>>,
    /// The QK norms' row statistics (their inputs are in `fused`).
    rstd: Option<[DevBuf<f32>; 2]>,
}

/// Where the attention's dV went: its own tensor, or (V read in place) the V columns of the
/// fused qkv gradient `[rows, 3·H·d]`, whose q and k columns are still to be written.
enum DvGrad {
    Own(DevBuf<bf16>),
    InFused(DevBuf<bf16>),
}

/// An adaLN's backward operands: its scale chunk, its saved statistics, its output gradient.
fn ln_bwd_in<'a>(
    scale: (&'a DevBuf<bf16>, usize),
    ln: &'a Ln,
    dy: &'a DevBuf<bf16>,
) -> adaln::LnBwdIn<'a> {
    adaln::LnBwdIn {
        scale,
        mean: &ln.mean,
        rstd: &ln.rstd,
        dy,
    }
}

/// Both streams' gradients from the attention backward.
struct AttnGrads {
    dq: [DqGrad; 2],
    dk: [DevBuf<bf16>; 2],
    dv: [DvGrad; 2],
}

/// A stream's dQ from the attention backward: bf16, or the kernels' f32 accumulator holding
/// dQ / scale, which the QK norms' backward reads itself (no conversion pass).
enum DqGrad {
    Bf16(DevBuf<bf16>),
    Scaled(DevBuf<f32>, f32),
}

/// One attention call: its inputs and outputs.
struct Attn {
    a: Qkv,
    b: Qkv,
    oa: DevBuf<bf16>,
    ob: DevBuf<bf16>,
    lse: DevBuf<f32>,
    dims: AttnDims,
}

/// The parts of one stream (x or context) of a joint block after the attention.
struct StreamTail {
    /// The projected attention output (the first gated residual's `y`).
    proj: DevBuf<bf16>,
    /// After the attention residual(s): the MLP's adaLN input.
    mid: DevBuf<bf16>,
    ln_mlp: Ln,
    /// fc1's pre-activation (GELU aux; `None` when the forward keeps nothing) and its GELU
    /// output.
    fc1_pre: Option<DevBuf<bf16>>,
    fc1_out: DevBuf<bf16>,
    fc2_out: DevBuf<bf16>,
}

/// The MMDiT-X second attention of an x stream.
struct Dual {
    ln: Ln,
    attn: Attn,
    proj: DevBuf<bf16>,
}

struct BlockSaved {
    x_in: DevBuf<bf16>,
    ctx_in: DevBuf<bf16>,
    x_chunks: Chunks,
    c_chunks: Chunks,
    x_ln: Ln,
    c_ln: Ln,
    attn: Attn,
    dual: Option<Dual>,
    x_tail: StreamTail,
    /// `None` in the last block, which updates only x.
    c_tail: Option<StreamTail>,
}

/// What a forward keeps for the backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Nothing (sampling, a frozen teacher).
    Nothing,
    /// Every block's activations.
    All,
    /// Activation checkpointing: only each block's two inputs; the backward recomputes one block's
    /// forward at a time, so at most one block's activations are alive (≈ one more forward).
    BlockInputs,
    /// Selective checkpointing: each block's inputs, modulation chunks and the outputs of its
    /// attention, attention projections and fc2 (4 tensors of a stream's size instead of
    /// `BlockInputs`' 1 and `All`'s ~20); the backward recomputes only the adaLNs, the qkv
    /// products with their norms, the residuals and fc1 — no attention, 10 of the block's 24·D²
    /// GEMM FLOPs a token fewer than `BlockInputs`, and no modulation GEMVs.
    Selective,
}

/// `--checkpoint-activations[=full|selective]`: how a differentiated forward saves memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Checkpointing {
    /// [`Keep::BlockInputs`]: the blocks' inputs only, every block recomputed.
    Full,
    /// [`Keep::Selective`]: the inputs and the products' outputs a recomputation reuses.
    Selective,
}

impl Checkpointing {
    /// What a differentiated forward keeps under `c` (none: everything).
    pub fn keep(c: Option<Checkpointing>) -> Keep {
        match c {
            None => Keep::All,
            Some(Checkpointing::Full) => Keep::BlockInputs,
            Some(Checkpointing::Selective) => Keep::Selective,
        }
    }

    /// The flag's value, `none` without one (benchmark reports).
    pub fn name(c: Option<Checkpointing>) -> &'static str {
        match c {
            None => "none",
            Some(Checkpointing::Full) => "full",
            Some(Checkpointing::Selective) => "selective",
        }
    }
}

/// One block's record: all its activations, (checkpointing) just its inputs, or (selective
/// checkpointing) its inputs and the outputs a recomputation reuses.
enum BlockRecord {
    Full(Box<BlockSaved>),
    Inputs { x: DevBuf<bf16>, ctx: DevBuf<bf16> },
    Outputs(Box<KeptOutputs>),
}

/// [`Keep::Selective`]'s record of one block: what [`DeviceMmdit::block`] reads instead of
/// recomputing it.
struct KeptOutputs {
    x: DevBuf<bf16>,
    ctx: DevBuf<bf16>,
    mods: BlockMods,
    /// The joint attention's outputs (context, image) and its lse.
    attn: (DevBuf<bf16>, DevBuf<bf16>, DevBuf<f32>),
    /// The MMDiT-X second attention's output, lse and projection.
    dual: Option<(DevBuf<bf16>, DevBuf<f32>, DevBuf<bf16>)>,
    /// Each stream's attention projection and fc2 output (`None`: the last block's context).
    x_tail: (DevBuf<bf16>, DevBuf<bf16>),
    c_tail: Option<(DevBuf<bf16>, DevBuf<bf16>)>,
}

/// What the backward reads of one forward.
pub struct Saved {
    batch: usize,
    height: usize,
    width: usize,
    context_len: usize,
    x_tokens: DevBuf<bf16>,
    t_pre: DevBuf<bf16>,
    t_act: DevBuf<bf16>,
    y_pre: DevBuf<bf16>,
    y_act: DevBuf<bf16>,
    cond: DevBuf<bf16>,
    silu_c: DevBuf<bf16>,
    blocks: Vec<BlockRecord>,
    /// `None` for a forward that stopped at a feature block.
    final_layer: Option<FinalSaved>,
}

/// A modulation's chunks (shift, scale, gate, …): windows of the modulation GEMM's output
/// `[B, n·D]`, kept alive here, chunk `j`'s row for sample `s` at `j·D + s·n·D` — the adaLN and
/// gated-residual kernels read rows at that stride, so no chunk is copied (~300 small launches
/// per SD3.5-medium forward, ~600 per backward).
struct Chunks {
    /// The GEMM output the windows point into.
    _whole: DevBuf<bf16>,
    parts: Vec<DevBuf<bf16>>,
    /// Elements between two samples' rows (`n·D`).
    ld: usize,
}

impl Chunks {
    /// Chunk `j` as the `_ld` launchers take it: its window and the row stride.
    fn at(&self, j: usize) -> (&DevBuf<bf16>, usize) {
        (&self.parts[j], self.ld)
    }

    fn len(&self) -> usize {
        self.parts.len()
    }

    /// The windows over rows `first .. first + rows` of the product (`d` wide each), borrowing
    /// nothing: one call's chunks out of a product over several calls' rows
    /// ([`StepModulations`], which owns the memory).
    fn rows(&self, first: usize, rows: usize, d: usize) -> KernelResult<Chunks> {
        let span = if rows == 0 {
            0
        } else {
            (rows - 1) * self.ld + d
        };
        let parts = (0..self.parts.len())
            .map(|j| {
                self._whole
                    .view(first * self.ld + j * d, span)
                    .map(|v| v.alias())
            })
            .collect::<KernelResult<Vec<_>>>()?;
        Ok(Chunks {
            _whole: self._whole.alias(),
            parts,
            ld: self.ld,
        })
    }

    /// The same windows, borrowing nothing (a recomputation's; the record owns the memory).
    fn alias(&self) -> Chunks {
        Chunks {
            _whole: self._whole.alias(),
            parts: self.parts.iter().map(DevBuf::alias).collect(),
            ld: self.ld,
        }
    }
}

/// The two streams' modulation chunks of one block, computed ahead by the block before.
struct BlockMods {
    x: Chunks,
    c: Chunks,
}

/// A block's first adaLNs when the block before computed them (with its last residuals, in one
/// pass each): the image stream's and the text stream's.
#[derive(Default)]
struct BlockLns {
    x: Option<Ln>,
    c: Option<Ln>,
}

/// What a block does about the next block's modulations: compute them ahead (on the side stream,
/// beside its text tokens' work), take them as given, or neither (the last block computed, or a
/// recomputation).
enum NextMods {
    None,
    Compute,
    Given(BlockMods),
}

/// Every block's and the final layer's modulation for `steps` model calls of `batch` rows each,
/// from one product a layer over all the calls' rows ([`DeviceMmdit::step_modulations`]): a
/// K-step sampler knows its timesteps in advance, and the modulation weights (1.5 GB in
/// SD3.5-medium, read at batch 1 by a memory-bound product) are then read once a sample instead
/// of once a step. Call `k` takes rows `k·batch ..` ([`DeviceMmdit::forward_modulated`]).
pub struct StepModulations {
    blocks: Vec<BlockMods>,
    final_layer: Chunks,
    batch: usize,
    steps: usize,
}

impl StepModulations {
    /// Block `i`'s chunks for call `step`.
    fn block(&self, i: usize, step: usize, d: usize) -> KernelResult<BlockMods> {
        let m = self
            .blocks
            .get(i)
            .ok_or_else(|| invalid(format!("no modulations for block {i}")))?;
        let first = step * self.batch;
        Ok(BlockMods {
            x: m.x.rows(first, self.batch, d)?,
            c: m.c.rows(first, self.batch, d)?,
        })
    }

    /// The number of calls.
    pub fn steps(&self) -> usize {
        self.steps
    }
}

/// The conditioning vectors of a forward and what their backward reads.
struct Conditioning {
    t_pre: DevBuf<bf16>,
    t_act: DevBuf<bf16>,
    y_pre: DevBuf<bf16>,
    y_act: DevBuf<bf16>,
    cond: DevBuf<bf16>,
    silu_c: DevBuf<bf16>,
}

/// A residual stream's gradient in f32 (each block adds three or four terms into it) and
/// rounded to bf16 (what the kernels read).
type ResidualGrad = (DevBuf<f32>, DevBuf<bf16>);

/// The final layer's modulation chunks, its input (the last block's image tokens) and LayerNorm.
struct FinalSaved {
    chunks: Chunks,
    input: DevBuf<bf16>,
    ln: Ln,
}

/// A forward stopped after a feature block: the image tokens there and, when asked for, what
/// [`DeviceMmdit::backward_features`] needs.
pub struct Features {
    pub features: DevBuf<bf16>,
    pub saved: Option<Saved>,
}

/// A forward's velocity `[B, C_out, H, W]` (bf16) and, when asked for, what its backward needs.
pub struct Forward {
    pub velocity: DevBuf<bf16>,
    pub saved: Option<Saved>,
}

fn invalid(msg: String) -> KernelError {
    KernelError::Invalid(msg)
}

impl DeviceMmdit {
    /// Uploads a CPU model's parameters (its current values) as f32 masters and bf16 weights,
    /// with f32 gradients: a model to train.
    pub fn new(dev: &KernelDevice, model: &Mmdit) -> KernelResult<DeviceMmdit> {
        Self::upload(dev, model, true)
    }

    /// The bf16 weights only (2 bytes per parameter; no masters, no gradients): a frozen model —
    /// the teacher — that runs forward and passes gradients to its inputs
    /// (`backward(.., params = false)`) but can take no step.
    pub fn frozen(dev: &KernelDevice, model: &Mmdit) -> KernelResult<DeviceMmdit> {
        Self::upload(dev, model, false)
    }

    /// A frozen snapshot of this model's current bf16 weights (2 B/param; forward and input
    /// gradients only), unaffected by later updates of `self`.
    pub fn frozen_copy(&self) -> KernelResult<DeviceMmdit> {
        Ok(DeviceMmdit {
            config: self.config.clone(),
            dev: self.dev.clone(),
            params: self.params.frozen_copy()?,
        })
    }

    /// Zeroed parameters for the model `config` describes, their values next from
    /// [`DeviceParams::fill`]: trainable (masters and gradients; `trained(name)` says which
    /// tensors the optimizer steps) or frozen (the bf16 weights only).
    pub fn allocate(
        dev: &KernelDevice,
        config: &MmditConfig,
        trainable: bool,
        trained: impl Fn(&str) -> bool,
    ) -> KernelResult<DeviceMmdit> {
        let layout = config.param_shapes().into_iter().map(|(name, shape)| {
            let t = trainable && trained(&name);
            (name, shape, t)
        });
        Ok(DeviceMmdit {
            config: config.clone(),
            dev: dev.clone(),
            params: DeviceParams::allocate(dev, layout, trainable)?,
        })
    }

    /// [`Self::frozen`] of the model `config` describes, read from `source` one tensor at a time
    /// (a checkpoint of any size: the host holds one tensor, not the model).
    pub fn frozen_from(
        dev: &KernelDevice,
        config: &MmditConfig,
        source: &dyn ParamSource,
    ) -> Result<DeviceMmdit> {
        let model = Self::allocate(dev, config, false, |_| false)?;
        DeviceParams::fill(&[&model.params], |name| source.param(name))?;
        Ok(model)
    }

    fn upload(dev: &KernelDevice, model: &Mmdit, trainable: bool) -> KernelResult<DeviceMmdit> {
        Ok(DeviceMmdit {
            config: model.config.clone(),
            dev: dev.clone(),
            params: DeviceParams::upload(dev, &model.params, trainable)?,
        })
    }

    /// Uploads one batch: latents `[B, C, H, W]`, timesteps `σ·1000`, pooled `[B, P]`, context
    /// `[B, Lc, Dc]` (host f32, rounded to bf16).
    pub fn inputs(
        &self,
        x: &Tensor,
        timestep: &[f32],
        pooled: &Tensor,
        context: &Tensor,
    ) -> KernelResult<DeviceInputs> {
        let c = &self.config;
        let (&[b, ch, h, w], &[cb, lc, cd], &[pb, pd]) =
            (x.shape(), context.shape(), pooled.shape())
        else {
            return Err(invalid(format!(
                "MMDiT inputs: x {:?}, context {:?}, pooled {:?} (want [B, C, H, W], [B, L, D], [B, P])",
                x.shape(),
                context.shape(),
                pooled.shape()
            )));
        };
        let ok = ch == c.in_channels
            && h % c.patch == 0
            && w % c.patch == 0
            && h / c.patch <= c.pos_embed_max_size
            && w / c.patch <= c.pos_embed_max_size
            && cb == b
            && pb == b
            && cd == c.context_dim
            && pd == c.pooled_dim
            && timestep.len() == b;
        if !ok {
            return Err(invalid(format!(
                "MMDiT inputs do not fit the model: x {:?}, context {:?}, pooled {:?}, {} timesteps",
                x.shape(),
                context.shape(),
                pooled.shape(),
                timestep.len()
            )));
        }
        let up = |t: &Tensor| self.dev.upload(&crate::device::kernel::bf16_of(t.f32s()));
        Ok(DeviceInputs {
            x: up(x)?,
            t_features: up(&timestep_features(timestep, c.freq_dim))?,
            pooled: up(pooled)?,
            context: up(context)?,
            batch: b,
            height: h,
            width: w,
            context_len: lc,
        })
    }

    /// Overwrites the timestep features of inputs made by [`Self::inputs`] (the latents and the
    /// conditioning are left: the device writes them) — what a replayed graph reads changes in
    /// place.
    pub fn restage_timesteps(&self, inputs: &DeviceInputs, timestep: &[f32]) -> KernelResult<()> {
        if timestep.len() != inputs.batch {
            return Err(invalid(format!(
                "MMDiT restage: {} timesteps for inputs of batch {}",
                timestep.len(),
                inputs.batch
            )));
        }
        let f = timestep_features(timestep, self.config.freq_dim);
        let bf: Vec<bf16> = f.f32s().iter().map(|&v| bf16::from_f32(v)).collect();
        self.dev.copy_to_device(&bf, &inputs.t_features)
    }

    // ---- building blocks -------------------------------------------------------------------

    /// `x·Wᵀ + b` over `rows` rows with `{prefix}.weight` (`[out, in…]`) and the optional
    /// `{prefix}.bias`; `gelu` applies GELU-tanh and also returns the pre-activation.
    fn linear(
        &self,
        x: &DevBuf<bf16>,
        rows: usize,
        prefix: &str,
        gelu: bool,
    ) -> KernelResult<(DevBuf<bf16>, Option<DevBuf<bf16>>)> {
        self.linear_act(x, rows, prefix, gelu, gelu)
    }

    /// [`Self::linear`], with GELU-tanh when `gelu`, keeping its pre-activation (for the
    /// backward) only when `keep_pre`: a forward that keeps nothing skips writing it (at
    /// SD3.5-medium 1024 px, 1.3 GB a forward).
    fn linear_act(
        &self,
        x: &DevBuf<bf16>,
        rows: usize,
        prefix: &str,
        gelu: bool,
        keep_pre: bool,
    ) -> KernelResult<(DevBuf<bf16>, Option<DevBuf<bf16>>)> {
        let ws = self.slot(&format!("{prefix}.weight"))?;
        let out = ws.shape[0];
        let inp = ws.numel() / out;
        let w = self.weight(&format!("{prefix}.weight"))?;
        let bias_name = format!("{prefix}.bias");
        let bias = if self.params.contains(&bias_name) {
            Some(self.weight(&bias_name)?)
        } else {
            None
        };
        if gelu && bias.is_none() {
            return Err(invalid(format!("{prefix}: the GELU epilogue needs a bias")));
        }
        let y = self.dev.alloc::<bf16>(rows * out)?;
        let keep_pre = gelu && keep_pre;
        let aux = if keep_pre {
            Some(self.dev.alloc::<bf16>(rows * out)?)
        } else {
            None
        };
        let epilogue = match (gelu, keep_pre, bias.is_some()) {
            (true, true, _) => EpilogueKind::GeluAuxBias,
            (true, false, _) => EpilogueKind::GeluBias,
            (false, _, true) => EpilogueKind::Bias,
            (false, _, false) => EpilogueKind::None,
        };
        let spec = GemmSpec {
            m: rows,
            n: out,
            k: inp,
            trans_a: false,
            trans_b: true,
            epilogue,
        };
        let ep = EpilogueBufs {
            bias: bias.as_deref(),
            aux: aux.as_ref(),
            bias_grad: None,
        };
        gemm_bf16(&self.dev, spec, x, &w, &y, ep)?;
        Ok((y, aux))
    }

    /// Adds `dW = dyᵀ·x` (and, with a bias, `db = Σ dy`) into the gradients of `{prefix}`. The
    /// bias gradient is a column sum of its own (`colsum_acc`) where the GEMM has more than a
    /// few rows: the BGRADB epilogue slowed the qkv weight gradient [4608 × 1536 × 4096] from
    /// ~720 to 505 TFLOP/s on an H200 (docs/perf-log.md, 2026-11-27); over at most 8 rows
    /// (`weight_grad_small_k`) it comes with the product.
    fn linear_weight_grad(
        &self,
        x: &DevBuf<bf16>,
        dy: &DevBuf<bf16>,
        rows: usize,
        prefix: &str,
        with_bias: bool,
    ) -> KernelResult<()> {
        let ws = self.slot(&format!("{prefix}.weight"))?;
        let out = ws.shape[0];
        let inp = ws.numel() / out;
        let with_bias = with_bias && self.params.contains(&format!("{prefix}.bias"));
        let db = if with_bias {
            Some(self.grad(&format!("{prefix}.bias"))?)
        } else {
            None
        };
        let few_rows = rows <= 8;
        let spec = GemmSpec {
            m: out,
            n: inp,
            k: rows,
            trans_a: true,
            trans_b: false,
            epilogue: if with_bias && few_rows {
                EpilogueKind::BgradB
            } else {
                EpilogueKind::None
            },
        };
        // the first write since zero_grad overwrites (no memset of the gradients, no read of zeros)
        const VIA: SmallProducts = SmallProducts::Fastest;
        let (gw, first) = self.params.grad_first_write(&format!("{prefix}.weight"))?;
        match db.as_deref() {
            Some(db) if few_rows => {
                gemm_bf16_f32(&self.dev, spec, dy, x, &gw, Some(db), first, VIA)
            }
            Some(db) => {
                gemm_bf16_f32(&self.dev, spec, dy, x, &gw, None, first, VIA)?;
                adaln::colsum_acc(&self.dev, dy, (rows, out), db)
            }
            None => gemm_bf16_f32(&self.dev, spec, dy, x, &gw, None, first, VIA),
        }
    }

    /// `dx = dy·W` of `{prefix}`; with `gelu_of = Some((aux, fc1))` the result is multiplied by
    /// GELU′(aux) (the gradient of fc1's pre-activation) and, with `params`, fc1's bias gradient
    /// is added (`gemm_bf16_dgelu`: a plain GEMM, then the activation's backward and a column
    /// sum, faster than cuBLASLt's DGeluBgrad epilogue).
    fn linear_input_grad(
        &self,
        dy: &DevBuf<bf16>,
        rows: usize,
        prefix: &str,
        gelu_of: Option<(&DevBuf<bf16>, &str)>,
        params: bool,
    ) -> KernelResult<DevBuf<bf16>> {
        let ws = self.slot(&format!("{prefix}.weight"))?;
        let out = ws.shape[0];
        let inp = ws.numel() / out;
        let w = self.weight(&format!("{prefix}.weight"))?;
        let dx = self.dev.alloc::<bf16>(rows * inp)?;
        match gelu_of {
            Some((pre, fc1)) => {
                let dh = self.dev.alloc::<bf16>(rows * inp)?;
                let db = if params {
                    Some(self.grad(&format!("{fc1}.bias"))?)
                } else {
                    None
                };
                gemm_bf16_dgelu(
                    &self.dev,
                    (rows, inp, out),
                    dy,
                    &w,
                    pre,
                    &dh,
                    &dx,
                    db.as_deref(),
                )?;
            }
            None => {
                let spec = GemmSpec::nn(rows, inp, out);
                gemm_bf16(&self.dev, spec, dy, &w, &dx, EpilogueBufs::default())?;
            }
        }
        Ok(dx)
    }

    /// Backward of `x + gate·y` where `y` is the output of the linear layer `{name}` (which read
    /// `input`), from `dz`: `(dgate, dy)`; with `params` the layer's weight gradient too, its bias
    /// gradient summed in the residual's own pass over `dz` (`gated_residual_bwd_bias`) rather
    /// than by the weight-gradient GEMM's BGRADB epilogue, a kernel of its own in cuBLASLt.
    #[allow(clippy::too_many_arguments)]
    fn gated_linear_bwd(
        &self,
        gate: (&DevBuf<bf16>, usize),
        y: &DevBuf<bf16>,
        dz: &DevBuf<bf16>,
        (b, l, d): (usize, usize, usize),
        input: &DevBuf<bf16>,
        name: &str,
        params: bool,
    ) -> KernelResult<(DevBuf<f32>, DevBuf<bf16>)> {
        let bias = format!("{name}.bias");
        if !params {
            return adaln::gated_residual_bwd_ld(&self.dev, gate, y, dz, (b, l, d));
        }
        let (dgate, dy) = if self.params.contains(&bias) {
            let g = self.grad(&bias)?;
            adaln::gated_residual_bwd_bias(&self.dev, gate, y, dz, (b, l, d), &g)?
        } else {
            adaln::gated_residual_bwd_ld(&self.dev, gate, y, dz, (b, l, d))?
        };
        self.linear_weight_grad(input, &dy, b * l, name, false)?;
        Ok((dgate, dy))
    }

    /// `{prefix}.adaLN_modulation.1` of `silu(c)`, split into its `n` chunks `[B, D]`.
    fn modulation(
        &self,
        silu_c: &DevBuf<bf16>,
        b: usize,
        prefix: &str,
        n: usize,
    ) -> KernelResult<Chunks> {
        let d = self.config.hidden;
        let (m, _) = self.linear(silu_c, b, &format!("{prefix}.adaLN_modulation.1"), false)?;
        if m.len() != b * n * d {
            return Err(invalid(format!(
                "{prefix}: modulation of {} elements, want {n} chunks of [{b}, {d}]",
                m.len()
            )));
        }
        // windows into `m` from chunk j's first row to its last, which `Chunks` keeps alive
        // for as long as it hands them out
        let span = if b == 0 { 0 } else { (b - 1) * n * d + d };
        let parts = (0..n)
            .map(|j| m.view(j * d, span).map(|v| v.alias()))
            .collect::<KernelResult<Vec<_>>>()?;
        Ok(Chunks {
            _whole: m,
            parts,
            ld: n * d,
        })
    }

    /// Backward of [`Self::modulation`]: chunk gradients (f32 `[B, D]`, `None` = zero) →
    /// parameter gradients, and `d silu(c)` added into `d_silu_c` (f32: it sums the terms of
    /// every block, which cancel).
    fn modulation_bwd(
        &self,
        silu_c: &DevBuf<bf16>,
        b: usize,
        prefix: &str,
        dchunks: &[Option<DevBuf<f32>>],
        d_silu_c: &DevBuf<f32>,
        params: bool,
    ) -> KernelResult<()> {
        let d = self.config.hidden;
        let n = dchunks.len();
        let dm = self.dev.alloc::<bf16>(b * n * d)?;
        let chunks: Vec<Option<&DevBuf<f32>>> = dchunks.iter().map(Option::as_ref).collect();
        layout::gather_chunks_bf16(&self.dev, &dm, (b, d), &chunks)?;
        let name = format!("{prefix}.adaLN_modulation.1");
        if params {
            self.linear_weight_grad(silu_c, &dm, b, &name, true)?;
        }
        // d silu(c) += dm·W in f32, in one product (for at most 8 samples the memory-bound
        // `gemv_small_m_nn_partial`), not a bf16 product then an accumulation
        let w = self.weight(&format!("{name}.weight"))?;
        let spec = GemmSpec::nn(b, d, n * d);
        gemm_bf16_acc_f32(&self.dev, spec, &dm, &w, d_silu_c, None)
    }

    /// Whether the attention reads V in place from the fused qkv projection (QK norm keeps that
    /// tensor anyway; the tensor-core kernels have entries for its stride).
    fn v_in_place(&self) -> bool {
        self.config.qk_norm && attn::has_fast_kernels(self.config.head_dim)
    }

    /// The column window `j` (0 q, 1 k, 2 v) of a fused qkv tensor, as the norms see it.
    fn qkv_rows(&self, j: usize) -> qknorm::RowLayout {
        let c = &self.config;
        qknorm::RowLayout {
            heads: c.heads,
            ld: 3 * c.heads * c.head_dim,
            off: j * c.heads * c.head_dim,
        }
    }

    /// q, k, v `[B, L, H, hd]` of `{prefix}` (an `…attn` or `…attn2`) from the modulated `h`.
    fn qkv(&self, h: &DevBuf<bf16>, rows: usize, prefix: &str) -> KernelResult<Qkv> {
        let c = &self.config;
        let d = c.heads * c.head_dim;
        let (fused, _) = self.linear(h, rows, &format!("{prefix}.qkv"), false)?;
        let part = |j: usize| -> KernelResult<DevBuf<bf16>> {
            let out = self.dev.alloc::<bf16>(rows * d)?;
            layout::copy_cols(
                &self.dev,
                &out,
                Cols { ld: d, off: 0 },
                &fused,
                Cols {
                    ld: 3 * d,
                    off: j * d,
                },
                rows,
                d,
            )?;
            Ok(out)
        };
        if !c.qk_norm {
            return Ok(Qkv {
                q: part(0)?,
                k: part(1)?,
                v: Some(part(2)?),
                fused: None,
                rstd: None,
            });
        }
        // q's and k's norms in one launch
        let (wq, wk) = (
            self.weight(&format!("{prefix}.ln_q.weight"))?,
            self.weight(&format!("{prefix}.ln_k.weight"))?,
        );
        let dims = (rows * c.heads, c.head_dim);
        let layouts = [self.qkv_rows(0), self.qkv_rows(1)];
        let [(q, rq), (k, rk)] = qknorm::rms_norm_fwd_laid_pair(
            &self.dev,
            &fused,
            layouts,
            [&wq, &wk],
            dims,
            QK_NORM_EPS,
        )?;
        let v = if self.v_in_place() {
            None
        } else {
            Some(part(2)?)
        };
        Ok(Qkv {
            q,
            k,
            v,
            fused: Some(fused),
            rstd: Some([rq, rk]),
        })
    }

    /// Backward of [`Self::qkv`] (which read `input`) from the gradients of q, k and v: returns
    /// `dh`.
    #[allow(clippy::too_many_arguments)]
    fn qkv_bwd(
        &self,
        s: &Qkv,
        input: &DevBuf<bf16>,
        rows: usize,
        prefix: &str,
        dq: &DqGrad,
        dk: &DevBuf<bf16>,
        dv: DvGrad,
        params: bool,
    ) -> KernelResult<DevBuf<bf16>> {
        let c = &self.config;
        let d = c.heads * c.head_dim;
        let copy_in = |dfused: &DevBuf<bf16>, j: usize, g: &DevBuf<bf16>| {
            layout::copy_cols(
                &self.dev,
                dfused,
                Cols {
                    ld: 3 * d,
                    off: j * d,
                },
                g,
                Cols { ld: d, off: 0 },
                rows,
                d,
            )
        };
        let dfused = match dv {
            DvGrad::InFused(f) => f,
            DvGrad::Own(dv) => {
                let f = self.dev.alloc::<bf16>(rows * 3 * d)?;
                copy_in(&f, 2, &dv)?;
                f
            }
        };
        match (&s.rstd, &s.fused) {
            (Some([rq, rk]), Some(fused)) => {
                // q's and k's norms in one launch, their weight gradients added in one more
                let names = ["ln_q", "ln_k"].map(|w| format!("{prefix}.{w}.weight"));
                let (wq, wk) = (self.weight(&names[0])?, self.weight(&names[1])?);
                let dims = (rows * c.heads, c.head_dim);
                let layouts = [self.qkv_rows(0), self.qkv_rows(1)];
                // a slot's first write since zero_grad overwrites it (no memset)
                let grads = if params {
                    let first = |n: &str| self.grad_first_write(n);
                    Some([first(&names[0])?, first(&names[1])?])
                } else {
                    None
                };
                let dweights = grads
                    .as_ref()
                    .map(|[(gq, fq), (gk, fk)]| [(&**gq, !*fq), (&**gk, !*fk)]);
                let (x, w, r) = (fused, [&*wq, &*wk], [rq, rk]);
                match dq {
                    DqGrad::Bf16(dq) => qknorm::rms_norm_bwd_laid_pair(
                        &self.dev,
                        &dfused,
                        x,
                        layouts,
                        w,
                        r,
                        [dq, dk],
                        dims,
                        dweights,
                    )?,
                    DqGrad::Scaled(acc, scale) => qknorm::rms_norm_bwd_laid_pair_dq32(
                        &self.dev,
                        &dfused,
                        x,
                        layouts,
                        w,
                        r,
                        (acc, *scale),
                        dk,
                        dims,
                        dweights,
                    )?,
                }
            }
            _ => {
                let DqGrad::Bf16(dq) = dq else {
                    return Err(invalid(format!(
                        "MMDiT backward: {prefix}'s dQ in f32 without the QK norms to read it"
                    )));
                };
                copy_in(&dfused, 0, dq)?;
                copy_in(&dfused, 1, dk)?;
            }
        }
        let name = format!("{prefix}.qkv");
        if params {
            self.linear_weight_grad(input, &dfused, rows, &name, true)?;
        }
        self.linear_input_grad(&dfused, rows, &name, None, params)
    }

    /// adaLN of `x` with chunks `shift` and `scale` of `m`.
    fn ln(
        &self,
        x: &DevBuf<bf16>,
        m: &Chunks,
        (shift, scale): (usize, usize),
        dims: (usize, usize, usize),
    ) -> KernelResult<Ln> {
        let mods = (m.at(shift).0, m.at(scale).0, m.ld);
        let (y, mean, rstd) = adaln::adaln_modulate_fwd_ld(&self.dev, x, mods, dims, LN_EPS)?;
        Ok(Ln { y, mean, rstd })
    }

    /// The gated residual `mid = x + gate·y` (chunk `gate` of `g`) and [`Self::ln`] of `mid` with
    /// chunks `shift`, `scale` of `m` (the same block's, or the next block's), in one pass
    /// (`gated_residual_adaln_fwd_ld`): `(mid, Ln)`.
    fn residual_ln(
        &self,
        (x, y): (&DevBuf<bf16>, &DevBuf<bf16>),
        (g, gate): (&Chunks, usize),
        (m, shift, scale): (&Chunks, usize, usize),
        dims: (usize, usize, usize),
    ) -> KernelResult<(DevBuf<bf16>, Ln)> {
        let mods = (m.at(shift).0, m.at(scale).0, m.ld);
        let (mid, y, mean, rstd) =
            adaln::gated_residual_adaln_fwd_ld(&self.dev, x, y, g.at(gate), mods, dims, LN_EPS)?;
        Ok((mid, Ln { y, mean, rstd }))
    }

    /// Backward of [`Self::ln`] (its `scale` chunk of `m` given): `(dx, dshift, dscale)`.
    fn ln_bwd(
        &self,
        x: &DevBuf<bf16>,
        (m, scale): (&Chunks, usize),
        ln: &Ln,
        dy: &DevBuf<bf16>,
        dims: (usize, usize, usize),
    ) -> KernelResult<(DevBuf<bf16>, DevBuf<f32>, DevBuf<f32>)> {
        adaln::adaln_modulate_bwd_ld(&self.dev, x, m.at(scale), &ln.mean, &ln.rstd, dy, dims)
    }

    /// [`Self::ln_bwd`] with dx added into the residual stream's f32 gradient:
    /// `out = a + dx` and, with `out16`, its bf16 rounding (`out` may be `a`); one pass
    /// (`adaln_modulate_bwd_acc_ld`). Returns `(dshift, dscale)`.
    #[allow(clippy::too_many_arguments)]
    fn ln_bwd_acc(
        &self,
        x: &DevBuf<bf16>,
        (m, scale): (&Chunks, usize),
        ln: &Ln,
        dy: &DevBuf<bf16>,
        dims: (usize, usize, usize),
        acc: (&DevBuf<f32>, Option<&DevBuf<bf16>>, &DevBuf<f32>),
    ) -> KernelResult<(DevBuf<f32>, DevBuf<f32>)> {
        let (mean, rstd) = (&ln.mean, &ln.rstd);
        adaln::adaln_modulate_bwd_acc_ld(&self.dev, x, m.at(scale), mean, rstd, dy, dims, acc)
    }

    /// V of a stream as the attention reads it: its own tensor, or the V window of the fused
    /// projection (token stride 3·H·d).
    fn v_operand<'q>(&self, s: &'q Qkv) -> KernelResult<DevView<'q, bf16>> {
        match (&s.v, &s.fused) {
            (Some(v), _) => v.view(0, v.len()),
            (None, Some(f)) => self.v_window(f),
            (None, None) => Err(invalid("qkv: no V".into())),
        }
    }

    /// The V columns of a fused qkv tensor (or its gradient), from the first token's V on.
    fn v_window<'f>(&self, f: &'f DevBuf<bf16>) -> KernelResult<DevView<'f, bf16>> {
        let d = self.config.heads * self.config.head_dim;
        let off = if f.is_empty() { 0 } else { 2 * d };
        f.view(off, f.len() - off)
    }

    fn attention(&self, a: Qkv, b: Qkv, dims: AttnDims) -> KernelResult<Attn> {
        let (va, vb) = (self.v_operand(&a)?, self.v_operand(&b)?);
        let (oa, ob, lse) = if b.v.is_none() {
            let v_ld = 3 * dims.h * dims.d;
            attn::joint_attention_fwd_v_ld(&self.dev, &a.q, &a.k, &va, &b.q, &b.k, &vb, dims, v_ld)?
        } else {
            attn::joint_attention_fwd(&self.dev, &a.q, &a.k, &va, &b.q, &b.k, &vb, dims)?
        };
        drop((va, vb));
        Ok(Attn {
            a,
            b,
            oa,
            ob,
            lse,
            dims,
        })
    }

    /// The attention's input gradients: both streams' dQ, `[dk_a, dk_b]` and both streams' dV.
    /// With V read in place (QK norms, the tensor-core kernels) dQ stays in the kernels' f32
    /// accumulators for the norms' backward, and dV goes into the fused qkv gradients.
    fn attention_bwd(
        &self,
        s: &Attn,
        doa: &DevBuf<bf16>,
        dob: &DevBuf<bf16>,
    ) -> KernelResult<AttnGrads> {
        let (a, b) = (&s.a, &s.b);
        let (va, vb) = (self.v_operand(a)?, self.v_operand(b)?);
        let outs = [&s.oa, &s.ob, doa, dob];
        if b.v.is_some() {
            let [dqa, dka, dva, dqb, dkb, dvb] = attn::joint_attention_bwd(
                &self.dev, &a.q, &a.k, &va, &b.q, &b.k, &vb, &s.oa, &s.ob, &s.lse, doa, dob, s.dims,
            )?;
            return Ok(AttnGrads {
                dq: [DqGrad::Bf16(dqa), DqGrad::Bf16(dqb)],
                dk: [dka, dkb],
                dv: [DvGrad::Own(dva), DvGrad::Own(dvb)],
            });
        }
        // dV straight into the fused qkv gradients, which qkv_bwd completes
        let hd = s.dims.h * s.dims.d;
        let rows_a = s.dims.b * s.dims.la;
        let rows_b = s.dims.b * s.dims.lb;
        let (fa, fb) = (
            self.dev.alloc::<bf16>(rows_a * 3 * hd)?,
            self.dev.alloc::<bf16>(rows_b * 3 * hd)?,
        );
        let (dva, dvb) = (self.v_window(&fa)?, self.v_window(&fb)?);
        let (dq, dk) = attn::joint_attention_bwd_v_ld_dq32(
            &self.dev,
            [&a.q, &a.k, &va, &b.q, &b.k, &vb],
            outs,
            &s.lse,
            s.dims,
            3 * hd,
            [&dva, &dvb],
            attn::BwdVariant::fastest(&self.dev, s.dims.d),
        )?;
        drop((dva, dvb));
        let dq = match dq {
            attn::DqGrad::Bf16(qa, qb) => [DqGrad::Bf16(qa), DqGrad::Bf16(qb)],
            attn::DqGrad::Scaled { a, b, scale } => {
                [DqGrad::Scaled(a, scale), DqGrad::Scaled(b, scale)]
            }
        };
        Ok(AttnGrads {
            dq,
            dk,
            dv: [DvGrad::InFused(fa), DvGrad::InFused(fb)],
        })
    }

    /// A zero-token stream (the missing context of an image-only attention), V laid out as the
    /// model's other streams are.
    fn empty_qkv(&self) -> KernelResult<Qkv> {
        let in_place = self.v_in_place();
        Ok(Qkv {
            q: self.dev.alloc(0)?,
            k: self.dev.alloc(0)?,
            v: if in_place {
                None
            } else {
                Some(self.dev.alloc(0)?)
            },
            fused: if in_place {
                Some(self.dev.alloc(0)?)
            } else {
                None
            },
            rstd: None,
        })
    }

    /// A stream's MLP half after its last attention residual: `mid = x + gate·y` (chunk `gate`;
    /// `y` the attention's projection `proj` when `None`), then
    /// `mid + gate·fc2(GELU(fc1(adaLN(mid))))` with chunks 3, 4, 5 (the residual and the adaLN in
    /// one pass). With `kept_fc2` (a selective recomputation) fc2's output is that and the
    /// stream's output is not formed (an empty buffer: the record has the next block's input).
    /// With `next` (the next block's chunks) the last residual and the next block's first adaLN
    /// (chunks 0, 1 of `next`) run in one pass too, and that adaLN is returned.
    #[allow(clippy::too_many_arguments)]
    fn mlp_tail(
        &self,
        x: &DevBuf<bf16>,
        (gate, y): (usize, Option<&DevBuf<bf16>>),
        proj: DevBuf<bf16>,
        chunks: &Chunks,
        prefix: &str,
        (b, l): (usize, usize),
        saving: bool,
        kept_fc2: Option<&DevBuf<bf16>>,
        next: Option<&Chunks>,
    ) -> KernelResult<(DevBuf<bf16>, StreamTail, Option<Ln>)> {
        let dims = (b, l, self.config.hidden);
        let xy = (x, y.unwrap_or(&proj));
        let (mid, ln_mlp) = self.residual_ln(xy, (chunks, gate), (chunks, 3, 4), dims)?;
        let fc1 = format!("{prefix}.mlp.fc1");
        let (fc1_out, fc1_pre) = self.linear_act(&ln_mlp.y, b * l, &fc1, true, saving)?;
        let (fc2_out, out, next_ln) = match kept_fc2 {
            Some(f) => (f.alias(), self.dev.alloc(0)?, None),
            None => {
                let fc2 = format!("{prefix}.mlp.fc2");
                let (fc2_out, _) = self.linear(&fc1_out, b * l, &fc2, false)?;
                match next {
                    // the residual and the next block's first adaLN in one pass
                    Some(n) => {
                        let tail = (&mid, &fc2_out);
                        let (out, ln) = self.residual_ln(tail, (chunks, 5), (n, 0, 1), dims)?;
                        (fc2_out, out, Some(ln))
                    }
                    None => {
                        let out = adaln::gated_residual_fwd_ld(
                            &self.dev,
                            &mid,
                            chunks.at(5),
                            &fc2_out,
                            dims,
                        )?;
                        (fc2_out, out, None)
                    }
                }
            }
        };
        let tail = StreamTail {
            proj,
            mid,
            ln_mlp,
            fc1_pre,
            fc1_out,
            fc2_out,
        };
        Ok((out, tail, next_ln))
    }

    /// Backward of [`Self::mlp_tail`] from the stream's output gradient (bf16, and the f32 sum it
    /// was rounded from): returns `d mid` in f32 and rounded to bf16, and fills the gradients of
    /// chunks 3, 4, 5.
    #[allow(clippy::too_many_arguments)]
    fn mlp_tail_bwd(
        &self,
        t: &StreamTail,
        chunks: &Chunks,
        (dout, dout32): (&DevBuf<bf16>, &DevBuf<f32>),
        prefix: &str,
        (b, l): (usize, usize),
        dchunks: &mut [Option<DevBuf<f32>>],
        params: bool,
    ) -> KernelResult<(DevBuf<f32>, DevBuf<bf16>)> {
        let dims = (b, l, self.config.hidden);
        let rows = b * l;
        let (fc1, fc2) = (format!("{prefix}.mlp.fc1"), format!("{prefix}.mlp.fc2"));
        let (dgate, dh2) = self.gated_linear_bwd(
            chunks.at(5),
            &t.fc2_out,
            dout,
            dims,
            &t.fc1_out,
            &fc2,
            params,
        )?;
        dchunks[5] = Some(dgate);
        let pre = t
            .fc1_pre
            .as_ref()
            .ok_or_else(|| invalid("MMDiT backward: a block whose forward kept nothing".into()))?;
        let dpre = self.linear_input_grad(&dh2, rows, &fc2, Some((pre, &fc1)), params)?;
        if params {
            // fc1's bias gradient came with the GELU epilogue above
            self.linear_weight_grad(&t.ln_mlp.y, &dpre, rows, &fc1, false)?;
        }
        let dln = self.linear_input_grad(&dpre, rows, &fc1, None, params)?;
        let dmid32 = self.dev.alloc::<f32>(dout32.len())?;
        let dmid16 = self.dev.alloc::<bf16>(dout32.len())?;
        let acc = (&dmid32, Some(&dmid16), dout32);
        let (dshift, dscale) = self.ln_bwd_acc(&t.mid, (chunks, 4), &t.ln_mlp, &dln, dims, acc)?;
        dchunks[3] = Some(dshift);
        dchunks[4] = Some(dscale);
        Ok((dmid32, dmid16))
    }

    // ---- the network -------------------------------------------------------------------------

    /// The modulation chunks of block `i`'s x and context streams: 6 each, 9 for an x stream
    /// with a second attention, 2 for the last block's context (which only feeds the attention).
    fn chunk_counts(&self, i: usize) -> (usize, usize) {
        let c = &self.config;
        let x = if c.dual_attention_blocks.contains(&i) {
            9
        } else {
            6
        };
        (x, if i + 1 == c.depth { 2 } else { 6 })
    }

    /// Both streams' modulation chunks of block `i`.
    fn block_mods(&self, i: usize, silu_c: &DevBuf<bf16>, b: usize) -> KernelResult<BlockMods> {
        let (nx, nc) = self.chunk_counts(i);
        Ok(BlockMods {
            x: self.modulation(silu_c, b, &format!("joint_blocks.{i}.x_block"), nx)?,
            c: self.modulation(silu_c, b, &format!("joint_blocks.{i}.context_block"), nc)?,
        })
    }

    /// Joint block `i` (as the CPU model's `joint_block`): returns the new x, the new context
    /// (`None` after the last block, which updates only x) and what the backward reads —
    /// complete only when `saving` (else the GELU pre-activations are not written). `mods`: the
    /// block's modulation chunks when an earlier block computed them; with `prefetch` the block
    /// computes block `i + 1`'s and returns them (on the side stream, beside the image tokens'
    /// GEMMs: the modulation GEMVs only read weights, ~1.5 GB a SD3.5-medium forward).
    /// `kept`: a selective recomputation, which takes the modulation chunks, the attention outputs,
    /// the projections and fc2's outputs from the record (and forms no outputs).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn block(
        &self,
        i: usize,
        x: DevBuf<bf16>,
        ctx: DevBuf<bf16>,
        silu_c: &DevBuf<bf16>,
        (b, lx, lc): (usize, usize, usize),
        saving: bool,
        (mods, lns): (Option<BlockMods>, BlockLns),
        next: NextMods,
        kept: Option<&KeptOutputs>,
    ) -> KernelResult<(
        DevBuf<bf16>,
        Option<DevBuf<bf16>>,
        BlockSaved,
        Option<(BlockMods, BlockLns)>,
    )> {
        let c = &self.config;
        let d = c.hidden;
        let pre_only = i + 1 == c.depth;
        let dual = c.dual_attention_blocks.contains(&i);
        let xp = format!("joint_blocks.{i}.x_block");
        let cp = format!("joint_blocks.{i}.context_block");
        let (dx3, dc3) = ((b, lx, d), (b, lc, d));

        // The text tokens' work goes to the side stream (with two streams): its GEMMs are too
        // small to fill the card alone, the image tokens' kernels leave room at their tails.
        let dev = &self.dev;
        let mods = match kept {
            Some(k) => Some(BlockMods {
                x: k.mods.x.alias(),
                c: k.mods.c.alias(),
            }),
            None => mods,
        };
        let (pre_x, pre_c) = match mods {
            Some(m) => (Some(m.x), Some(m.c)),
            None => (None, None),
        };
        // the next block's modulations ahead, on the side stream: this block's MLP residuals
        // then run with the next block's first adaLNs
        dev.fork(&[silu_c.span()])?;
        let (c_chunks, c_ln, cq, next) = dev.on_side(|| {
            let chunks = match pre_c {
                Some(chunks) => chunks,
                None => self.modulation(silu_c, b, &cp, self.chunk_counts(i).1)?,
            };
            let ln = match lns.c {
                Some(ln) => ln,
                None => self.ln(&ctx, &chunks, (0, 1), dc3)?,
            };
            let q = self.qkv(&ln.y, b * lc, &format!("{cp}.attn"))?;
            let next = match next {
                NextMods::Compute => Some(self.block_mods(i + 1, silu_c, b)?),
                NextMods::Given(m) => Some(m),
                NextMods::None => None,
            };
            Ok((chunks, ln, q, next))
        })?;
        let x_chunks = match pre_x {
            Some(chunks) => chunks,
            None => self.modulation(silu_c, b, &xp, self.chunk_counts(i).0)?,
        };
        let x_ln = match lns.x {
            Some(ln) => ln,
            None => self.ln(&x, &x_chunks, (0, 1), dx3)?,
        };
        let xq = self.qkv(&x_ln.y, b * lx, &format!("{xp}.attn"))?;
        dev.join()?;
        let dims = AttnDims {
            b,
            la: lc,
            lb: lx,
            h: c.heads,
            d: c.head_dim,
        };
        let attn = match kept {
            Some(KeptOutputs {
                attn: (oa, ob, lse),
                ..
            }) => Attn {
                a: cq,
                b: xq,
                oa: oa.alias(),
                ob: ob.alias(),
                lse: lse.alias(),
                dims,
            },
            None => self.attention(cq, xq, dims)?,
        };
        // a selective recomputation's projection and fc2 outputs, per stream
        let kept_x = kept.map(|k| &k.x_tail);
        let kept_c = kept.and_then(|k| k.c_tail.as_ref());
        let proj = |o: &DevBuf<bf16>, rows, name: &str, k: Option<&(DevBuf<bf16>, _)>| {
            let p: KernelResult<DevBuf<bf16>> = match k {
                Some((p, _)) => Ok(p.alias()),
                None => Ok(self.linear(o, rows, name, false)?.0),
            };
            p
        };

        dev.fork(&[silu_c.span()])?;
        let next_c = next.as_ref().map(|m| &m.c);
        let (ctx_out, c_tail, next_c_ln) = dev.on_side(|| {
            if pre_only {
                return Ok((None, None, None));
            }
            let proj = proj(&attn.oa, b * lc, &format!("{cp}.attn.proj"), kept_c)?;
            let fc2 = kept_c.map(|k| &k.1);
            let (out, tail, ln) = self.mlp_tail(
                &ctx,
                (2, None),
                proj,
                &c_chunks,
                &cp,
                (b, lc),
                saving,
                fc2,
                next_c,
            )?;
            Ok((Some(out), Some(tail), ln))
        })?;
        let next_x = next.as_ref().map(|m| &m.x);
        let x_proj = proj(&attn.ob, b * lx, &format!("{xp}.attn.proj"), kept_x)?;
        let x_fc2 = kept_x.map(|k| &k.1);
        let (x_out, x_tail, dual) = if dual {
            // the first residual with attn2's adaLN of the block's input (one read of x); the
            // second residual (attn2's) goes with the MLP's adaLN
            let mods = (x_chunks.at(6).0, x_chunks.at(7).0, x_chunks.ld);
            let (x_mid, y, mean, rstd) = adaln::gated_residual_adaln_of_x_fwd_ld(
                dev,
                &x,
                &x_proj,
                x_chunks.at(2),
                mods,
                dx3,
                LN_EPS,
            )?;
            let dual_ln = Ln { y, mean, rstd };
            let q2 = self.qkv(&dual_ln.y, b * lx, &format!("{xp}.attn2"))?;
            let dims2 = AttnDims { la: 0, ..dims };
            let name = format!("{xp}.attn2.proj");
            let (attn, proj) = match kept.and_then(|k| k.dual.as_ref()) {
                Some((ob, lse, proj)) => {
                    let attn = Attn {
                        a: self.empty_qkv()?,
                        b: q2,
                        oa: dev.alloc(0)?,
                        ob: ob.alias(),
                        lse: lse.alias(),
                        dims: dims2,
                    };
                    (attn, proj.alias())
                }
                None => {
                    let attn = self.attention(self.empty_qkv()?, q2, dims2)?;
                    let (proj, _) = self.linear(&attn.ob, b * lx, &name, false)?;
                    (attn, proj)
                }
            };
            let tail = (8, Some(&proj));
            let dims = (b, lx);
            let (out, t, ln) = self.mlp_tail(
                &x_mid, tail, x_proj, &x_chunks, &xp, dims, saving, x_fc2, next_x,
            )?;
            (
                out,
                (t, ln),
                Some(Dual {
                    ln: dual_ln,
                    attn,
                    proj,
                }),
            )
        } else {
            let (out, t, ln) = self.mlp_tail(
                &x,
                (2, None),
                x_proj,
                &x_chunks,
                &xp,
                (b, lx),
                saving,
                x_fc2,
                next_x,
            )?;
            (out, (t, ln), None)
        };
        let (x_tail, next_x_ln) = x_tail;
        dev.join()?;
        let saved = BlockSaved {
            x_in: x,
            ctx_in: ctx,
            x_chunks,
            c_chunks,
            x_ln,
            c_ln,
            attn,
            dual,
            x_tail,
            c_tail,
        };
        let next = next.map(|m| {
            let lns = BlockLns {
                x: next_x_ln,
                c: next_c_ln,
            };
            (m, lns)
        });
        Ok((x_out, ctx_out, saved, next))
    }

    /// The velocity `[B, C_out, H, W]`; `keep` says what it keeps for [`Self::backward`].
    pub fn forward(&self, inputs: &DeviceInputs, keep: Keep) -> KernelResult<Forward> {
        self.forward_with(inputs, keep, None)
    }

    fn forward_with(
        &self,
        inputs: &DeviceInputs,
        keep: Keep,
        pre: Option<(&StepModulations, usize)>,
    ) -> KernelResult<Forward> {
        let c = &self.config;
        let (b, h, w) = (inputs.batch, inputs.height, inputs.width);
        let lx = (h / c.patch) * (w / c.patch);
        let (x, mut saved) = self.trunk(inputs, keep, c.depth, pre)?;
        let chunks = match pre {
            Some((m, step)) => m.final_layer.rows(step * m.batch, m.batch, c.hidden)?,
            None => self.modulation(&saved.silu_c, b, "final_layer", 2)?,
        };
        let ln = self.ln(&x, &chunks, (0, 1), (b, lx, c.hidden))?;
        let (tokens, _) = self.linear(&ln.y, b * lx, "final_layer.linear", false)?;
        let velocity = self.dev.alloc::<bf16>(b * c.out_channels * h * w)?;
        let out = (b, c.out_channels, h, w);
        layout::patchify(&self.dev, &velocity, &tokens, out, c.patch, true, false)?;
        saved.final_layer = Some(FinalSaved {
            chunks,
            input: x,
            ln,
        });
        Ok(Forward {
            velocity,
            saved: (keep != Keep::Nothing).then_some(saved),
        })
    }

    /// The image tokens `[B, gh·gw, D]` after block `block`, the forward stopping there (the
    /// discriminator's features, ALGORITHM.md §2); [`Self::backward_features`] takes gradients
    /// from them.
    pub fn forward_features(
        &self,
        inputs: &DeviceInputs,
        block: usize,
        keep: Keep,
    ) -> KernelResult<Features> {
        if block >= self.config.depth {
            return Err(invalid(format!(
                "feature block {block} of a {}-block model",
                self.config.depth
            )));
        }
        let (features, saved) = self.trunk(inputs, keep, block + 1, None)?;
        Ok(Features {
            features,
            saved: (keep != Keep::Nothing).then_some(saved),
        })
    }

    /// The embedders and blocks `0..upto`: the image tokens after the last of them, and the
    /// record (without a final layer; no blocks when `keep` is `Nothing`).
    fn trunk(
        &self,
        inputs: &DeviceInputs,
        keep: Keep,
        upto: usize,
        pre: Option<(&StepModulations, usize)>,
    ) -> KernelResult<(DevBuf<bf16>, Saved)> {
        let c = &self.config;
        let (b, h, w, lc) = (
            inputs.batch,
            inputs.height,
            inputs.width,
            inputs.context_len,
        );
        let (gh, gw) = (h / c.patch, w / c.patch);
        let lx = gh * gw;

        let x_tokens = self.dev.alloc::<bf16>(b * c.in_channels * h * w)?;
        let img = (b, c.in_channels, h, w);
        layout::patchify(&self.dev, &x_tokens, &inputs.x, img, c.patch, false, true)?;
        let (mut x, _) = self.linear(&x_tokens, b * lx, "x_embedder.proj", false)?;
        layout::add_pos_embed(
            &self.dev,
            &x,
            &*self.weight("pos_embed")?,
            self.crop(b, gh, gw),
        )?;

        // with the modulations given, the conditioning they came from is not needed here
        let cond = match pre {
            Some(_) => {
                let none = || self.dev.alloc::<bf16>(0);
                Conditioning {
                    t_pre: none()?,
                    t_act: none()?,
                    y_pre: none()?,
                    y_act: none()?,
                    cond: none()?,
                    silu_c: none()?,
                }
            }
            None => self.conditioning(&inputs.t_features, &inputs.pooled, b)?,
        };
        let silu_c = cond.silu_c;
        let (mut ctx, _) = self.linear(&inputs.context, b * lc, "context_embedder", false)?;

        let mut blocks = Vec::new();
        // each block's modulations (and first adaLNs) from the block before, the first's from here
        let mut ahead: Option<(BlockMods, BlockLns)> = match pre {
            Some((m, step)) => Some((m.block(0, step, c.hidden)?, BlockLns::default())),
            None => None,
        };
        for i in 0..upto {
            let saving = keep == Keep::All;
            let dims = (b, lx, lc);
            let next = match pre {
                _ if i + 1 >= upto => NextMods::None,
                Some((m, step)) => NextMods::Given(m.block(i + 1, step, c.hidden)?),
                None => NextMods::Compute,
            };
            let (mods, lns) = match ahead.take() {
                Some((m, lns)) => (Some(m), lns),
                None => (None, BlockLns::default()),
            };
            let (nx, nctx, saved, next) =
                self.block(i, x, ctx, &silu_c, dims, saving, (mods, lns), next, None)?;
            ahead = next;
            x = nx;
            ctx = match nctx {
                Some(n) => n,
                None => self.dev.alloc(0)?,
            };
            match keep {
                Keep::Nothing => {}
                Keep::All => blocks.push(BlockRecord::Full(Box::new(saved))),
                Keep::BlockInputs => blocks.push(BlockRecord::Inputs {
                    x: saved.x_in,
                    ctx: saved.ctx_in,
                }),
                Keep::Selective => blocks.push(BlockRecord::Outputs(Box::new(KeptOutputs {
                    x: saved.x_in,
                    ctx: saved.ctx_in,
                    mods: BlockMods {
                        x: saved.x_chunks,
                        c: saved.c_chunks,
                    },
                    attn: (saved.attn.oa, saved.attn.ob, saved.attn.lse),
                    dual: saved.dual.map(|d| (d.attn.ob, d.attn.lse, d.proj)),
                    x_tail: (saved.x_tail.proj, saved.x_tail.fc2_out),
                    c_tail: saved.c_tail.map(|t| (t.proj, t.fc2_out)),
                }))),
            }
        }
        let saved = Saved {
            batch: b,
            height: h,
            width: w,
            context_len: lc,
            x_tokens,
            t_pre: cond.t_pre,
            t_act: cond.t_act,
            y_pre: cond.y_pre,
            y_act: cond.y_act,
            cond: cond.cond,
            silu_c,
            blocks,
            final_layer: None,
        };
        Ok((x, saved))
    }

    /// The conditioning of `rows` model calls: `c = t_embedder(t_features) +
    /// y_embedder(pooled)` and `silu(c)`, which every modulation reads, with what its backward
    /// reads.
    fn conditioning(
        &self,
        t_features: &DevBuf<bf16>,
        pooled: &DevBuf<bf16>,
        rows: usize,
    ) -> KernelResult<Conditioning> {
        let silu = |t: &DevBuf<bf16>| ew::activation_fwd(&self.dev, t, Activation::Silu);
        let (t_pre, _) = self.linear(t_features, rows, "t_embedder.mlp.0", false)?;
        let t_act = silu(&t_pre)?;
        let (t_emb, _) = self.linear(&t_act, rows, "t_embedder.mlp.2", false)?;
        let (y_pre, _) = self.linear(pooled, rows, "y_embedder.mlp.0", false)?;
        let y_act = silu(&y_pre)?;
        let (y_emb, _) = self.linear(&y_act, rows, "y_embedder.mlp.2", false)?;
        layout::add(&self.dev, &t_emb, &t_emb, &y_emb)?;
        let silu_c = silu(&t_emb)?;
        Ok(Conditioning {
            t_pre,
            t_act,
            y_pre,
            y_act,
            cond: t_emb,
            silu_c,
        })
    }

    /// Every block's and the final layer's modulation for `steps` calls of `batch` rows each,
    /// from `t_features [steps·batch, freq_dim]` (call k's rows at `k·batch`) and `pooled`
    /// (the same layout, or `[batch, pooled_dim]`: every call's): one product a layer over all
    /// the calls' rows (see [`StepModulations`]). Device work only: it can be recorded into a
    /// graph.
    pub fn step_modulations(
        &self,
        t_features: &DevBuf<bf16>,
        pooled: &DevBuf<bf16>,
        (steps, batch): (usize, usize),
    ) -> KernelResult<StepModulations> {
        let c = &self.config;
        let rows = steps * batch;
        let once = batch * c.pooled_dim;
        let fits = pooled.len() == rows * c.pooled_dim || (pooled.len() == once && steps > 0);
        if t_features.len() != rows * c.freq_dim || !fits {
            return Err(invalid(format!(
                "step modulations of {steps} calls of {batch}: timestep features of {}, pooled of {}",
                t_features.len(),
                pooled.len()
            )));
        }
        let repeated;
        let pooled = if pooled.len() == rows * c.pooled_dim {
            pooled
        } else {
            repeated = self.dev.alloc::<bf16>(rows * c.pooled_dim)?;
            for k in 0..steps {
                ew::copy(&self.dev, &*repeated.view(k * once, once)?, pooled)?;
            }
            &repeated
        };
        let cond = self.conditioning(t_features, pooled, rows)?;
        let blocks = (0..c.depth)
            .map(|i| self.block_mods(i, &cond.silu_c, rows))
            .collect::<KernelResult<Vec<_>>>()?;
        let final_layer = self.modulation(&cond.silu_c, rows, "final_layer", 2)?;
        Ok(StepModulations {
            blocks,
            final_layer,
            batch,
            steps,
        })
    }

    /// [`Self::forward`] of call `step` of `mods` (its modulations, not `inputs.t_features` and
    /// `inputs.pooled`, condition it): nothing is kept (a sampler's call).
    pub fn forward_modulated(
        &self,
        inputs: &DeviceInputs,
        mods: &StepModulations,
        step: usize,
    ) -> KernelResult<Forward> {
        if step >= mods.steps || inputs.batch != mods.batch {
            return Err(invalid(format!(
                "call {step} of modulations for {} calls of {}, inputs of {}",
                mods.steps, mods.batch, inputs.batch
            )));
        }
        self.forward_with(inputs, Keep::Nothing, Some((mods, step)))
    }

    /// The centred crop of the position grid for a `gh × gw` patch grid.
    fn crop(&self, b: usize, gh: usize, gw: usize) -> PosCrop {
        let p = self.config.pos_embed_max_size;
        PosCrop {
            b,
            gh,
            gw,
            d: self.config.hidden,
            p,
            top: (p - gh) / 2,
            left: (p - gw) / 2,
        }
    }

    /// Backward of one joint block from the gradients of its outputs (`dctx_out` is zeros for
    /// the last block): returns the gradients of its inputs and adds `d silu(c)`. The residual
    /// streams' gradients are carried in f32 (each block adds three or four terms into them) and
    /// rounded to bf16 where a kernel reads them.
    #[allow(clippy::too_many_arguments)]
    fn block_bwd(
        &self,
        i: usize,
        s: &BlockSaved,
        (dx_out, dx_out16): (&DevBuf<f32>, &DevBuf<bf16>),
        (dctx_out, dctx_out16): (&DevBuf<f32>, &DevBuf<bf16>),
        silu_c: &DevBuf<bf16>,
        d_silu_c: &DevBuf<f32>,
        (b, lx, lc): (usize, usize, usize),
        params: bool,
    ) -> KernelResult<(ResidualGrad, ResidualGrad)> {
        let d = self.config.hidden;
        let xp = format!("joint_blocks.{i}.x_block");
        let cp = format!("joint_blocks.{i}.context_block");
        let (dx3, dc3) = ((b, lx, d), (b, lc, d));
        let (xc, cc) = (&s.x_chunks, &s.c_chunks);
        let mut dxc: Vec<Option<DevBuf<f32>>> = (0..xc.len()).map(|_| None).collect();
        let mut dcc: Vec<Option<DevBuf<f32>>> = (0..cc.len()).map(|_| None).collect();

        // The context stream's backward runs on the side stream (with two streams), as in the
        // forward. First back to the attention outputs.
        let dev = &self.dev;
        dev.fork(&[])?;
        let (doc, dctx_in) = dev.on_side(|| match &s.c_tail {
            Some(t) => {
                let (dmid32, dmid) = self.mlp_tail_bwd(
                    t,
                    cc,
                    (dctx_out16, dctx_out),
                    &cp,
                    (b, lc),
                    &mut dcc,
                    params,
                )?;
                let name = format!("{cp}.attn.proj");
                let (dgate, dproj) = self.gated_linear_bwd(
                    cc.at(2),
                    &t.proj,
                    &dmid,
                    dc3,
                    &s.attn.oa,
                    &name,
                    params,
                )?;
                dcc[2] = Some(dgate);
                let doc = self.linear_input_grad(&dproj, b * lc, &name, None, params)?;
                Ok((doc, dmid32))
            }
            // the last block passes the context through unused: its gradient is zero
            None => Ok((dev.zeros::<bf16>(b * lc * d)?, dev.zeros(b * lc * d)?)),
        })?;

        let (dx_in, dx_mid) = self.mlp_tail_bwd(
            &s.x_tail,
            xc,
            (dx_out16, dx_out),
            &xp,
            (b, lx),
            &mut dxc,
            params,
        )?;
        // attn2's input gradient, whose adaLN backward runs with the first adaLN's (same x)
        let mut dual_dh = None;
        if let Some(du) = &s.dual {
            let name = format!("{xp}.attn2.proj");
            let (dgate, dproj) = self.gated_linear_bwd(
                xc.at(8),
                &du.proj,
                &dx_mid,
                dx3,
                &du.attn.ob,
                &name,
                params,
            )?;
            dxc[8] = Some(dgate);
            let dob = self.linear_input_grad(&dproj, b * lx, &name, None, params)?;
            let none = dev.alloc::<bf16>(0)?;
            let AttnGrads {
                dq: [_, dq],
                dk: [_, dk],
                dv: [_, dv],
            } = self.attention_bwd(&du.attn, &none, &dob)?;
            let dh = self.qkv_bwd(
                &du.attn.b,
                &du.ln.y,
                b * lx,
                &format!("{xp}.attn2"),
                &dq,
                &dk,
                dv,
                params,
            )?;
            dual_dh = Some((dh, &du.ln));
        }
        let name = format!("{xp}.attn.proj");
        let (dgate, dproj) = self.gated_linear_bwd(
            xc.at(2),
            &s.x_tail.proj,
            &dx_mid,
            dx3,
            &s.attn.ob,
            &name,
            params,
        )?;
        dxc[2] = Some(dgate);
        let dox = self.linear_input_grad(&dproj, b * lx, &name, None, params)?;
        dev.join()?;

        // the joint attention, then each stream's qkv, first adaLN and modulation; the side
        // stream gathers its d silu(c) apart (both streams add theirs) and the main adds it
        let AttnGrads {
            dq: [dqa, dqb],
            dk: [dka, dkb],
            dv: [dva, dvb],
        } = self.attention_bwd(&s.attn, &doc, &dox)?;
        dev.fork(&[])?;
        let dctx_in16 = dev.on_side(|| {
            let dhc = self.qkv_bwd(
                &s.attn.a,
                &s.c_ln.y,
                b * lc,
                &format!("{cp}.attn"),
                &dqa,
                &dka,
                dva,
                params,
            )?;
            // the block's context gradient, and its bf16 rounding for the block before
            let dctx_in16 = dev.alloc::<bf16>(dctx_in.len())?;
            let acc = (&dctx_in, Some(&dctx_in16), &dctx_in);
            let (dshift, dscale) = self.ln_bwd_acc(&s.ctx_in, (cc, 1), &s.c_ln, &dhc, dc3, acc)?;
            dcc[0] = Some(dshift);
            dcc[1] = Some(dscale);
            Ok(dctx_in16)
        })?;
        let dhx = self.qkv_bwd(
            &s.attn.b,
            &s.x_ln.y,
            b * lx,
            &format!("{xp}.attn"),
            &dqb,
            &dkb,
            dvb,
            params,
        )?;
        let dx_in16 = dev.alloc::<bf16>(dx_in.len())?;
        let acc = (&dx_in, Some(&dx_in16), &dx_in);
        match &dual_dh {
            // both adaLNs of x (attn2's first, as the two passes ran) into dx_in in one pass
            Some((dh, dual_ln)) => {
                let pair = [
                    ln_bwd_in(xc.at(7), dual_ln, dh),
                    ln_bwd_in(xc.at(1), &s.x_ln, &dhx),
                ];
                let [(ds2, dsc2), (ds, dsc)] =
                    adaln::adaln_modulate_bwd_acc2_ld(dev, &s.x_in, pair, dx3, acc)?;
                dxc[6] = Some(ds2);
                dxc[7] = Some(dsc2);
                dxc[0] = Some(ds);
                dxc[1] = Some(dsc);
            }
            None => {
                let (dshift, dscale) =
                    self.ln_bwd_acc(&s.x_in, (xc, 1), &s.x_ln, &dhx, dx3, acc)?;
                dxc[0] = Some(dshift);
                dxc[1] = Some(dscale);
            }
        }
        drop(dual_dh);
        dev.join()?;

        // Both modulations' backward on the side stream, left running into the next block's
        // backward (whose first join waits for it; `backward_trunk` joins after the last): they
        // only read weights and write their own gradients and `d silu(c)`, which nothing else
        // touches until then. The chunk gradients are moved in, so they are freed on the side.
        dev.fork(&[silu_c.span()])?;
        dev.on_side(move || {
            let (dcc, dxc) = (dcc, dxc);
            self.modulation_bwd(silu_c, b, &cp, &dcc, d_silu_c, params)?;
            self.modulation_bwd(silu_c, b, &xp, &dxc, d_silu_c, params)
        })?;
        Ok(((dx_in, dx_in16), (dctx_in, dctx_in16)))
    }

    /// Backward from `d velocity` (`[B, C_out, H, W]`, bf16): the inputs' gradients, and with
    /// `params` every parameter's gradient added into [`Self::grads`] (`false` for a frozen
    /// model that only passes gradients through, as the GAN term's fake-score backbone).
    pub fn backward(
        &self,
        inputs: &DeviceInputs,
        s: &Saved,
        dvelocity: &DevBuf<bf16>,
        params: bool,
    ) -> KernelResult<InputGrads> {
        let c = &self.config;
        let d = c.hidden;
        let (b, h, w) = (s.batch, s.height, s.width);
        let lx = (h / c.patch) * (w / c.patch);
        self.check_backward(params)?;
        let f = match &s.final_layer {
            Some(f) if s.blocks.len() == c.depth => f,
            _ => {
                return Err(invalid(
                    "MMDiT backward: the forward kept nothing or stopped at a feature block".into(),
                ))
            }
        };
        if dvelocity.len() != b * c.out_channels * h * w {
            return Err(invalid(format!(
                "MMDiT backward: a velocity gradient of {} elements for [{b}, {}, {h}, {w}]",
                dvelocity.len(),
                c.out_channels
            )));
        }

        let dtokens = self.dev.alloc::<bf16>(dvelocity.len())?;
        let out = (b, c.out_channels, h, w);
        layout::patchify(&self.dev, &dtokens, dvelocity, out, c.patch, true, true)?;
        if params {
            self.linear_weight_grad(&f.ln.y, &dtokens, b * lx, "final_layer.linear", true)?;
        }
        let dln = self.linear_input_grad(&dtokens, b * lx, "final_layer.linear", None, params)?;
        let (dx16, dshift, dscale) =
            self.ln_bwd(&f.input, (&f.chunks, 1), &f.ln, &dln, (b, lx, d))?;
        let dx = ew::cast_bf16_to_f32(&self.dev, &dx16)?;
        let d_silu_c = self.dev.zeros::<f32>(b * d)?;
        let dfinal = [Some(dshift), Some(dscale)];
        self.modulation_bwd(&s.silu_c, b, "final_layer", &dfinal, &d_silu_c, params)?;
        self.backward_trunk(inputs, s, (dx, dx16), d_silu_c, params)
    }

    /// Backward from the gradient of [`Self::forward_features`]'s image tokens (`[B, gh·gw, D]`,
    /// bf16): the inputs' gradients and, with `params`, the parameters' of the embedders and the
    /// blocks up to the feature block (the GAN term through the fake score's backbone).
    pub fn backward_features(
        &self,
        inputs: &DeviceInputs,
        s: &Saved,
        dfeatures: &DevBuf<bf16>,
        params: bool,
    ) -> KernelResult<InputGrads> {
        let c = &self.config;
        let lx = (s.height / c.patch) * (s.width / c.patch);
        self.check_backward(params)?;
        if s.blocks.is_empty() || s.final_layer.is_some() {
            return Err(invalid(
                "MMDiT feature backward: the forward kept nothing or ran to the velocity".into(),
            ));
        }
        if dfeatures.len() != s.batch * lx * c.hidden {
            return Err(invalid(format!(
                "MMDiT feature backward: a gradient of {} elements for [{}, {lx}, {}]",
                dfeatures.len(),
                s.batch,
                c.hidden
            )));
        }
        let dx = ew::cast_bf16_to_f32(&self.dev, dfeatures)?;
        let dx16 = ew::cast_f32_to_bf16(&self.dev, &dx)?;
        let d_silu_c = self.dev.zeros::<f32>(s.batch * c.hidden)?;
        self.backward_trunk(inputs, s, (dx, dx16), d_silu_c, params)
    }

    fn check_backward(&self, params: bool) -> KernelResult<()> {
        if params && !self.is_trainable() {
            return Err(invalid(
                "MMDiT backward: a frozen model takes no parameter gradients (params = false)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The blocks kept in `s` in reverse, then the embedders, from the gradient `dx` of the last
    /// kept block's image tokens and the `d silu(c)` gathered so far.
    fn backward_trunk(
        &self,
        inputs: &DeviceInputs,
        s: &Saved,
        mut dx: ResidualGrad,
        d_silu_c: DevBuf<f32>,
        params: bool,
    ) -> KernelResult<InputGrads> {
        let c = &self.config;
        let d = c.hidden;
        let (b, h, w, lc) = (s.batch, s.height, s.width, s.context_len);
        let (gh, gw) = (h / c.patch, w / c.patch);
        let lx = gh * gw;
        // the context after the last kept block feeds nothing: its gradient is zero
        let mut dctx = (
            self.dev.zeros::<f32>(b * lc * d)?,
            self.dev.zeros::<bf16>(b * lc * d)?,
        );
        for i in (0..s.blocks.len()).rev() {
            let dims = (b, lx, lc);
            let recomputed;
            // a recomputation reads the record's buffers through aliases: it is dropped before
            // the record
            let recompute = |x: &DevBuf<bf16>, ctx: &DevBuf<bf16>, kept| {
                self.dev.recomputing(|| {
                    let (x, ctx) = (x.alias(), ctx.alias());
                    let none = (None, BlockLns::default());
                    self.block(i, x, ctx, &s.silu_c, dims, true, none, NextMods::None, kept)
                })
            };
            let block = match &s.blocks[i] {
                BlockRecord::Full(saved) => saved.as_ref(),
                BlockRecord::Inputs { x, ctx } => {
                    recomputed = recompute(x, ctx, None)?.2;
                    &recomputed
                }
                BlockRecord::Outputs(k) => {
                    recomputed = recompute(&k.x, &k.ctx, Some(k.as_ref()))?.2;
                    &recomputed
                }
            };
            let (nx, nc) = self.block_bwd(
                i,
                block,
                (&dx.0, &dx.1),
                (&dctx.0, &dctx.1),
                &s.silu_c,
                &d_silu_c,
                dims,
                params,
            )?;
            dx = nx;
            dctx = nc;
        }
        // the last block's modulation backward, still on the side stream
        self.dev.join()?;
        let (dx, dctx) = (dx.1, dctx.1);
        let d_silu_c = ew::cast_f32_to_bf16(&self.dev, &d_silu_c)?;

        if params {
            self.linear_weight_grad(&inputs.context, &dctx, b * lc, "context_embedder", true)?;
        }
        let dcontext = self.linear_input_grad(&dctx, b * lc, "context_embedder", None, params)?;

        let dcond = ew::activation_bwd(&self.dev, &s.cond, &d_silu_c, Activation::Silu)?;
        let embedder =
            |pre: &DevBuf<bf16>, act: &DevBuf<bf16>, input: &DevBuf<bf16>, name: &str| {
                let (l0, l2) = (format!("{name}.mlp.0"), format!("{name}.mlp.2"));
                if params {
                    self.linear_weight_grad(act, &dcond, b, &l2, true)?;
                }
                let dact = self.linear_input_grad(&dcond, b, &l2, None, params)?;
                let dpre = ew::activation_bwd(&self.dev, pre, &dact, Activation::Silu)?;
                if params {
                    self.linear_weight_grad(input, &dpre, b, &l0, true)?;
                }
                self.linear_input_grad(&dpre, b, &l0, None, params)
            };
        embedder(&s.t_pre, &s.t_act, &inputs.t_features, "t_embedder")?;
        let dpooled = embedder(&s.y_pre, &s.y_act, &inputs.pooled, "y_embedder")?;

        if params {
            let crop = self.crop(b, gh, gw);
            layout::pos_embed_grad(&self.dev, &*self.grad("pos_embed")?, &dx, crop)?;
            self.linear_weight_grad(&s.x_tokens, &dx, b * lx, "x_embedder.proj", true)?;
        }
        let dx_tokens = self.linear_input_grad(&dx, b * lx, "x_embedder.proj", None, params)?;
        let dimage = self.dev.alloc::<bf16>(dx_tokens.len())?;
        let img = (b, c.in_channels, h, w);
        layout::patchify(&self.dev, &dimage, &dx_tokens, img, c.patch, false, false)?;
        Ok(InputGrads {
            x: dimage,
            pooled: dpooled,
            context: dcontext,
        })
    }
}
