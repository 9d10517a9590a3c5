"""Reading refuses every kind of broken file with plain words; writing is atomic and never clobbers."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from iteris_core.errors import IterisError, LoraFileError
from iteris_core.lora_io import atomic_write_safetensors, read_lora_file, sanitize_file_name, unique_path


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"a.lora_up.weight": torch.ones(4, 2), "a.lora_down.weight": torch.ones(2, 3)}, str(path),
              metadata={"ss_network_dim": "2"})
    return path


def test_reads_tensors_metadata_and_hash(good_file):
    lora = read_lora_file(good_file)
    assert set(lora.tensors) == {"a.lora_up.weight", "a.lora_down.weight"}
    assert lora.metadata == {"ss_network_dim": "2"}
    assert len(lora.sha256) == 64 and lora.name == "good.safetensors"


def _write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name, make, message", [
    ("empty.safetensors", lambda p: b"", "too short"),
    ("crlf.safetensors", lambda p: b"\r\n", "too short"),
    ("lfs.safetensors", lambda p: b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 23390424\n",
     "Git LFS pointer"),
    ("note.safetensors", lambda p: "文件太大，请从网盘下载 Haikyu7-20.safetensors".encode() * 3, "text file"),
    ("page.safetensors", lambda p: b"<!DOCTYPE html><html><body>404</body></html>", "text/JSON/HTML"),
    ("random.safetensors", lambda p: bytes(range(256)) * 4, "corrupt or not a safetensors"),
])
def test_broken_files_are_named(tmp_path, name, make, message):
    path = _write(tmp_path, name, make(tmp_path))
    with pytest.raises(LoraFileError, match=message) as info:
        read_lora_file(path)
    assert name in str(info.value)


def test_truncated_file(tmp_path, good_file):
    data = good_file.read_bytes()
    path = _write(tmp_path, "cut.safetensors", data[:-10])
    with pytest.raises(LoraFileError, match="truncated"):
        read_lora_file(path)


def test_corrupt_header(tmp_path, good_file):
    data = bytearray(good_file.read_bytes())
    data[10:14] = b"\xff\xfe\x00{"
    path = _write(tmp_path, "bad_header.safetensors", bytes(data))
    with pytest.raises(LoraFileError, match="corrupt"):
        read_lora_file(path)


@pytest.mark.parametrize("kind", ["torch_zip", "raw_pickle"])
def test_pickles_are_refused(tmp_path, kind):
    path = tmp_path / "model.ckpt"
    if kind == "torch_zip":
        torch.save({"x": torch.ones(2)}, path)
        assert zipfile.is_zipfile(path)
    else:
        path.write_bytes(pickle.dumps({"x": [1, 2, 3]}, protocol=4))
    with pytest.raises(LoraFileError, match="pickle"):
        read_lora_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(LoraFileError, match="no such file"):
        read_lora_file(tmp_path / "nope.safetensors")


def test_atomic_write_never_clobbers(tmp_path, good_file):
    target = tmp_path / "out.safetensors"
    atomic_write_safetensors({"x": torch.zeros(3)}, target, {"k": "v"})
    before = target.read_bytes()
    with pytest.raises(IterisError, match="already exists"):
        atomic_write_safetensors({"x": torch.ones(3)}, target)
    assert target.read_bytes() == before
    atomic_write_safetensors({"x": torch.ones(3)}, target, overwrite=True)
    assert read_lora_file(target, with_hash=False).tensors["x"].sum() == 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.safetensors"
    with pytest.raises(Exception):
        atomic_write_safetensors({"x": "not a tensor"}, target)  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../evil", "a/b", "..\\x", "..", "sub/../../x", "."])
def test_path_traversal_is_refused(name):
    with pytest.raises(IterisError):
        sanitize_file_name(name)


@pytest.mark.parametrize("name, expected", [
    ("my merge", "my merge.safetensors"),
    ("dog+style v2.safetensors", "dog+style v2.safetensors"),
    ("we|ird:na*me?", "we_ird_na_me_.safetensors"),
])
def test_sanitized_names(name, expected):
    assert sanitize_file_name(name) == expected


def test_unique_path(tmp_path):
    first = tmp_path / "m.safetensors"
    assert unique_path(first) == first
    first.write_bytes(b"x")
    assert unique_path(first).name == "m_00001.safetensors"


def test_a_header_length_starting_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """A safetensors file begins with its header length: a low byte of 0x80 (about 1 file in 256)
    must not look like a pickle's PROTO opcode."""
    for pad in range(300):
        path = tmp_path / f"h{pad}.safetensors"
        save_file({"a.lora_up.weight": torch.ones(4, 2), "a.lora_down.weight": torch.ones(2, 3)}, str(path),
                  metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            assert set(read_lora_file(path).tensors) == {"a.lora_up.weight", "a.lora_down.weight"}
            return
    pytest.fail("no header length with a 0x80 low byte was produced")
