#!/usr/bin/env python3
"""Checks what tools/precompute.py and tools/decode.py wrote from tiny_sd3.py's pipeline and
images (tests/python_tools.rs runs it), against the pipeline's own components called directly.

    check_tools.py precompute PIPELINE_DIR IMAGES_DIR DATA_DIR
        the latents are (VAE mean - shift) * scale of each image (upright by its EXIF orientation,
        centre-cropped),
        each row's context and pooled embedding are its caption's, encoded alone, in file order,
        the context holds CLIP's tokens (zero-padded to T5's width) and then T5's, the empty
        prompt's are in uncond.safetensors, files are readable as the umask allows
    check_tools.py decode PIPELINE_DIR IMAGES_DIR PNG_DIR
        decode.py's PNGs of the first shard are the VAE's reconstruction of the images, within one
        level of 255: decode inverts precompute's shift and scale

    check_tools.py model PIPELINE_DIR IMAGES_DIR MODEL_DIR
        a distilled generator (`distill --data`'s OUT/model, diffusers layout) loads into
        diffusers' SD3Transformer2DModel with no key missing, unexpected or misshapen, with the
        teacher's configuration (sample_size included), and samples in StableDiffusion3Pipeline
        given advdmd.json's `diffusers_sigmas`, which its scheduler turns into the generator's
        own sigmas, to finite latents

    check_tools.py replay PIPELINE_DIR IMAGES_DIR SAMPLES_DIR DATA_DIR
        `advdmd sample --data`'s latents (CPU, f32) are what StableDiffusion3Pipeline samples with
        the same model (its manifest's: the teacher's folder or a distilled OUT/model), from the
        same starting noise (latents.safetensors' `noise`) and the data's embeddings, with the
        same steps and CFG weight (the empty prompt's embeddings as the negative ones): relative
        L2 of every sample's latents below 1e-4

    check_tools.py single-file PIPELINE_DIR IMAGES_DIR FILE
        an original-layout file (`advdmd convert --layout original` of the pipeline's transformer)
        loads with diffusers' single-file loader into exactly the pipeline's transformer weights

Prints one `ok` line a check; an assertion names what differs.
"""

import json
import os
import pathlib
import sys

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open


