#!/usr/bin/env python3
"""Writes MMDiT parity fixtures in the format of ../shared/fixtures/mmdit/README.md with diffusers'
SD3Transformer2DModel in float64 on the CPU, for the SD3-family configurations the shared fixture
(SD3.5-medium's: MMDiT-X blocks, RMS q/k norms, a square latent) does not cover:

  sd3m_tiny    SD3-medium's block: no q/k norm, no MMDiT-X block; a 6x10 latent (not square,
               smaller than the position table), batch 2, 7 text tokens
  sd35l_tiny   SD3.5-large's block: RMS q/k norms, no MMDiT-X block; an 8x8 latent filling
               the position table, batch 3, 5 text tokens

    make_mmdit_fixture.py OUT_DIR [NAME ...]     (default: every name; prints each folder)

Each OUT_DIR/NAME/ holds config.json, diffusers.safetensors, forward_backward.safetensors and
sampling.safetensors (the original layout is for the test to write: `advdmd convert`), and
sharded/: the same weights as diffusers' save_pretrained writes a large model (shards of at most
100 KB and their index). Every
parameter and the position table are drawn at random (no zero-initialised part hides a term).
"""

import json
import math
import pathlib
import sys

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from safetensors.torch import save_file

CONFIGS = {
    "sd3m_tiny": dict(
        config=dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                    num_attention_heads=3, joint_attention_dim=20, caption_projection_dim=24,
                    pooled_projection_dim=12, out_channels=4, pos_embed_max_size=12,
                    dual_attention_layers=(), qk_norm=None),
        batch=2, height=6, width=10, tokens=7, timesteps=[250.0, 875.0], seed=11),
    "sd35l_tiny": dict(
        config=dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=32,
                    pooled_projection_dim=10, out_channels=4, pos_embed_max_size=4,
                    dual_attention_layers=(), qk_norm="rms_norm"),
        batch=3, height=8, width=8, tokens=5, timesteps=[30.0, 500.0, 990.0], seed=12),
}
SHIFT = 3.0
STEPS = [1, 2, 4, 8, 28, 40]


def randomise(model, gen):
    """Every parameter and buffer drawn: weights ~ N(0, 1/fan_in), biases and norm offsets small."""
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / math.sqrt(fan_in))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def f32(tensors):
    return {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}


def write(out, name, spec):
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(spec["seed"])
    model = SD3Transformer2DModel(**spec["config"]).to(torch.float64)
    randomise(model, gen)
    model.eval()
    # the weights as stored (f32), and the model run on exactly those values
    weights = f32(model.state_dict())
    model.load_state_dict({k: v.to(torch.float64) for k, v in weights.items()})
    save_file(weights, str(folder / "diffusers.safetensors"))
    (folder / "config.json").write_text(json.dumps(spec["config"], indent=1))
    # the same weights as diffusers saves a large model: shards and their index
    sharded = SD3Transformer2DModel(**spec["config"])
    sharded.load_state_dict(weights)
    sharded.save_pretrained(folder / "sharded", max_shard_size="100KB")

    b, c = spec["batch"], spec["config"]["in_channels"]
    h, w, L = spec["height"], spec["width"], spec["tokens"]
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(torch.float32).to(torch.float64)
    x = rnd(b, c, h, w).requires_grad_()
    ctx = rnd(b, L, spec["config"]["joint_attention_dim"]).requires_grad_()
    pooled = rnd(b, spec["config"]["pooled_projection_dim"])
    t = torch.tensor(spec["timesteps"], dtype=torch.float64)
    out = model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
    seed = rnd(*out.shape)
    (out * seed).sum().backward()
    fb = {"hidden_states": x, "encoder_hidden_states": ctx, "pooled_projections": pooled,
          "timestep": t, "output": out, "grad_seed": seed, "grad_hidden_states": x.grad,
          "grad_encoder_hidden_states": ctx.grad}
    for key, p in model.named_parameters():
        fb[f"grad_param.{key}"] = p.grad
    save_file(f32(fb), str(folder / "forward_backward.safetensors"))

    sampling = {}
    for n in STEPS:
        sched = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
        sched.set_timesteps(n)
        sampling[f"sigmas_{n}"] = sched.sigmas
        sampling[f"timesteps_{n}"] = sched.timesteps
    sched = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    sched.set_timesteps(4)
    scale = 4.0
    lat = rnd(1, c, h, w)
    init = lat.clone()
    cond_ctx = torch.cat([ctx[:1].detach(), torch.zeros_like(ctx[:1])])
    cond_pooled = torch.cat([pooled[:1], torch.zeros_like(pooled[:1])])
    sigmas = sched.sigmas.to(torch.float64)
    with torch.no_grad():
        for i, ts in enumerate(sched.timesteps):
            v = model(hidden_states=torch.cat([lat, lat]), encoder_hidden_states=cond_ctx,
                      pooled_projections=cond_pooled, timestep=ts.to(torch.float64).repeat(2)).sample
            guided = v[1:] + scale * (v[:1] - v[1:])
            lat = lat + (sigmas[i + 1] - sigmas[i]) * guided
    sampling.update(cfg_init_latents=init, cfg_guidance_scale=torch.tensor([scale]), cfg_final_latents=lat)
    save_file(f32(sampling), str(folder / "sampling.safetensors"))
    print(f"{folder}: {sum(p.numel() for p in model.parameters())} parameters", file=sys.stderr)
    print(folder)


def main():
    out = pathlib.Path(sys.argv[1])
    names = sys.argv[2:] or list(CONFIGS)
    for name in names:
        if name not in CONFIGS:
            sys.exit(f"unknown fixture {name}: {', '.join(CONFIGS)}")
        write(out, name, CONFIGS[name])


if __name__ == "__main__":
    main()
