"""Reading and writing LoRA files safely.

Only safetensors is read: pickled checkpoints (``.ckpt``, ``.pt``, ``.bin``) can run code when
loaded, so they are refused with a message that says how to convert them. Every broken file seen
in the wild (empty uploads, Git LFS pointers, text notes, truncated downloads) is recognised before
safetensors sees it, so the message says what the file really is. Writes go to a temporary file in
the target folder and are renamed into place; an existing file is never replaced unless asked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import IterisError, LoraFileError

_MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass
class LoraFile:
    """The raw content of a LoRA file: tensors by key, header metadata, and a PEFT sidecar config."""

    name: str                      # how messages refer to it (file name, or a caller's label)
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    adapter_config: dict | None = None  # PEFT adapter_config.json beside the file, if any
    path: str | None = None
    sha256: str | None = None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A plausible header: its 8-byte length fits the file and the JSON header starts right after."""
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return header_len + 8 <= size and head[8:9] == b"{"


def _diagnose_non_safetensors(path: Path, head: bytes, size: int) -> str | None:
    """Name what a file that is not safetensors really is, from its first bytes."""
    if size < 8:
        return f"the file is {size} bytes long, too short to hold any tensor (an empty or failed upload)"
    if _looks_like_safetensors(head, size):
        return None  # e.g. a header length whose low byte is 0x80 is not a pickle's opcode
    if head.startswith(b"version https://git-lfs"):
        return ("this is a Git LFS pointer, not the weights: fetch the real file with `git lfs pull` "
                "or download it again")
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return ("this is a pickled PyTorch checkpoint; pickles can run code when loaded, so they are "
                "refused. Convert it to .safetensors first (e.g. safetensors.torch.save_file on the "
                "state dict in a trusted environment)")
    if head.lstrip()[:1] in (b"{", b"<"):
        return "this is a text/JSON/HTML document, not a safetensors file (a saved web page or config?)"
    return None


def _looks_like_text(data: bytes) -> bool:
    """Printable UTF-8 (a multi-byte character cut at the end of ``data`` is allowed)."""
    text = data.decode("utf-8", errors="replace").rstrip("\ufffd")
    if not text or "\ufffd" in text:
        return False
    return all(c.isprintable() or c in "\t\r\n" for c in text)


def _check_header(path: Path, raw: bytes, size: int) -> dict:
    """Parse and sanity-check the safetensors header so truncation and corruption get plain words."""
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > _MAX_HEADER_BYTES or header_len + 8 > size:
        if _looks_like_text(raw):
            raise LoraFileError(path, "this is a text file, not a safetensors file (a placeholder or "
                                      "note saved under a .safetensors name?)")
        raise LoraFileError(path, "corrupt or not a safetensors file (its header length field is "
                                  f"{header_len} bytes, the file has {size})")
    with open(path, "rb") as f:
        f.seek(8)
        header_bytes = f.read(header_len)
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraFileError(path, f"corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise LoraFileError(path, "corrupt safetensors header (not a JSON object)")
    data_bytes = size - 8 - header_len
    needed = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            width = _DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise LoraFileError(path, f"corrupt safetensors header entry for key {key!r}") from None
        if end - start != count * width:
            raise LoraFileError(path, f"corrupt safetensors header: key {key!r} declares shape "
                                      f"{entry['shape']} but {end - start} bytes")
        needed = max(needed, end)
    if needed > data_bytes:
        raise LoraFileError(path, f"the file is truncated: its header declares {needed:,} bytes of tensor "
                                  f"data but only {data_bytes:,} are present (an interrupted download?)")
    return header


def _sidecar_config(path: Path) -> dict | None:
    """PEFT keeps lora_alpha and r in adapter_config.json, beside adapter_model.safetensors
    (or, once renamed, in ``<name>.adapter_config.json``)."""
    candidates = [path.with_name(path.stem + ".adapter_config.json")]
    if path.stem == "adapter_model":
        candidates.append(path.with_name("adapter_config.json"))
    for candidate in candidates:
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise LoraFileError(candidate, f"unreadable PEFT adapter config ({exc})") from None
    return None


def read_lora_file(path: str | Path, *, with_hash: bool = True) -> LoraFile:
    """Read a LoRA ``.safetensors`` file, refusing anything else with a message naming the file."""
    path = Path(path)
    if not path.exists():
        raise LoraFileError(path, "no such file")
    if not path.is_file():
        raise LoraFileError(path, "not a regular file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    problem = _diagnose_non_safetensors(path, head, size)
    if problem:
        raise LoraFileError(path, problem)
    header = _check_header(path, head, size)

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise LoraFileError(path, f"cannot read the tensors ({exc})") from None
    if not tensors:
        raise LoraFileError(path, "the file holds no tensors")
    metadata = header.get("__metadata__") or {}
    return LoraFile(name=path.name, tensors=tensors, metadata={str(k): str(v) for k, v in metadata.items()},
                    adapter_config=_sidecar_config(path), path=str(path),
                    sha256=sha256_file(path) if with_hash else None)


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._\- ()\[\]+]")


def sanitize_file_name(name: str, suffix: str = ".safetensors") -> str:
    """A file name that stays inside its folder: refuses separators and ``..``, keeps a readable
    name, and ends in ``suffix``. Raises for names that are empty once cleaned."""
    if any(sep in name for sep in ("/", "\\")) or ".." in name.split("/") or name.strip() in (".", ".."):
        raise IterisError(f"file name {name!r} may not contain folders or '..'; give a plain name")
    if ".." in name:
        raise IterisError(f"file name {name!r} may not contain '..'")
    cleaned = _SAFE_NAME.sub("_", name.strip()).strip(". ")
    if cleaned.lower().endswith(suffix):
        cleaned = cleaned[: -len(suffix)]
    if not cleaned:
        raise IterisError(f"file name {name!r} is empty once unsafe characters are removed")
    return cleaned[:200] + suffix


def unique_path(path: Path) -> Path:
    """``name.safetensors`` or, if taken, ``name_00001.safetensors`` and so on."""
    if not path.exists():
        return path
    for i in range(1, 100000):
        candidate = path.with_name(f"{path.stem}_{i:05d}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise IterisError(f"no free file name like {path.name} in {path.parent}")


def atomic_write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                             metadata: dict[str, str] | None = None, *, overwrite: bool = False) -> Path:
    """Write tensors to ``path`` through a temporary file in the same folder and a rename, so a
    crash or interrupt never leaves a half-written file under the final name. Without
    ``overwrite``, an existing file is left untouched and an error is raised."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise IterisError(f"{path} already exists; choose another name or allow overwriting")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(contiguous, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a LoRA file is as readable as any other
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic and never replaces an existing file
            except FileExistsError:
                raise IterisError(f"{path} already exists; choose another name or allow overwriting") from None
            except OSError:
                if path.exists():
                    raise IterisError(f"{path} already exists; choose another name or allow overwriting") from None
                os.replace(tmp, path)  # filesystems without hard links
    finally:
        tmp.unlink(missing_ok=True)
    return path
