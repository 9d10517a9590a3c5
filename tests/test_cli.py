"""The command line: a real merge on a diffusers folder, --help, and one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from iteris_core.backends.diffusers_backend import DiffusersBackend
from iteris_core.backends.tiny import TinySpec, build_tiny_pipeline, random_lora_deltas
from iteris_core.cli import main
from iteris_core.lora_normalize import load_lora
from iteris_core.lora_writer import MergedLora


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_pipe):
    root = tmp_path_factory.mktemp("cli")
    tiny_pipe.save_pretrained(str(root / "base"))
    table = DiffusersBackend(tiny_pipe, device="cpu").layer_table()
    for seed, name in ((1, "dog"), (2, "style")):
        MergedLora(random_lora_deltas(table, seed, rank=2, scale=0.2), table).save(root / f"{name}.safetensors")
        (root / f"{name}.txt").write_text(f"# prompts for {name}\na photo of {name}\n{name} on a table\n")
    sdxl = build_tiny_pipeline(TinySpec(sdxl=True))
    sdxl_table = DiffusersBackend(sdxl, device="cpu").layer_table()
    MergedLora(random_lora_deltas(sdxl_table, 3, rank=2), sdxl_table).save(root / "sdxl.safetensors")
    (root / "empty.txt").write_text("\n# nothing\n")
    return root


FAST = ["--samples", "1", "--steps", "3", "--timesteps", "2", "--iterations", "1", "--device", "cpu", "--quiet"]


def _args(ws, *extra, out="merged.safetensors"):
    return ["merge", "--base", str(ws / "base"), "--lora", str(ws / "dog.safetensors"), "--prompts", str(ws / "dog.txt"),
            "--lora", str(ws / "style.safetensors"), "--prompts", str(ws / "style.txt"), "--strength", "0.7",
            "--out", str(ws / out), *FAST, *extra]


def test_merge_as_a_subprocess_writes_lora_and_report(workspace):
    out, report = workspace / "sub.safetensors", workspace / "report.json"
    command = [sys.executable, "-m", "iteris_core", *_args(workspace, "--report", str(report), out="sub.safetensors")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    data = json.loads(report.read_text())
    assert data["method"] == "iteris"
    assert [i["strength"] for i in data["inputs"]] == [1.0, 0.7]
    assert [i["prompts"] for i in data["inputs"]] == [2, 2]
    assert {r["stage"] for r in data["iterations"]} == {"text", "unet"}
    lora = load_lora(out, DiffusersBackend(build_tiny_pipeline(TinySpec()), device="cpu").layer_table())
    assert lora.metadata["iteris_method"] == "iteris"


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["merge", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--base", "--lora", "--prompts", "--out", "--method", "--strength", "--iterations", "--alpha",
                   "--samples", "--steps", "--seed", "--rank", "--device", "--report", "--timesteps"):
        assert option in text


def _error(capsys, argv) -> str:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_missing_lora_file(workspace, capsys):
    argv = _args(workspace)
    argv[argv.index(str(workspace / "dog.safetensors"))] = str(workspace / "nope.safetensors")
    line = _error(capsys, argv)
    assert line.startswith("error:") and "nope.safetensors" in line and "no such file" in line


def test_prompts_before_lora(workspace, capsys):
    line = _error(capsys, ["merge", "--base", str(workspace / "base"), "--prompts", str(workspace / "dog.txt"),
                           "--lora", str(workspace / "dog.safetensors"), "--out", str(workspace / "x.safetensors")])
    assert "must come after the --lora" in line


def test_empty_prompts_file(workspace, capsys):
    argv = _args(workspace)
    argv[argv.index(str(workspace / "style.txt"))] = str(workspace / "empty.txt")
    assert "has no prompt" in _error(capsys, argv)


def test_existing_output_is_kept(workspace, capsys):
    target = workspace / "keep.safetensors"
    target.write_bytes(b"precious")
    assert "already exists" in _error(capsys, _args(workspace, out="keep.safetensors"))
    assert target.read_bytes() == b"precious"


def test_lora_for_another_base(workspace, capsys):
    argv = _args(workspace)
    argv[argv.index(str(workspace / "dog.safetensors"))] = str(workspace / "sdxl.safetensors")
    line = _error(capsys, argv)
    assert "sdxl.safetensors" in line and "base model" in line
    assert not (workspace / "merged.safetensors").exists()


def test_missing_base(workspace, capsys):
    argv = _args(workspace)
    argv[argv.index(str(workspace / "base"))] = str(workspace / "no-such-model")
    assert "not found" in _error(capsys, argv)


def test_linear_method_in_process(workspace, capsys):
    assert main(_args(workspace, "--method", "linear", out="linear.safetensors")) == 0
    assert (workspace / "linear.safetensors").exists()


def test_a_statistics_budget_groups_the_layers_and_gives_the_same_file(workspace):
    assert main(_args(workspace, "--report", str(workspace / "free.json"), out="free.safetensors")) == 0
    assert main(_args(workspace, "--statistics-budget", "0.002", "--report", str(workspace / "tight.json"),
                      out="tight.safetensors")) == 0
    counts = json.loads((workspace / "tight.json").read_text())["memory"]["group_counts"]
    assert max(counts) > 1, counts
    table = DiffusersBackend(build_tiny_pipeline(TinySpec()), device="cpu").layer_table()
    free, tight = load_lora(workspace / "free.safetensors", table), load_lora(workspace / "tight.safetensors", table)
    for name, delta in free.layers.items():
        assert (tight.layers[name].dense() - delta.dense()).norm() <= 1e-5 * delta.dense().norm(), name
