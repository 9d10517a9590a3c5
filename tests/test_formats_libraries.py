"""Genuine files from the libraries that write LoRAs in the wild (LyCORIS as sd-scripts uses it,
PEFT, diffusers' savers and its kohya converter) load as exactly what those libraries' own forward
passes do: every adapted layer is found, none is invented, and each dense delta matches the
library's output change to fp32 precision. The oracle is the library's forward pass, probed
(tests/library_loras.py), never a formula of ours."""

from __future__ import annotations

import pytest

from iteris_core.lora_normalize import load_lora
from library_loras import (TEXT_TARGETS, diffusers_file, kohya_converted_file, lycoris_file, peft_models, peft_oracle,
                           probe_delta, randomise)

pytest.importorskip("lycoris")
pytest.importorskip("peft")


def assert_matches(lora, oracle: dict, table, tolerance: float = 1e-5) -> None:
    assert set(lora.layers) == set(oracle), (
        f"missing: {sorted(set(oracle) - set(lora.layers))[:5]}, invented: {sorted(set(lora.layers) - set(oracle))[:5]}")
    assert not lora.skipped, lora.skipped
    for name, (adapted, base) in oracle.items():
        expected = probe_delta(adapted, base, table.layers[name])
        assert expected.norm() > 0, f"{name}: the library's adapter does nothing (the test would be vacuous)"
        error = float((lora.layers[name].dense() - expected).norm() / expected.norm())
        assert error < tolerance, f"{name}: relative error {error:.2e}"


LYCORIS_CASES = {
    "lora": ("lora", {}, ".lora_down.weight"),                         # LoRA on linear and LoCon on conv layers
    "locon-tucker": ("lora", {"use_tucker": True}, ".lora_mid.weight"),
    "loha": ("loha", {}, ".hada_w1_a"),
    "loha-tucker": ("loha", {"use_tucker": True}, ".hada_t1"),
    "lokr": ("lokr", {}, ".lokr_w2"),                                   # no factor split: alpha is ignored
    "lokr-split": ("lokr", {"factor": 4}, ".lokr_w2_a"),                # split factor: alpha / dim applies
    "lora-dora": ("lora", {"dora_wd": True}, ".dora_scale"),
    "loha-dora": ("loha", {"dora_wd": True}, ".dora_scale"),
}


@pytest.mark.parametrize("case", list(LYCORIS_CASES))
def test_lycoris_file_is_what_lycoris_computes(case, tiny_pipe, tiny_backend, tmp_path):
    from safetensors import safe_open

    algo, options, marker = LYCORIS_CASES[case]
    path, oracle = lycoris_file(tiny_pipe, tmp_path, algo, seed=7, **options)
    keys = list(safe_open(str(path), "pt").keys())
    assert any(k.endswith(marker) for k in keys), f"the file has no {marker} key: not the format meant"
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    assert any(tiny_backend.layer_table().layers[n].kind == "conv" for n in oracle), "no conv layer covered"
    table = tiny_backend.layer_table()
    assert_matches(load_lora(path, table, tiny_backend.base_weight), oracle, table, tolerance=5e-5)


PEFT_CASES = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "patterns": {"rank_pattern": {"to_q": 8, "fc1": 2}, "alpha_pattern": {"to_k": 3, "fc2": 16}},
    "dora": {"use_dora": True},
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_diffusers_file_is_what_peft_computes(case, tiny_pipe, tiny_backend, tmp_path):
    """``save_lora_weights`` with the adapters' metadata: alpha, patterns, rsLoRA and DoRA come from it."""
    models = peft_models(tiny_pipe, seed=11, **PEFT_CASES[case])
    path = diffusers_file(tiny_pipe, models, tmp_path)
    table = tiny_backend.layer_table()
    assert_matches(load_lora(path, table, tiny_backend.base_weight), peft_oracle(models), table)


def test_sdxl_diffusers_file_places_both_text_encoders(tiny_sdxl_pipe, tiny_sdxl_backend, tmp_path):
    models = peft_models(tiny_sdxl_pipe, seed=13, text_encoders=("text_encoder", "text_encoder_2"))
    path = diffusers_file(tiny_sdxl_pipe, models, tmp_path)
    table = tiny_sdxl_backend.layer_table()
    lora = load_lora(path, table, tiny_sdxl_backend.base_weight)
    assert {"unet", "text_encoder", "text_encoder_2"} <= lora.components()
    assert_matches(lora, peft_oracle(models), table)


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd1", "sdxl"])
def test_diffusers_kohya_conversion_is_what_peft_computes(sdxl, request, tmp_path):
    """``--output_kohya_format`` of diffusers' DreamBooth scripts (``lora_alpha = rank`` there: the
    converter writes alpha = rank whatever the adapter's alpha was)."""
    pipe = request.getfixturevalue("tiny_sdxl_pipe" if sdxl else "tiny_pipe")
    backend = request.getfixturevalue("tiny_sdxl_backend" if sdxl else "tiny_backend")
    encoders = ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",)
    models = peft_models(pipe, seed=17, text_encoders=encoders, r=4, lora_alpha=4)
    path = kohya_converted_file(diffusers_file(pipe, models, tmp_path), tmp_path)
    from safetensors import safe_open

    prefixes = {k.split("_", 2)[1] for k in safe_open(str(path), "pt").keys()}
    assert prefixes == ({"unet", "te1", "te2"} if sdxl else {"unet", "te1"})
    table = backend.layer_table()
    assert_matches(load_lora(path, table, backend.base_weight), peft_oracle(models), table)


def test_unprefixed_unet_adapter_file(tiny_pipe, tiny_backend, tmp_path):
    """``unet.save_lora_adapter``: UNet keys with no ``unet.`` prefix (diffusers' own pipeline loader
    silently loads nothing from it; ours places every key or says why)."""
    models = peft_models(tiny_pipe, seed=19, text_encoders=())
    models["unet"].save_lora_adapter(str(tmp_path / "adapter"))
    table = tiny_backend.layer_table()
    lora = load_lora(tmp_path / "adapter" / "pytorch_lora_weights.safetensors", table, tiny_backend.base_weight)
    assert_matches(lora, peft_oracle(models), table)


def test_peft_save_pretrained_folder_uses_its_sidecar_config(tiny_pipe, tiny_backend, tmp_path):
    """``PeftModel.save_pretrained``: ``base_model.model.*`` keys, alpha only in adapter_config.json."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(tiny_pipe.text_encoder),
                           LoraConfig(r=4, lora_alpha=12, target_modules=TEXT_TARGETS))
    randomise([p for n, p in model.named_parameters() if "lora_" in n], 23)
    model.save_pretrained(str(tmp_path / "peft"))
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    table = tiny_backend.layer_table()
    lora = load_lora(tmp_path / "peft" / "adapter_model.safetensors", table, tiny_backend.base_weight)
    assert_matches(lora, peft_oracle({"text_encoder": model.base_model.model}), table)


def test_the_oracle_sees_a_wrong_scale(tiny_pipe, tiny_backend, tmp_path):
    """The comparison is strict: the same file read with alpha ignored does not pass."""
    models = peft_models(tiny_pipe, seed=29, r=4, lora_alpha=8)
    path = kohya_converted_file(diffusers_file(tiny_pipe, models, tmp_path), tmp_path)   # alpha lost: scale 1, not 2
    table = tiny_backend.layer_table()
    with pytest.raises(AssertionError, match="relative error"):
        assert_matches(load_lora(path, table, tiny_backend.base_weight), peft_oracle(models), table)
