"""Every tiny randomly initialised model the demo and the tests use, written as the owning library saves it.

CLIP (open_clip checkpoint folder), a chat LLM (transformers), a captioner (BLIP), a teacher LLM and Stable
Diffusion 1.x/2.x and SDXL folders (diffusers layout), plus a tiny exported SURD dataset. Everything is built
from config objects; CLIP-style tokenizers come from open_clip's bundled BPE vocabulary (cut to its first merges so the
embedding table stays small). Nothing is downloaded. Images produced with these models are noise: they
exist to exercise the code paths, not to be looked at.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

import torch

# open_clip's BPE file: a header line, then merges in rank order (the same data as CLIP's merges.txt).
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (256 base symbols)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def clip_bpe(num_merges: int = 2000) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary and merges, truncated to the first `num_merges` merges (49152 - 258 is the full set)."""
    import open_clip

    path = Path(open_clip.__file__).parent / _BPE_FILE
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 1 + min(num_merges, 49152 - 256 - 2)]]
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def clip_tokenizer(num_merges: int = 2000, max_length: int = 77, **kwargs):  # -> transformers.CLIPTokenizer
    """An offline CLIP tokenizer from open_clip's bundled BPE vocabulary (kwargs: e.g. SDXL's pad_token="!")."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe(num_merges)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, **kwargs)


# What every tiny UNet shares: 16 x 16 latents of 4 channels, two resolutions, one layer each.
_TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  norm_num_groups=32)


def write_tiny_sd(out_dir: Path, text_dim: int = 768, seed: int = 0) -> Path:
    """Write a tiny random StableDiffusionPipeline folder. `text_dim` 768 is SD 1.x-shaped, 1024 SD 2.x-shaped."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sd2 = text_dim >= 1024
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_dim,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4 if text_dim % 4 == 0 else 1,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=32,
            hidden_act="gelu" if sd2 else "quick_gelu",
        )
    )
    unet = UNet2DConditionModel(
        **_TINY_UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
    )
    vae = _tiny_vae()
    # SD 1.5 and 2.x schedules; SD 2.x (768-v) predicts v, which exercises the v-prediction loss path.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir)
    return out_dir


def _tiny_vae():  # -> diffusers.AutoencoderKL
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )


def write_tiny_sdxl(out_dir: Path, text_dims: tuple[int, int] = (32, 32), seed: int = 0) -> Path:
    """Write a tiny random StableDiffusionXLPipeline folder: two text encoders (the second with a projection:
    the pooled `text_embeds`), a UNet with SDXL's text/time additional embedding, and SDXL's schedule."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with !

    def text_config(width: int) -> CLIPTextConfig:
        # Two layers: SDXL conditions on the penultimate hidden state.
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)

    text_encoder = CLIPTextModel(text_config(text_dims[0]))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(text_dims[1]))
    time_embed = 8
    unet = UNet2DConditionModel(
        **_TINY_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=sum(text_dims),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed,
        projection_class_embeddings_input_dim=6 * time_embed + 32,  # time ids + pooled text_embeds
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(vae=_tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir)
    return out_dir


def write_tiny_teacher(out_dir: Path, hidden_size: int = 32, seed: int = 0) -> Path:
    """A tiny random LlamaForCausalLM + the offline CLIP BPE tokenizer, loadable with from_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]
_SHAPES = ["circle", "square", "triangle"]


def write_tiny_dataset(run_dir: Path, n: int = 16, size: int = 40, test: int = 2, seed: int = 0) -> Path:
    """A small exported SURD dataset (`<run_dir>/surd/data/*.parquet`) of drawn shapes with both prompts."""
    import io
    import random

    from PIL import Image, ImageDraw

    from surd import layout
    from surd.schema import from_rows
    from surd.shards import write_table

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        colour, shape = _COLOURS[i % len(_COLOURS)], _SHAPES[(i // len(_COLOURS)) % len(_SHAPES)]
        image = Image.new("RGB", (size + rng.randint(0, 8), size), "white")
        draw = ImageDraw.Draw(image)
        x, y, r = rng.randint(2, size // 3), rng.randint(2, size // 3), rng.randint(size // 4, size // 2)
        if shape == "circle":
            draw.ellipse([x, y, x + r, y + r], fill=colour)
        elif shape == "square":
            draw.rectangle([x, y, x + r, y + r], fill=colour)
        else:
            draw.polygon([(x, y + r), (x + r, y + r), (x + r // 2, y)], fill=colour)
        buf = io.BytesIO()
        image.save(buf, "PNG")
        rows.append({
            "id": f"tiny:{i:04d}",
            "source": "tiny",
            "image": {"bytes": buf.getvalue(), "path": None},
            "width": image.width,
            "height": image.height,
            "keyword_prompt": f"{colour} {shape}, centered, masterpiece, best quality, highly detailed, 8k",
            "narrative_prompt": f"a {colour} {shape} on a white background",
            "split": "test" if i >= n - test else "train",
        })
    path = layout.dataset_data_dir(run_dir) / "train-00000-of-00001.parquet"
    write_table(path, from_rows(rows))
    return Path(run_dir)


def write_tiny_world(root: Path, *, text_dim: int = 32, n: int = 14) -> dict[str, Path]:
    """A tiny SD stack, a tiny teacher LLM and a tiny SURD run folder under `root` (tests, benchmarks)."""
    root = Path(root)
    return {
        "sd": write_tiny_sd(root / "sd", text_dim=text_dim),
        "llm": write_tiny_teacher(root / "llm"),
        "run": write_tiny_dataset(root / "run", n=n),
        "root": root,
    }


def write_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random open_clip model as a local checkpoint folder (open_clip_config.json + safetensors).

    It loads through the same `local-dir:` code path as a real checkpoint folder downloaded from the Hub.
    """
    import open_clip
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    preprocess_cfg = {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                      "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                      "resize_mode": "shortest"}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg},
                                                          indent=2))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return out


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_llm(out_dir: str | Path, seed: int = 0, init_std: float = 0.02) -> Path:
    """A tiny random LlamaForCausalLM plus a byte-level BPE tokenizer with a chat template, all offline.

    A larger `init_std` gives peakier logits, so greedy outputs vary with the input (tests of exactness).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [(resources.files("surd") / "templates" / f"{t}.yaml").read_text()
              for t in ("rewrite-v1", "caption-rewrite-v1")]
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<|im_end|>",
                                        bos_token="<|im_start|>", chat_template=CHATML)
    tokenizer.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        initializer_range=init_std,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


TINY_WORDS = ("a an the of in on with and is are two three man woman girl boy cat dog car tree house city "
              "street garden beach sky red blue green yellow black white standing sitting running sleeping "
              "photo picture painting at night day sunset").split()


def write_tiny_captioner(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random BLIP captioner with a word-level BERT vocabulary, written without any download."""
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *TINY_WORDS]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}, bos_token="[DEC]")
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    processor.save_pretrained(out)
    config = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "encoder_hidden_size": 32, "max_position_embeddings": 64,
                     "bos_token_id": vocab.index("[DEC]"), "sep_token_id": vocab.index("[SEP]"),
                     "eos_token_id": vocab.index("[SEP]"), "pad_token_id": 0},
        projection_dim=32,
    )
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).save_pretrained(out)
    return out
