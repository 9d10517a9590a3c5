"""The paper-protocol script runs end to end on random-weight stand-ins of SD1.5 and CLIP (so it
is known to run for people who have the real weights), and refuses bad input in one line."""

from __future__ import annotations

import json
import math

import pytest

METHODS = ("linear", "concat", "ties", "regmean", "iteris")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, tiny_pipe) -> dict:
    """A tiny SD1-type diffusers folder (with its VAE), a tiny random CLIP folder, two LoRAs with
    their prompt files, and an evaluation prompt file."""
    from transformers import CLIPConfig, CLIPModel

    from bench.speed import random_loras
    from iteris_core.backends.diffusers_backend import DiffusersBackend
    from iteris_core.backends.tiny import write_char_tokenizer

    root = tmp_path_factory.mktemp("paper")
    tiny_pipe.save_pretrained(str(root / "sd"))
    clip_dir = write_char_tokenizer(root / "clip")
    config = CLIPConfig(text_config={"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 37,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77},
                        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
                                       "num_hidden_layers": 1, "num_attention_heads": 2},
                        projection_dim=16)
    CLIPModel(config).save_pretrained(str(clip_dir))
    table = DiffusersBackend(tiny_pipe, device="cpu").layer_table()
    loras = random_loras(table, 2, 4, root / "loras")
    prompts = []
    for i in range(2):
        prompts.append(root / f"concept{i}.txt")
        prompts[-1].write_text(f"a photo of sks{i} thing\n")
    evaluation = root / "eval.txt"
    evaluation.write_text("sks0 thing and sks1 thing\n# a comment\nsks1 thing next to sks0 thing\n")
    return {"root": root, "base": root / "sd", "clip": clip_dir, "loras": loras, "prompts": prompts, "eval": evaluation}


def arguments(s: dict, **override) -> list[str]:
    args = ["--base", str(s["base"]), "--clip", str(s["clip"]), "--eval-prompts", str(s["eval"]),
            "--steps", "3", "--seeds", "1", "--iterations", "1", "--device", "cpu", "--name", "test",
            "--out-dir", str(s["root"] / "results")]
    for lora, prompts in zip(s["loras"], s["prompts"]):
        args += ["--lora", str(lora), "--prompts", str(prompts)]
    for key, value in override.items():
        args[args.index("--" + key.replace("_", "-")) + 1] = str(value)
    return args


def test_runs_every_method_and_writes_its_tables(stand_ins):
    from bench.paper_protocol import main

    result = main(arguments(stand_ins))
    saved = json.loads((stand_ins["root"] / "results" / "paper_protocol_test.json").read_text())
    assert [row["method"] for row in saved["rows"]] == list(METHODS)
    assert saved["protocol"] == {"sampler": "DDPM", "steps": 3, "guidance": 12.0, "seeds": 1, "resolution": "native"}
    for row in saved["rows"]:
        assert row["images"] == 2                                  # 2 evaluation prompts x 1 seed
        for key in ("text_alignment", "image_alignment"):
            assert math.isfinite(row[key]) and -1.0 <= row[key] <= 1.0, row
    assert len({round(r["image_alignment"], 6) for r in saved["rows"]}) > 1, "every method scored the same"
    markdown = (stand_ins["root"] / "results" / "paper_protocol_test.md").read_text()
    assert "| method | CLIP text alignment |" in markdown and "iteris" in markdown
    assert result["rows"] == saved["rows"]


def test_defaults_are_the_papers(stand_ins):
    from bench.paper_protocol import parse_args

    args = arguments(stand_ins)
    for option in ("--steps", "--guidance", "--seeds"):     # drop the test's fast settings
        if option in args:
            del args[args.index(option):args.index(option) + 2]
    parsed = parse_args(args)
    assert (parsed.steps, parsed.guidance) == (100, 12.0)
    assert parsed.methods == list(METHODS)


@pytest.mark.parametrize("broken, message", [
    ("clip", "--clip {path} not found"),
    ("eval", "--eval-prompts file {path} not found"),
])
def test_missing_inputs_are_named(stand_ins, broken, message, capsys):
    from bench.paper_protocol import main

    missing = stand_ins["root"] / "nowhere"
    with pytest.raises(SystemExit) as exit_info:
        main(arguments(stand_ins, **{"clip" if broken == "clip" else "eval_prompts": missing}))
    text = str(exit_info.value.code) + capsys.readouterr().err
    assert exit_info.value.code != 0
    assert message.format(path=missing) in text
