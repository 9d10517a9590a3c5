"""The embedded demo: a small generated SD1-type model, two generated LoRAs, one IterIS merge.

Everything is made on the spot from seeds (nothing is downloaded), written as real files, and
merged through the same command line a user runs on real models:

    python -m iteris_core demo --out iteris-demo
"""

from __future__ import annotations

from pathlib import Path

CONCEPTS = {
    "lora_dog": ["a photo of sks dog", "sks dog sitting on the grass", "a close-up of sks dog"],
    "lora_style": ["a painting in xyz style", "a city street, xyz style", "a portrait in xyz style"],
}


def _write_lora(table, deltas, path: Path) -> Path:
    from .lora_writer import MergedLora

    return MergedLora(deltas, table, {"iteris_demo": "generated random LoRA"}).save(path, overwrite=True)


def run_demo(out: Path, method: str = "iteris") -> Path:
    """Build the demo's inputs in ``out`` and merge them; returns the merged LoRA's path."""
    from .backends.diffusers_backend import DiffusersBackend
    from .backends.tiny import TinySpec, build_tiny_pipeline, random_lora_deltas
    from .cli import main

    out.mkdir(parents=True, exist_ok=True)
    base = out / "tiny-sd1-base"
    pipe = build_tiny_pipeline(TinySpec(), seed=0)
    pipe.save_pretrained(str(base))
    table = DiffusersBackend(pipe, device="cpu").layer_table()
    arguments = ["merge", "--base", str(base)]
    for seed, (name, prompts) in enumerate(CONCEPTS.items(), start=1):
        lora = _write_lora(table, random_lora_deltas(table, seed, rank=4, scale=0.3), out / f"{name}.safetensors")
        prompt_file = out / f"{name}.txt"
        prompt_file.write_text("\n".join(prompts) + "\n")
        arguments += ["--lora", str(lora), "--prompts", str(prompt_file)]
    merged = out / f"merged_{method}.safetensors"
    arguments += ["--out", str(merged), "--overwrite", "--report", str(out / f"report_{method}.json"),
                  "--method", method, "--device", "cpu", "--samples", "2", "--steps", "10", "--timesteps", "3"]
    status = main(arguments)
    if status != 0:
        raise SystemExit(status)
    print(f"demo inputs and outputs are in {out}/", flush=True)
    return merged
