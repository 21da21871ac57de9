#!/usr/bin/env python3
"""Writes a tiny SD3.5-family diffusers pipeline with random weights, and captioned images, for
the tests of tools/precompute.py and tools/decode.py (tests/python_tools.rs) on a CPU.

    tiny_sd3.py PIPELINE_DIR IMAGES_DIR

Every component is what StableDiffusion3Pipeline loads for a real checkpoint (two CLIP text
encoders with projections, T5, their tokenizers, a 16x-smaller AutoencoderKL with SD3's shift and
scale, the flow-matching scheduler), only small. The transformer has the configuration of
../shared/fixtures/mmdit/sd35m_tiny (MMDiT-X blocks 0 and 1, RMS q/k norms), so the widths line
up: CLIP hidden states 8 + 8 padded to T5's 24 (`joint_attention_dim`), pooled projections
10 + 10 (`pooled_projection_dim` 20), 4 latent channels.

CLIP's tokenizers stop at CLIP_TOKENS (77 in SD3's), so the context is [CLIP_TOKENS + T, 24].

The images: five PNGs with a caption in a .txt beside each — three 64x64, one 96x64 (its centre
crop is what a precompute at 64 px encodes), one stored 64x96 with an EXIF orientation that shows
it 96x64 (a camera's portrait photo: upright first, then cropped) — and captions.jsonl listing the
same pairs.
"""

import json
import pathlib
import sys

import numpy as np
import torch
from PIL import Image

# CLIP's context length (77 in SD3's tokenizers): short, so the emulated distillation of the tests
# attends over few text tokens; the layout (CLIP's tokens, then T5's) is the same.
CLIP_TOKENS = 8


def byte_chars():
    """GPT-2's printable stand-ins for the 256 bytes (CLIP's byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {}
    for c in byte_chars():
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_TOKENS), len(vocab)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,":
        pieces += [(c, -3.0), ("▁" + c, -2.5)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512), len(pieces)


def clip_encoder(vocab, hidden, seed):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=10,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_TOKENS,
        hidden_act="gelu", bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
    )
    return CLIPTextModelWithProjection(config).eval()


def main():
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import T5Config, T5EncoderModel

    pipe_dir, images = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    tokenizer, clip_vocab = clip_tokenizer()
    tokenizer_3, t5_vocab = t5_tokenizer()
    torch.manual_seed(3)
    t5 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab, d_model=24, d_kv=8, d_ff=32, num_layers=2, num_heads=3,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
    )).eval()
    torch.manual_seed(4)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    torch.manual_seed(5)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
        pooled_projection_dim=20, out_channels=4, pos_embed_max_size=16,
        dual_attention_layers=(0, 1), qk_norm="rms_norm",
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip_encoder(clip_vocab, 8, 1), tokenizer=tokenizer,
        text_encoder_2=clip_encoder(clip_vocab, 8, 2), tokenizer_2=tokenizer,
        text_encoder_3=t5, tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(pipe_dir)

    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    captions = ["a red circle", "two blue squares", "a green triangle above a square",
                "an empty canvas", "three small dots, left"]
    records = []
    for i, caption in enumerate(captions):
        size = {3: (64, 96), 4: (96, 64)}.get(i, (64, 64))
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        name = f"img{i}.png"
        exif = Image.Exif()
        if i == 3:
            exif[0x0112] = 6  # orientation: stored sideways, shown turned 90° clockwise (96x64)
        Image.fromarray(pixels).save(images / name, exif=exif)
        (images / f"img{i}.txt").write_text(caption + "\n")
        records.append({"file": name, "caption": caption})
    (images / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    main()
