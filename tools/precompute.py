#!/usr/bin/env python3
"""Precomputes what `advdmd distill --teacher CHECKPOINT --data DIR` reads: the VAE latents of
captioned images and their captions' text-encoder embeddings, with an SD3-family pipeline
(diffusers' StableDiffusion3Pipeline: two CLIP encoders and T5), so the distillation never loads a
VAE or a text encoder.

The folder it writes (src/data/latents.rs is the reader):
  shard-NNNNN.safetensors  latents [n, 16, H/8, W/8] = (VAE(x) - shift_factor) * scaling_factor,
                           context [n, 77 + T, 4096], pooled [n, 2048]; the captions as the JSON
                           list `advdmd.captions` in the metadata
  uncond.safetensors       context [1, 77 + T, 4096], pooled [1, 2048] of the empty prompt
                           (the unconditional branch of the teacher's CFG, as diffusers encodes it)
  precompute.json          the settings, for the record

Images come from --images (a folder) with captions from --captions (JSON lines
{"file": "relative/path.jpg", "caption": "..."}), or else from a `.txt` beside each image. Each
image is turned upright by its EXIF orientation, resized (shorter side to --resolution,
Lanczos) and centre-cropped to a square.

Shard i holds items [i*S, (i+1)*S) of the sorted list; a shard already written is skipped, so an
interrupted run resumes where it stopped (every file is written to a temporary name and renamed).

    python3 tools/precompute.py --model stabilityai/stable-diffusion-3.5-medium \
        --images photos/ --captions photos/captions.jsonl --resolution 512 --out data/

Needs torch, diffusers, transformers, sentencepiece, safetensors and Pillow. The writing helpers
(write_shard, write_uncond) need only safetensors and numpy (or torch).
"""

import argparse
import json
import os
import pathlib
import sys

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def _save(tensors, path, metadata=None):
    """Writes `tensors` (all numpy arrays or all torch tensors) to `path` atomically."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if all(type(t).__module__ == "numpy" for t in tensors.values()):
        from safetensors.numpy import save_file
    else:
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        # safetensors creates its files 0600; a data folder is read by other users' runs
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_shard(path, latents, context, pooled, captions=None):
    """One shard: latents [n, C, H, W], context [n, L, D], pooled [n, P] (f32, f16 or bf16),
    and n captions (or None)."""
    n = latents.shape[0]
    if (
        len(latents.shape) != 4
        or len(context.shape) != 3
        or len(pooled.shape) != 2
        or context.shape[0] != n
        or pooled.shape[0] != n
        or (captions is not None and len(captions) != n)
    ):
        raise ValueError(
            f"{path}: a shard takes latents [n, C, H, W], context [n, L, D], pooled [n, P] and n "
            f"captions; got {tuple(latents.shape)}, {tuple(context.shape)}, {tuple(pooled.shape)}"
        )
    metadata = None if captions is None else {"advdmd.captions": json.dumps(list(captions))}
    _save({"latents": latents, "context": context, "pooled": pooled}, path, metadata)


def write_uncond(folder, context, pooled):
    """The empty prompt's context [1, L, D] and pooled [1, P] as FOLDER/uncond.safetensors."""
    _save({"context": context, "pooled": pooled}, pathlib.Path(folder) / "uncond.safetensors")