def load(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def pixels(path):
    """The image as precompute should see it at 64 px: [-1, 1], [3, 64, 64], upright by its EXIF
    orientation, centre-cropped."""
    from PIL import ImageOps

    a = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"), dtype=np.float32)
    assert a.shape[0] == 64, f"{path}: not 64 px high upright"
    left = (a.shape[1] - 64) // 2
    return torch.from_numpy(a[:, left:left + 64] / 127.5 - 1.0).permute(2, 0, 1)


def close(name, got, want, atol):
    err = (got.float() - want.float()).abs().max().item()
    assert err <= atol, f"{name}: max abs error {err} > {atol}"


def main():
    from diffusers import StableDiffusion3Pipeline

    mode, pipe_dir, images, out = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3]), pathlib.Path(sys.argv[4])
    pipe = StableDiffusion3Pipeline.from_pretrained(pipe_dir, transformer=None, torch_dtype=torch.float32)
    vae = pipe.vae
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    files = sorted(images.glob("*.png"))
    torch.set_grad_enabled(False)

    if mode == "model":
        from diffusers import SD3Transformer2DModel

        model, info = SD3Transformer2DModel.from_pretrained(out, output_loading_info=True)
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
            assert not info[kind], f"{kind}: {info[kind]}"
        teacher = json.loads((pathlib.Path(pipe_dir) / "transformer" / "config.json").read_text())
        mine = json.loads((out / "config.json").read_text())
        differ = {k: (mine.get(k), v) for k, v in teacher.items() if not k.startswith("_") and mine.get(k) != v}
        assert not differ, f"config.json differs from the teacher's: {differ}"
        print(f"ok: {out.name} loads in diffusers with every key, the teacher's configuration")
        schedule = json.loads((out / "advdmd.json").read_text())
        pipe.transformer = model
        latents = pipe(prompt="a red circle", num_inference_steps=schedule["steps"],
                       sigmas=schedule["diffusers_sigmas"], guidance_scale=1.0, max_sequence_length=8,
                       height=64, width=64, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images
        assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all(), latents.shape
        ran = pipe.scheduler.sigmas.tolist()
        assert max(abs(a - b) for a, b in zip(ran, schedule["sigmas"])) < 1e-6 and len(ran) == len(schedule["sigmas"]), \
            f"the pipeline ran sigmas {ran}, the generator's are {schedule['sigmas']}"
        print(f"ok: StableDiffusion3Pipeline samples with it at the generator's sigmas {schedule['sigmas']}")
        return

    if mode == "single-file":
        from diffusers import SD3Transformer2DModel

        want = SD3Transformer2DModel.from_pretrained(pathlib.Path(pipe_dir) / "transformer").state_dict()
        got = SD3Transformer2DModel.from_single_file(str(out), config=pipe_dir, subfolder="transformer").state_dict()
        assert set(got) == set(want), f"keys differ: {sorted(set(got) ^ set(want))}"
        for key, value in want.items():
            assert torch.equal(got[key], value), f"{key} differs"
        print(f"ok: {out.name} loads with from_single_file into the pipeline's {len(want)} transformer tensors")
        return

    if mode == "replay":
        from diffusers import SD3Transformer2DModel

        data = pathlib.Path(sys.argv[5])
        mine, _ = load(out / "latents.safetensors")
        rows = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
        shards = [load(s)[0] for s in sorted(data.glob("shard-*.safetensors"))]
        context = torch.cat([t["context"] for t in shards])
        pooled = torch.cat([t["pooled"] for t in shards])
        uncond, _ = load(data / "uncond.safetensors")
        model_dir = pathlib.Path(rows[0]["model"])
        pipe.transformer = SD3Transformer2DModel.from_pretrained(model_dir)
        schedule = {}
        if (model_dir / "advdmd.json").is_file():
            schedule["sigmas"] = json.loads((model_dir / "advdmd.json").read_text())["diffusers_sigmas"]
        worst = 0.0
        for k, row in enumerate(rows):
            assert row["sampler"] == "euler" and row["shift"] == pipe.scheduler.config.shift, row
            cfg = row["cfg"]
            extra = dict(negative_prompt_embeds=uncond["context"], negative_pooled_prompt_embeds=uncond["pooled"]) if cfg != 1 else {}
            got = pipe(prompt_embeds=context[row["sample"]][None], pooled_prompt_embeds=pooled[row["sample"]][None],
                       latents=mine["noise"][k][None], num_inference_steps=row["steps"], guidance_scale=cfg,
                       output_type="latent", **schedule, **extra).images[0]
            err = ((got - mine["latents"][k]).norm() / mine["latents"][k].norm()).item()
            worst = max(worst, err)
            assert err < 1e-4, f"sample {k}: relative L2 {err} between advdmd's and diffusers' latents"
        print(f"ok: {len(rows)} samples of {model_dir.name} ({rows[0]['steps']} steps, cfg {rows[0]['cfg']}) "
              f"are diffusers' from the same noise: worst relative L2 {worst:.1e}")
        return

    if mode == "decode":
        lines = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
        for i, record in enumerate(lines):
            x = pixels(files[i])[None]
            want = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
            want = ((want + 1) * 127.5)[0].permute(1, 2, 0).numpy()
            got = np.asarray(Image.open(out / record["file"]), dtype=np.float32)
            err = np.abs(got - want).max()
            assert err <= 1.0, f"{record['file']}: {err} levels from the VAE's reconstruction of {files[i].name}"
            assert record["caption"] == (images / f"img{i}.txt").read_text().strip(), record
        print(f"ok: {len(lines)} decoded images are the VAE's reconstructions")
        return

    captions = [(images / f.with_suffix(".txt").name).read_text().strip() for f in files]
    shards = sorted(out.glob("shard-*.safetensors"))
    rows = [load(s) for s in shards]
    latents = torch.cat([t["latents"] for t, _ in rows])
    context = torch.cat([t["context"] for t, _ in rows])
    pooled = torch.cat([t["pooled"] for t, _ in rows])
    stored = [c for _, m in rows for c in json.loads(m["advdmd.captions"])]
    assert stored == captions, f"captions {stored} != {captions}"
    print(f"ok: {len(stored)} captions in file order over {len(shards)} shards")

    for i, f in enumerate(files):
        z = vae.encode(pixels(f)[None]).latent_dist.mode()
        close(f"latents of {f.name}", latents[i], ((z - shift) * scale)[0], 1e-4)
    print(f"ok: latents are (mean - {shift}) * {scale} of the upright, centre-cropped images")

    def encode(prompts):
        c, _, p, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device="cpu",
                                        do_classifier_free_guidance=False, max_sequence_length=8)
        return c, p

    for i, caption in enumerate(captions):
        c, p = encode([caption])
        close(f"context of {caption!r}", context[i], c[0], 1e-5)
        close(f"pooled of {caption!r}", pooled[i], p[0], 1e-5)
    print("ok: every row's context and pooled embedding are its caption's, encoded alone")

    clip_tokens = pipe.tokenizer.model_max_length
    clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert context.shape[1:] == (clip_tokens + 8, pipe.text_encoder_3.config.d_model), context.shape
    assert pooled.shape[1] == pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert torch.all(context[:, :clip_tokens, clip_width:] == 0), "CLIP's tokens not zero-padded to T5's width"
    assert torch.all(context[:, :clip_tokens, :clip_width].abs().sum(-1) > 0), "a CLIP token is empty"
    assert torch.all(context[:, clip_tokens:].abs().sum(-1) > 0), "a T5 token is empty"
    print(f"ok: context = {clip_tokens} CLIP tokens (width {clip_width}, zero-padded) then 8 T5 tokens")

    uncond, _ = load(out / "uncond.safetensors")
    c, p = encode([""])
    close("uncond context", uncond["context"], c, 1e-5)
    close("uncond pooled", uncond["pooled"], p, 1e-5)
    print("ok: uncond.safetensors is the empty prompt's")

    umask = os.umask(0)
    os.umask(umask)
    for path in sorted(out.iterdir()):
        mode = path.stat().st_mode & 0o777
        assert mode == 0o666 & ~umask, f"{path.name}: mode {oct(mode)}, the umask allows {oct(0o666 & ~umask)}"
    print("ok: every file's mode is the umask's")


if __name__ == "__main__":
    main()
