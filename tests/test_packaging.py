"""Packaging facts the Comfy Registry, a user's ComfyUI install and CI depend on."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_registry_metadata_is_complete():
    data = _pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    assert "comfyui" not in project["name"].lower(), "the Registry refuses a name containing 'ComfyUI'"
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", project["name"]), project["name"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert comfy.get(key), f"[tool.comfy] {key} is empty"
    icon = comfy["Icon"].rsplit("/main/", 1)[-1]
    assert (ROOT / icon).is_file(), f"the Icon URL points at {icon}, which is not in the repository"
    assert (ROOT / project["license"]["file"]).is_file()


def test_requirements_leave_torch_alone():
    """A user's ComfyUI has its own torch build (CUDA, ROCm, MPS): installing the pack must not
    replace it, nor anything else ComfyUI pins."""
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    names = {re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower() for line in lines if line}
    assert names, "requirements.txt lists nothing"
    assert not names & {"torch", "torchvision", "torchaudio", "xformers", "numpy", "comfyui"}, names
    declared = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in _pyproject()["project"]["dependencies"]}
    assert names == declared, "requirements.txt and pyproject's dependencies disagree"


def test_readme_commands_exist_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    two_commands = readme[readme.index("## Two commands"):]
    scripts = re.findall(r"^bash (scripts/\S+\.sh)", two_commands, flags=re.M)[:2]
    assert scripts == ["scripts/demo.sh", "scripts/test.sh"], scripts
    assert all((ROOT / s).is_file() for s in scripts)
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^bash scripts/test\.sh\s*$", ci, flags=re.M), ".ci/run must run the README's test command"
    modules = re.findall(r"python -m (bench\.[a-z_]+|iteris_core)\b", readme)
    modules += [f"bench.{name}" for name in re.findall(r"bash scripts/bench\.sh ([a-z_]+)", readme)]
    assert "bench.quality" in modules and "iteris_core" in modules
    for module in modules:
        path = ROOT / Path(*module.split("."))
        assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), f"README names {module}"
