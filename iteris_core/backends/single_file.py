"""Single-file Stable Diffusion checkpoints (SD1.x, SD2.x, SDXL) for the diffusers backend, offline.

diffusers' own ``from_single_file`` fetches configs and tokenizers from the Hub. Here the UNet and
text-encoder configs are read off the checkpoint's tensor shapes (so fine-tunes and pruned variants
with other widths load too), the weights are converted with diffusers' own LDM/OpenCLIP converters,
and the CLIP tokenizer (which no checkpoint contains) comes from a local folder: the one given,
``$ITERIS_CLIP_TOKENIZER``, or ComfyUI's bundled ``comfy/sd1_tokenizer`` when ComfyUI is present.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import IterisError
from ..lora_io import read_lora_file

UNET_PREFIX = "model.diffusion_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT_1 = "conditioner.embedders.0.transformer."
SDXL_TEXT_2 = "conditioner.embedders.1.model."


def detect_family(keys: set[str] | list[str]) -> str:
    keys = set(keys)
    if any(k.startswith(SDXL_TEXT_2) for k in keys):
        return "sdxl"
    if any(k.startswith(SD2_TEXT + "transformer.") for k in keys):
        return "sd2"
    if any(k.startswith(SD1_TEXT) for k in keys):
        return "sd1"
    raise IterisError("not an SD1.x/SD2.x/SDXL checkpoint: found none of the text encoder keys "
                      f"{SD1_TEXT}*, {SD2_TEXT}*, {SDXL_TEXT_2}* (a LoRA, a VAE, or another model family?)")


def _count(keys, pattern: str) -> int:
    return len({m[1] for k in keys if (m := re.match(pattern, k))})


def infer_unet_config(state: dict[str, torch.Tensor], family: str) -> dict:
    """diffusers UNet2DConditionModel config read off an LDM UNet's tensor shapes."""
    keys = [k[len(UNET_PREFIX):] for k in state if k.startswith(UNET_PREFIX)]
    if not keys:
        raise IterisError(f"the checkpoint has no UNet ({UNET_PREFIX}* keys)")
    w = lambda name: state[UNET_PREFIX + name]  # noqa: E731
    levels: list[list[tuple[int, int]]] = [[]]
    index = 1
    while any(k.startswith(f"input_blocks.{index}.") for k in keys):
        if f"input_blocks.{index}.0.op.weight" in keys:
            levels.append([])
        else:
            channels = w(f"input_blocks.{index}.0.out_layers.3.weight").shape[0]
            depth = _count(keys, rf"input_blocks\.{index}\.1\.transformer_blocks\.(\d+)\.")
            levels[-1].append((channels, depth))
        index += 1
    levels = [level for level in levels if level]
    per_level = {len(level) for level in levels}
    if len(per_level) != 1:
        raise IterisError(f"unusual UNet: levels have {sorted(per_level)} resnets each")
    channels = [level[0][0] for level in levels]
    depths = [level[0][1] for level in levels]
    context = next(w(k).shape[1] for k in keys if k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in keys if k.endswith("proj_in.weight"))
    config = dict(
        sample_size={"sd1": 64, "sd2": 96, "sdxl": 128}[family],
        in_channels=w("input_blocks.0.0.weight").shape[1], out_channels=w("out.2.weight").shape[0],
        block_out_channels=channels, layers_per_block=per_level.pop(), cross_attention_dim=context,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        transformer_layers_per_block=[max(d, 1) for d in depths],
        use_linear_projection=w(proj_in).dim() == 2,
        attention_head_dim=8 if family == "sd1" else [max(c // 64, 1) for c in channels],
    )
    middle_depth = _count(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    if middle_depth and middle_depth != config["transformer_layers_per_block"][-1]:
        raise IterisError("unusual UNet: its middle block depth differs from its last level's")
    if "label_emb.0.0.weight" in keys:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=w("label_emb.0.0.weight").shape[1])
    return config


def _text_config(state: dict[str, torch.Tensor], family: str, which: int):
    """transformers CLIPTextConfig of a checkpoint's (first or second) text encoder."""
    from transformers import CLIPTextConfig

    if family == "sd1" or (family == "sdxl" and which == 1):
        prefix = SD1_TEXT if family == "sd1" else SDXL_TEXT_1
        embedding = state[prefix + "text_model.embeddings.token_embedding.weight"]
        layers = _count(state, re.escape(prefix) + r"text_model\.encoder\.layers\.(\d+)\.")
        width = embedding.shape[1]
        inner = state[prefix + "text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
        return CLIPTextConfig(vocab_size=embedding.shape[0], hidden_size=width, intermediate_size=inner,
                              num_hidden_layers=layers, num_attention_heads=width // 64,
                              max_position_embeddings=state[prefix + "text_model.embeddings.position_embedding.weight"].shape[0],
                              hidden_act="quick_gelu", projection_dim=width, bos_token_id=49406, eos_token_id=49407,
                              pad_token_id=49407)
    prefix = SD2_TEXT if family == "sd2" else SDXL_TEXT_2
    embedding = state[prefix + "token_embedding.weight"]
    layers = _count(state, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    width = embedding.shape[1]
    return CLIPTextConfig(vocab_size=embedding.shape[0], hidden_size=width, intermediate_size=4 * width,
                          num_hidden_layers=layers - 1 if family == "sd2" else layers,   # SD2 drops the last layer
                          num_attention_heads=width // 64, max_position_embeddings=state[prefix + "positional_embedding"].shape[0],
                          hidden_act="gelu", projection_dim=width, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)


def _load_text_model(model, weights: dict[str, torch.Tensor], what: str):
    """Load converted text weights, whichever transformers spelling (``text_model.`` or not) the
    installed version's module uses."""
    own = set(model.state_dict())
    if not any(k.startswith("text_model.") for k in own):
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    weights = {k: v for k, v in weights.items() if k in own}
    missing = sorted(own - set(weights) - {"text_model.embeddings.position_ids", "embeddings.position_ids"})
    if missing:
        raise IterisError(f"{what}: the checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")
    model.load_state_dict(weights, strict=False)
    return model.eval()


def find_clip_tokenizer(explicit: str | os.PathLike | None = None) -> Path:
    """A local folder with a CLIP BPE tokenizer (vocab.json + merges.txt)."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get("ITERIS_CLIP_TOKENIZER"):
        candidates.append(Path(os.environ["ITERIS_CLIP_TOKENIZER"]))
    spec = importlib.util.find_spec("comfy")          # ComfyUI importable: its bundled CLIP vocabulary
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "sd1_tokenizer" for p in spec.submodule_search_locations]
    here = Path(__file__).resolve()
    candidates += [parent / "comfy" / "sd1_tokenizer" for parent in here.parents]     # pack inside ComfyUI
    env = Path(os.environ.get("ITERIS_ENV", Path.home() / ".cache" / "comfyui-iteris"))
    candidates.append(env / "ComfyUI" / "comfy" / "sd1_tokenizer")
    for folder in candidates:
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return folder
    raise IterisError("a single-file checkpoint carries no tokenizer: pass --tokenizer DIR (a CLIP tokenizer "
                      "folder with vocab.json and merges.txt, e.g. ComfyUI/comfy/sd1_tokenizer or a diffusers "
                      "model's tokenizer/ folder), or set ITERIS_CLIP_TOKENIZER")


def _is_v_prediction(state: dict[str, torch.Tensor], family: str) -> bool:
    """SD2-768 models predict v; ComfyUI tells them apart by this statistic of one norm bias."""
    if family != "sd2":
        return False
    bias = state.get(UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias")
    return bias is not None and float(torch.std(bias.float(), unbiased=False)) > 0.09


def load_single_file(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                     prediction_type: str | None = None) -> SimpleNamespace:
    """Build the parts of a pipeline a merge needs (UNet, text encoders, tokenizers, scheduler
    config) from a single-file checkpoint. Pickled checkpoints are refused."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_open_clip_checkpoint)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    state = read_lora_file(path, with_hash=False).tensors
    family = detect_family(state.keys())
    config = infer_unet_config(state, family)
    unet = UNet2DConditionModel(**config)
    converted = convert_ldm_unet_checkpoint(state, dict(unet.config))
    problems = unet.load_state_dict(converted, strict=False)
    if problems.missing_keys:
        raise IterisError(f"{Path(path).name}: the UNet lacks {len(problems.missing_keys)} weights after conversion, "
                          f"e.g. {problems.missing_keys[0]}")
    folder = find_clip_tokenizer(tokenizer)
    parts = SimpleNamespace(unet=unet.eval(), text_encoder_2=None, tokenizer_2=None)
    if family == "sd1":
        parts.text_encoder = _load_text_model(CLIPTextModel(_text_config(state, family, 1)),
                                              convert_ldm_clip_checkpoint(state), "text encoder")
        parts.tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    elif family == "sd2":
        model = CLIPTextModel(_text_config(state, family, 1))
        parts.text_encoder = _load_text_model(model, convert_open_clip_checkpoint(model, state, SD2_TEXT), "text encoder")
        parts.tokenizer = CLIPTokenizer.from_pretrained(str(folder), pad_token="!")
    else:
        parts.text_encoder = _load_text_model(CLIPTextModel(_text_config(state, family, 1)),
                                              convert_ldm_clip_checkpoint(state, SDXL_TEXT_1), "text encoder 1")
        model = CLIPTextModelWithProjection(_text_config(state, family, 2))
        parts.text_encoder_2 = _load_text_model(model, convert_open_clip_checkpoint(model, state, SDXL_TEXT_2),
                                                "text encoder 2")
        parts.tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        parts.tokenizer_2 = CLIPTokenizer.from_pretrained(str(folder), pad_token="!")
    prediction = prediction_type or ("v_prediction" if _is_v_prediction(state, family) else "epsilon")
    parts.scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                             prediction_type=prediction)
    parts.identity = f"{Path(path).name} ({family}, {prediction})"
    return parts
