#!/usr/bin/env python3
"""Decodes latents into PNGs with an SD3-family VAE: the `latents.safetensors` that
`advdmd sample --checkpoint CHECKPOINT --data DIR` writes, or a data shard of tools/precompute.py
(to look at what a distillation trains on). Latents are as the transformer sees them, so
x = VAE_dec(latents / scaling_factor + shift_factor).

    python3 tools/decode.py --model stabilityai/stable-diffusion-3.5-medium \
        --latents samples/latents.safetensors --out samples/png

Writes OUT/NNNNN.png and OUT/manifest.jsonl ({"file", "caption"} when the file holds captions).
Needs torch, diffusers, safetensors and Pillow.
"""

import argparse
import json
import os
import pathlib
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="SD3 / SD3.5 diffusers pipeline (folder or hub id) with a vae/")
    ap.add_argument("--latents", required=True, help="a safetensors file with `latents [n, C, H, W]`")
    ap.add_argument("--out", required=True, help="folder for the PNGs")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image
    from safetensors import safe_open

    with safe_open(args.latents, framework="pt") as f:
        if "latents" not in f.keys():
            sys.exit(f"{args.latents}: no `latents` tensor")
        latents = f.get_tensor("latents").to(torch.float32)
        captions = json.loads((f.metadata() or {}).get("advdmd.captions", "null"))
    if latents.ndim != 4:
        sys.exit(f"{args.latents}: latents of shape {tuple(latents.shape)}, not [n, C, H, W]")
    if captions is not None and len(captions) != latents.shape[0]:
        sys.exit(f"{args.latents}: {len(captions)} captions for {latents.shape[0]} latents")
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", torch_dtype=torch.float32)
    vae = vae.to(args.device).eval()
    if vae.config.latent_channels != latents.shape[1]:
        sys.exit(f"the VAE takes {vae.config.latent_channels} channels, the latents have {latents.shape[1]}")
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    scale = float(vae.config.scaling_factor)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    with torch.no_grad():
        for b in range(0, latents.shape[0], args.batch):
            z = latents[b:b + args.batch].to(args.device) / scale + shift
            x = vae.decode(z).sample.clamp(-1, 1)
            pixels = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for j, image in enumerate(pixels):
                i = b + j
                name = f"{i:05d}.png"
                tmp = out / f".{name}.tmp"
                Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
                os.replace(tmp, out / name)
                record = {"file": name}
                if captions is not None:
                    record["caption"] = captions[i]
                lines.append(json.dumps(record))
    (out / "manifest.jsonl").write_text("".join(line + "\n" for line in lines))
    print(f"{len(lines)} images → {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
