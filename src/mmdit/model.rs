//! The MMDiT forward pass (MMDIT.md A.2–A.3) written on the differentiable ops, so the tape gives
//! the backward for weights and inputs; freezing the parameters gives input gradients only.

use super::config::MmditConfig;
use crate::autograd::Var;
use crate::nn::{linear_named, silu_mlp_embedder, timestep_features, ParamMap};
use crate::ops::attention::joint_attention;
use crate::ops::norm::{adaln_modulate, gated_residual, rms_norm, LN_EPS};
use crate::ops::{linear, PatchOrder};
use crate::tensor::Tensor;

/// RMSNorm eps of SD3.5's QK norm.
const QK_NORM_EPS: f32 = 1e-6;

pub struct Mmdit {
    pub config: MmditConfig,
    pub params: ParamMap,
}

/// One batch of model inputs.
pub struct MmditInputs<'a> {
    /// Latents `[B, C, H, W]` (H, W multiples of the patch size).
    pub x: &'a Var,
    /// Timesteps `σ·1000`, one per sample. Not differentiated.
    pub timestep: &'a [f32],
    /// Pooled text vector `[B, pooled_dim]`.
    pub pooled: &'a Var,
    /// Context tokens `[B, L, context_dim]`.
    pub context: &'a Var,
}

/// What a forward returns: the velocity (absent when it stopped early at the feature block) and
/// the image-token hidden states after the requested block.
pub struct MmditOutput {
    pub velocity: Option<Var>,
    /// `[B, tokens, D]` after block `feature_block`.
    pub features: Option<Var>,
}

impl Mmdit {
    pub fn new(config: MmditConfig, params: ParamMap) -> Mmdit {
        Mmdit { config, params }
    }

    /// The predicted velocity `[B, C_out, H, W]`.
    pub fn forward(&self, inputs: &MmditInputs) -> Var {
        self.forward_with(inputs, None, false)
            .velocity
            .expect("a full forward has a velocity")
    }

    /// The forward, optionally also returning the image tokens after block `feature_block`
    /// (the discriminator's features, ALGORITHM.md §2) and optionally stopping there.
    pub fn forward_with(
        &self,
        inputs: &MmditInputs,
        feature_block: Option<usize>,
        stop_at_features: bool,
    ) -> MmditOutput {
        let c = &self.config;
        let &[b, ch, h, w] = inputs.x.shape() else {
            panic!(
                "MMDiT input must be [B, C, H, W], got {:?}",
                inputs.x.shape()
            )
        };
        assert_eq!(
            ch, c.in_channels,
            "MMDiT: {ch} input channels, the model takes {}",
            c.in_channels
        );
        assert!(
            h % c.patch == 0 && w % c.patch == 0,
            "MMDiT: latent {h}x{w} is not a multiple of the patch size {}",
            c.patch
        );
        let (gh, gw) = (h / c.patch, w / c.patch);
        assert!(
            gh <= c.pos_embed_max_size && gw <= c.pos_embed_max_size,
            "MMDiT: a {gh}x{gw} patch grid exceeds the position embedding's {}",
            c.pos_embed_max_size
        );
        assert_eq!(inputs.timestep.len(), b, "MMDiT: one timestep per sample");
        assert_eq!(
            inputs.pooled.shape(),
            [b, c.pooled_dim],
            "MMDiT: pooled vector shape"
        );
        assert!(
            inputs.context.shape().len() == 3
                && inputs.context.shape()[0] == b
                && inputs.context.shape()[2] == c.context_dim,
            "MMDiT: context must be [{b}, L, {}], got {:?}",
            c.context_dim,
            inputs.context.shape()
        );
        if let Some(fb) = feature_block {
            assert!(
                fb < c.depth,
                "feature block {fb} of a {}-block model",
                c.depth
            );
        }

        let mut x = self.patch_embed(inputs.x, gh, gw);
        let t = Var::constant(timestep_features(inputs.timestep, c.freq_dim));
        let cond = silu_mlp_embedder(&self.params, "t_embedder.mlp", &t).add(&silu_mlp_embedder(
            &self.params,
            "y_embedder.mlp",
            inputs.pooled,
        ));
        let silu_c = cond.silu();
        let mut ctx = linear_named(&self.params, "context_embedder", inputs.context);
        let mut features = None;
        for i in 0..c.depth {
            let (nx, nctx) = self.joint_block(i, &x, &ctx, &silu_c);
            x = nx;
            ctx = nctx;
            if feature_block == Some(i) {
                features = Some(x.clone());
                if stop_at_features {
                    return MmditOutput {
                        velocity: None,
                        features,
                    };
                }
            }
        }
        let m = linear_named(&self.params, "final_layer.adaLN_modulation.1", &silu_c).chunk(2, -1);
        let x = adaln_modulate(&x, &m[0], &m[1], LN_EPS);
        let x = linear_named(&self.params, "final_layer.linear", &x);
        MmditOutput {
            velocity: Some(x.unpatchify(c.patch, gh, gw, PatchOrder::ChannelLast)),
            features,
        }
    }

    /// Conv patch embedding as patchify + GEMM (the conv weight read as `[D, C·p·p]`, whose
    /// (c, kh, kw) order is the channel-first patch order), plus the centre-cropped positions.
    fn patch_embed(&self, x: &Var, gh: usize, gw: usize) -> Var {
        let c = &self.config;
        let d = c.hidden;
        let w = self
            .params
            .var("x_embedder.proj.weight")
            .reshape(&[d, c.in_channels * c.patch * c.patch]);
        let tokens = linear(
            &x.patchify(c.patch, PatchOrder::ChannelFirst),
            &w,
            Some(&self.params.var("x_embedder.proj.bias")),
        );
        tokens.add(&self.cropped_pos_embed(gh, gw))
    }

