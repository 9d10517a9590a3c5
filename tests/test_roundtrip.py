"""A merged LoRA written by the engine loads back with the same weights: in diffusers'
``load_lora_weights`` (every layer, convs and text encoders included) and in our own loader."""

from __future__ import annotations

import pytest
import torch

from iteris_core.backends.diffusers_backend import DiffusersBackend
from iteris_core.backends.tiny import TinySpec, build_tiny_pipeline, random_lora_deltas
from iteris_core.lora_normalize import load_lora
from iteris_core.lora_writer import MergedLora, kohya_module_key


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd1", "sdxl"])
def test_diffusers_loads_every_layer_with_the_same_weights(tmp_path, sdxl):
    pipe = build_tiny_pipeline(TinySpec(sdxl=sdxl), seed=0)
    table = DiffusersBackend(pipe, device="cpu").layer_table()
    deltas = random_lora_deltas(table, seed=3, include=r".")   # every Linear and Conv2d
    path = MergedLora(deltas, table, {"test": "1"}).save(tmp_path / "merged.safetensors", dtype="fp32")

    fresh = build_tiny_pipeline(TinySpec(sdxl=sdxl), seed=0)
    base = {n: m.weight.detach().clone() for n, m in DiffusersBackend(fresh, device="cpu").modules().items()}
    fresh.load_lora_weights(str(path))
    fresh.fuse_lora(lora_scale=1.0)
    fresh.unload_lora_weights()
    modules = DiffusersBackend(fresh, device="cpu").modules()
    assert len(deltas) == len(table)
    for name, delta in deltas.items():
        change = (modules[name].weight.detach() - base[name]).reshape(delta.out_features, -1)
        expected = delta.dense()
        assert torch.allclose(change, expected, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-6), ("fp16", 2e-3), ("bf16", 2e-2)])
def test_our_loader_reads_our_file(tmp_path, tiny_backend, dtype, tolerance):
    table = tiny_backend.layer_table()
    deltas = random_lora_deltas(table, seed=4, include=r".")
    merged = MergedLora(deltas, table, {"iteris_method": "test"})
    path = merged.save(tmp_path / "m.safetensors", dtype=dtype)
    back = load_lora(path, table)
    assert set(back.layers) == set(deltas)
    for name, delta in deltas.items():
        error = (back.layers[name].dense() - delta.dense()).norm() / delta.dense().norm()
        assert error < tolerance, name
    assert back.metadata["iteris_method"] == "test"
    assert "iteris_ranks" in back.metadata


def test_writer_refuses_non_finite(tmp_path, tiny_backend):
    table = tiny_backend.layer_table()
    deltas = random_lora_deltas(table, seed=5)
    name = next(iter(deltas))
    deltas[name].up[0, 0] = float("nan")
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        MergedLora(deltas, table).save(tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_only_a_layer_out_of_fp16_range_is_kept_in_fp32(tiny_backend):
    table = tiny_backend.layer_table()
    deltas = random_lora_deltas(table, seed=6)
    huge = sorted(deltas)[0]    # written first: the layers after it must stay fp16
    deltas[huge] = deltas[huge].scaled(1e12)
    merged = MergedLora(deltas, table)
    tensors = merged.state_dict(torch.float16)
    key = kohya_module_key(huge, table)
    assert tensors[f"{key}.lora_up.weight"].dtype == tensors[f"{key}.lora_down.weight"].dtype == torch.float32
    others = {v.dtype for k, v in tensors.items() if not k.startswith(key + ".") and not k.endswith(".alpha")}
    assert others == {torch.float16}
    up, down = tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"]
    alpha, rank = float(tensors[f"{key}.alpha"]), down.shape[0]
    product = (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)) * alpha / rank
    want = merged.dense(huge).reshape(product.shape)
    assert (product - want).norm() / want.norm() < 1e-5