def list_items(images, captions_file):
    """Sorted (image path, caption) pairs."""
    images = pathlib.Path(images)
    items = []
    if captions_file:
        with open(captions_file, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    items.append((images / record["file"], str(record["caption"])))
                except (ValueError, KeyError, TypeError) as e:
                    sys.exit(f"{captions_file}:{number}: not a {{\"file\", \"caption\"}} record ({e})")
    else:
        for path in sorted(images.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                text = path.with_suffix(".txt")
                if not text.is_file():
                    sys.exit(f"{path}: no caption {text.name} beside it (or pass --captions)")
                items.append((path, text.read_text(encoding="utf-8").strip()))
    missing = [str(p) for p, _ in items if not p.is_file()]
    if missing:
        sys.exit(f"{len(missing)} images not found, the first: {missing[0]}")
    if not items:
        sys.exit(f"{images}: no images")
    return sorted(items, key=lambda item: str(item[0]))


def load_image(path, resolution):
    """RGB in [-1, 1] as a float32 array [3, R, R]: shorter side to R, centre crop."""
    import numpy as np
    from PIL import Image, ImageOps

    try:
        im = Image.open(path)
        im.load()
    except OSError as e:
        sys.exit(f"{path}: not a readable image ({e}); nothing was written for its shard")
    with im:
        # upright as a viewer shows it: a camera's portrait photo is stored sideways + an EXIF tag
        im = ImageOps.exif_transpose(im).convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.LANCZOS)
        w, h = im.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        x = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return x.transpose(2, 0, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="SD3 / SD3.5 diffusers pipeline (folder or hub id)")
    ap.add_argument("--images", required=True, help="folder of images")
    ap.add_argument("--captions", help="JSON lines {\"file\", \"caption\"} (default: a .txt beside each image)")
    ap.add_argument("--out", required=True, help="data folder to write")
    ap.add_argument("--resolution", type=int, default=512, help="square image side (a multiple of 16)")
    ap.add_argument("--shard-size", type=int, default=1024, help="samples a shard")
    ap.add_argument("--batch", type=int, default=8, help="images a VAE / text-encoder call")
    ap.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens (SD3: 256)")
    ap.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16",
                    help="the text encoders' compute dtype and the stored embeddings' (the VAE runs in f32)")
    ap.add_argument("--vae-sample", action="store_true",
                    help="sample the VAE posterior (seeded by --seed and the shard) instead of taking its mean")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.resolution <= 0 or args.resolution % 16:
        sys.exit("--resolution must be a positive multiple of 16 (VAE stride 8, patch 2)")
    if args.shard_size <= 0 or args.batch <= 0:
        sys.exit("--shard-size and --batch must be positive")

    import numpy as np
    import torch
    from diffusers import StableDiffusion3Pipeline

    items = list_items(args.images, args.captions)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    pipe = StableDiffusion3Pipeline.from_pretrained(args.model, transformer=None, torch_dtype=dtype)
    pipe = pipe.to(args.device)
    vae = pipe.vae.to(torch.float32)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    scale = float(vae.config.scaling_factor)

    @torch.no_grad()
    def encode(prompts):
        context, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=args.device,
            num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=args.max_sequence_length,
        )
        return context.to(dtype), pooled.to(dtype)

    @torch.no_grad()
    def latents_of(paths, generator):
        x = torch.from_numpy(np.stack([load_image(p, args.resolution) for p in paths]))
        posterior = vae.encode(x.to(args.device)).latent_dist
        z = posterior.sample(generator) if args.vae_sample else posterior.mode()
        return ((z - shift) * scale).to(torch.float32)

    context, pooled = encode([""])
    write_uncond(out, context, pooled)
    shards = (len(items) + args.shard_size - 1) // args.shard_size
    for i in range(shards):
        path = out / f"shard-{i:05d}.safetensors"
        part = items[i * args.shard_size:(i + 1) * args.shard_size]
        if path.exists():
            print(f"{path.name}: exists, skipped", file=sys.stderr)
            continue
        # one seed a shard: a resumed run samples the posterior as an uninterrupted one
        generator = torch.Generator(args.device).manual_seed(args.seed * 1_000_003 + i)
        lat, ctx, pool = [], [], []
        for b in range(0, len(part), args.batch):
            chunk = part[b:b + args.batch]
            lat.append(latents_of([p for p, _ in chunk], generator).cpu())
            c, p = encode([caption for _, caption in chunk])
            ctx.append(c.cpu())
            pool.append(p.cpu())
        write_shard(path, torch.cat(lat), torch.cat(ctx), torch.cat(pool), [c for _, c in part])
        print(f"{path.name}: {len(part)} samples ({i + 1}/{shards})", file=sys.stderr)
    record = {k: v for k, v in vars(args).items()}
    record.update(samples=len(items), shift_factor=shift, scaling_factor=scale)
    tmp = out / ".precompute.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out / "precompute.json")
    print(f"{out}: {len(items)} samples in {shards} shards", file=sys.stderr)


if __name__ == "__main__":
    main()
