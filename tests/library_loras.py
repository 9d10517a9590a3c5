"""Genuine LoRA files written by the libraries that write them in the wild (LyCORIS, PEFT,
diffusers), each with an oracle taken from that library's own forward pass.

The oracle of a module is the change of its output that the library's adapted module makes,
turned into a dense weight delta by probing: for a linear layer, ``adapted(I) - base(I)`` is
``dW^T``; for a convolution, the same on one-hot patches. It does not depend on any formula of ours.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from iteris_core.layers import LayerInfo


@torch.no_grad()
def probe_delta(adapted, base, info: LayerInfo) -> torch.Tensor:
    """Dense delta (out x in·kh·kw) of ``adapted`` against ``base`` (two callables on the same layer)."""
    if info.kind != "conv":
        eye = torch.eye(info.in_features)
        return (adapted(eye) - base(eye)).T
    (kh, kw), (sh, sw), (ph, pw) = info.kernel, info.stride, info.padding
    # one-hot patches placed where output pixel (oh, ow) reads exactly them
    oh, ow = -(-ph // sh), -(-pw // sw)
    top, left = oh * sh - ph, ow * sw - pw
    patches = torch.eye(info.in_features * kh * kw).reshape(-1, info.in_features, kh, kw)
    field = F.pad(patches, [left, kw, top, kh])
    out = (adapted(field) - base(field))[:, :, oh, ow]
    return out.T.reshape(info.out_features, -1)


def randomise(parameters, seed: int, scale: float = 0.2) -> None:
    """Give every trainable adapter parameter a random value (fresh adapters start at zero output)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


# --- LyCORIS -------------------------------------------------------------------------------------

SD_PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""

def lycoris_file(pipe, folder: Path, algo: str, seed: int = 0, **options) -> tuple[Path, dict[str, tuple]]:
    """A LyCORIS network (kohya naming, as sd-scripts trains it) on copies of ``pipe``'s UNet and
    text encoder, with random weights, saved to safetensors. Returns the file and, per canonical
    layer name (``unet.…`` / ``text_encoder.…``), the (adapted, base) forward functions."""
    from lycoris.kohya import create_network

    unet, text_encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    preset = folder / "sd_preset.toml"      # lycoris' "full" also lists TimestepEmbedding twice for a diffusers UNet
    preset.write_text(SD_PRESET)
    network = create_network(1.0, options.pop("network_dim", 4), options.pop("network_alpha", 2), None,
                             text_encoder, unet, algo=algo, preset=str(preset), **options)
    network.apply_to(text_encoder, unet, apply_text_encoder=True, apply_unet=True)
    randomise([p for p in network.parameters() if p.requires_grad], seed)
    path = folder / f"lycoris_{algo}_{seed}.safetensors"
    network.save_weights(str(path), torch.float32, {})
    wrappers = {id(m.org_module[0]): m for m in network.unet_loras + network.text_encoder_loras}
    return path, {f"{component}.{_canonical_text_path(path_) if component == 'text_encoder' else path_}":
                  (wrappers[id(module)], wrappers[id(module)].org_forward)
                  for component, model in (("unet", unet), ("text_encoder", text_encoder))
                  for path_, module in model.named_modules() if id(module) in wrappers}


def _canonical_text_path(path: str) -> str:
    """transformers 5 names CLIPTextModel's layers ``encoder.…``; the canonical (and ComfyUI's) path
    is the transformers 4 ``text_model.encoder.…``."""
    return path if path.startswith("text_model.") else "text_model." + path


# --- PEFT and diffusers --------------------------------------------------------------------------

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def peft_models(pipe, seed: int = 0, text_encoders: tuple[str, ...] = ("text_encoder",), **config) -> dict:
    """Copies of ``pipe``'s UNet and text encoder(s) with a PEFT LoRA adapter (``config`` passed to
    ``LoraConfig``: ``use_rslora``, ``rank_pattern``, ``use_dora``, ...) whose weights are random."""
    from peft import LoraConfig

    options = {"r": 4, "lora_alpha": 8, **config}
    models = {"unet": copy.deepcopy(pipe.unet)}
    models["unet"].add_adapter(LoraConfig(target_modules=UNET_TARGETS, **options))
    for name in text_encoders:
        models[name] = copy.deepcopy(getattr(pipe, name))
        models[name].add_adapter(LoraConfig(target_modules=TEXT_TARGETS, **options))
    for offset, model in enumerate(models.values()):
        randomise([p for n, p in model.named_parameters() if "lora_" in n], seed + offset)
    return models


def peft_oracle(models: dict) -> dict[str, tuple]:
    """(adapted, base) forward functions of every PEFT-adapted layer, by canonical layer name."""
    from peft.tuners.lora import LoraLayer

    oracle = {}
    for component, model in models.items():
        for path, module in model.named_modules():
            if isinstance(module, LoraLayer):
                path = _canonical_text_path(path) if component.startswith("text_encoder") else path
                oracle[f"{component}.{path}"] = (module, module.base_layer)
    return oracle


def diffusers_file(pipe, models: dict, folder: Path) -> Path:
    """What diffusers' training scripts save: ``save_lora_weights`` with the adapters' metadata
    (``lora_alpha``, patterns, rsLoRA and DoRA flags travel in the safetensors header)."""
    from peft.utils import get_peft_model_state_dict

    layers = {f"{component}_lora_layers": get_peft_model_state_dict(model) for component, model in models.items()}
    metadata = {f"{component}_lora_adapter_metadata": model.peft_config["default"].to_dict()
                for component, model in models.items()}
    type(pipe).save_lora_weights(str(folder), safe_serialization=True, **layers, **metadata)
    return folder / "pytorch_lora_weights.safetensors"


def kohya_converted_file(diffusers_path: Path, folder: Path) -> Path:
    """What diffusers' DreamBooth scripts write with ``--output_kohya_format``."""
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(load_file(str(diffusers_path))))
    path = folder / "pytorch_lora_weights_kohya.safetensors"
    save_file(kohya, str(path))
    return path


def peft_pretrained_folder(model, folder: Path) -> Path:
    """``PeftModel.save_pretrained``: adapter_model.safetensors plus its adapter_config.json sidecar."""
    from peft import get_peft_model

    wrapped = get_peft_model(model, model.peft_config["default"]) if not hasattr(model, "save_pretrained_peft") else model
    wrapped.save_pretrained(str(folder))
    return folder / "adapter_model.safetensors"
