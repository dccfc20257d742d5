"""A diffusers Stable Diffusion 1.x folder written back as one original-layout checkpoint (`.safetensors`), the
form most people have SD 1.5 in (`v1-5-pruned-emaonly.safetensors`). Tests and the demo use it on the tiny
models to exercise `--base FILE` offline; the key names are the inverse of diffusers' own single-file conversion
(`diffusers.loaders.single_file_utils`), for any number of blocks and layers per block.

    diffusers folder                    single file
    unet/                               model.diffusion_model.{input_blocks,middle_block,output_blocks,...}
    vae/                                first_stage_model.{encoder,decoder,quant_conv,post_quant_conv}
    text_encoder/ (CLIPTextModel)       cond_stage_model.transformer.text_model.*
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

# diffusers resnet names -> the original ResBlock's
_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_VAE_ATTENTION = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out.")]


def _resnet(rest: str) -> str:
    for ours, theirs in _RESNET:
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    return rest


def unet_key(key: str, config: dict[str, Any]) -> str:
    """A diffusers UNet2DConditionModel key as the original UNetModel names it."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in top:
        return top[key]
    n = config["layers_per_block"] + 1  # the original counts each block's layers plus its down/upsampler
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", key):
        block, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if part == "downsamplers":
            return f"input_blocks.{n * (block + 1)}.0.op.{rest.removeprefix('conv.')}"
        index = n * block + j + 1
        return f"input_blocks.{index}.0.{_resnet(rest)}" if part == "resnets" else f"input_blocks.{index}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", key):
        block, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if part == "upsamplers":
            with_attention = "CrossAttn" in config["up_block_types"][block]
            return f"output_blocks.{n * block + n - 1}.{2 if with_attention else 1}.{rest}"
        index = n * block + j
        return f"output_blocks.{index}.0.{_resnet(rest)}" if part == "resnets" else f"output_blocks.{index}.1.{rest}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        part, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * j}.{_resnet(rest)}" if part == "resnets" else f"middle_block.1.{rest}"
    raise ValueError(f"no original name for UNet key {key}")


def vae_key(key: str, config: dict[str, Any]) -> str:
    """A diffusers AutoencoderKL key as the original AutoencoderKL names it."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = {**DIFFUSERS_TO_LDM_MAPPING["vae"], "quant_conv.weight": "quant_conv.weight",
           "quant_conv.bias": "quant_conv.bias", "post_quant_conv.weight": "post_quant_conv.weight",
           "post_quant_conv.bias": "post_quant_conv.bias"}
    if key in top:
        return top[key]
    blocks = len(config["up_block_types"])
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.*)", key):
        if m[3] is None:
            return f"encoder.down.{m[1]}.downsample.{m[4]}"
        return f"encoder.down.{m[1]}.block.{m[3]}.{m[4].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", key):
        block = blocks - 1 - int(m[1])  # the original numbers up blocks from the bottom
        if m[3] is None:
            return f"decoder.up.{block}.upsample.{m[4]}"
        return f"decoder.up.{block}.block.{m[3]}.{m[4].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        rest = m[2]
        for ours, theirs in _VAE_ATTENTION:
            rest = rest.replace(ours, theirs) if rest.startswith(ours) else rest
        return f"{m[1]}.mid.attn_1.{rest}"
    raise ValueError(f"no original name for VAE key {key}")


def write_single_file(sd_dir: Path, out: Path) -> Path:
    """Write the SD 1.x folder `sd_dir` (CLIP text encoder) as one original-layout `.safetensors` file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    sd_dir = Path(sd_dir)
    unet = UNet2DConditionModel.from_pretrained(sd_dir / "unet")
    vae = AutoencoderKL.from_pretrained(sd_dir / "vae")
    text = CLIPTextModel.from_pretrained(sd_dir / "text_encoder")
    state: dict[str, torch.Tensor] = {}
    unet_config = json.loads((sd_dir / "unet" / "config.json").read_text())
    for key, value in unet.state_dict().items():
        state["model.diffusion_model." + unet_key(key, unet_config)] = value
    vae_config = json.loads((sd_dir / "vae" / "config.json").read_text())
    for key, value in vae.state_dict().items():
        name = "first_stage_model." + vae_key(key, vae_config)
        # the original's VAE attention projections are 1x1 convolutions
        state[name] = value[:, :, None, None] if ".mid.attn_1." in name and value.ndim == 2 else value
    for key, value in text.state_dict().items():  # transformers >= 5.6 leaves out the `text_model.` level
        state["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out