    /// Rows `top .. top+gh` and columns `left .. left+gw` of the `P×P` position grid, centred.
    pub fn cropped_pos_embed(&self, gh: usize, gw: usize) -> Var {
        let (p, d) = (self.config.pos_embed_max_size, self.config.hidden);
        let (top, left) = ((p - gh) / 2, (p - gw) / 2);
        let grid = self.params.var("pos_embed").reshape(&[p, p, d]);
        let rows = grid.split(0, &[top, gh, p - top - gh]).swap_remove(1);
        let cells = rows.split(1, &[left, gw, p - left - gw]).swap_remove(1);
        cells.reshape(&[1, gh * gw, d])
    }

    /// q, k, v `[B, L, H, hd]` of one attention, QK-normed when the model has QK norm.
    fn qkv(&self, prefix: &str, h: &Var) -> (Var, Var, Var) {
        let c = &self.config;
        let &[b, l, _] = h.shape() else {
            unreachable!("tokens are [B, L, D]")
        };
        let parts = linear_named(&self.params, &format!("{prefix}.qkv"), h)
            .reshape(&[b, l, 3, c.heads, c.head_dim])
            .split(2, &[1, 1, 1]);
        let shape = [b, l, c.heads, c.head_dim];
        let (mut q, mut k) = (parts[0].reshape(&shape), parts[1].reshape(&shape));
        if c.qk_norm {
            q = rms_norm(
                &q,
                &self.params.var(&format!("{prefix}.ln_q.weight")),
                QK_NORM_EPS,
            );
            k = rms_norm(
                &k,
                &self.params.var(&format!("{prefix}.ln_k.weight")),
                QK_NORM_EPS,
            );
        }
        (q, k, parts[2].reshape(&shape))
    }

    fn proj(&self, prefix: &str, o: &Var) -> Var {
        let &[b, l, _, _] = o.shape() else {
            unreachable!("attention output is [B, L, H, hd]")
        };
        linear_named(
            &self.params,
            &format!("{prefix}.proj"),
            &o.reshape(&[b, l, self.config.hidden]),
        )
    }

    fn mlp(&self, prefix: &str, h: &Var) -> Var {
        let h = linear_named(&self.params, &format!("{prefix}.mlp.fc1"), h).gelu();
        linear_named(&self.params, &format!("{prefix}.mlp.fc2"), &h)
    }

    /// Joint block `i` (MMDIT.md A.3): both streams' adaLN and qkv, one attention over the
    /// concatenated tokens, then gated residuals and MLPs. MMDiT-X blocks add an image-only
    /// attention on a second modulation of the same LN(x); the last block updates only x.
    pub fn joint_block(&self, i: usize, x: &Var, ctx: &Var, silu_c: &Var) -> (Var, Var) {
        let c = &self.config;
        let pre_only = i + 1 == c.depth;
        let dual = c.dual_attention_blocks.contains(&i);
        let xp = format!("joint_blocks.{i}.x_block");
        let cp = format!("joint_blocks.{i}.context_block");
        let modulation = |prefix: &str, n: usize| {
            linear_named(
                &self.params,
                &format!("{prefix}.adaLN_modulation.1"),
                silu_c,
            )
            .chunk(n, -1)
        };

        let cm = modulation(&cp, if pre_only { 2 } else { 6 });
        let (cq, ck, cv) = self.qkv(
            &format!("{cp}.attn"),
            &adaln_modulate(ctx, &cm[0], &cm[1], LN_EPS),
        );
        let xm = modulation(&xp, if dual { 9 } else { 6 });
        let (xq, xk, xv) = self.qkv(
            &format!("{xp}.attn"),
            &adaln_modulate(x, &xm[0], &xm[1], LN_EPS),
        );
        let (oc, ox) = joint_attention(&cq, &ck, &cv, &xq, &xk, &xv);

        let mut xn = gated_residual(x, &xm[2], &self.proj(&format!("{xp}.attn"), &ox));
        if dual {
            let (q2, k2, v2) = self.qkv(
                &format!("{xp}.attn2"),
                &adaln_modulate(x, &xm[6], &xm[7], LN_EPS),
            );
            let &[b, _, heads, hd] = q2.shape() else {
                unreachable!()
            };
            let none = Var::constant(Tensor::zeros(&[b, 0, heads, hd]));
            let (_, o2) = joint_attention(&none, &none, &none, &q2, &k2, &v2);
            xn = gated_residual(&xn, &xm[8], &self.proj(&format!("{xp}.attn2"), &o2));
        }
        let xn = gated_residual(
            &xn,
            &xm[5],
            &self.mlp(&xp, &adaln_modulate(&xn, &xm[3], &xm[4], LN_EPS)),
        );
        if pre_only {
            return (xn, ctx.clone());
        }
        let cn = gated_residual(ctx, &cm[2], &self.proj(&format!("{cp}.attn"), &oc));
        let cn = gated_residual(
            &cn,
            &cm[5],
            &self.mlp(&cp, &adaln_modulate(&cn, &cm[3], &cm[4], LN_EPS)),
        );
        (xn, cn)
    }
}
