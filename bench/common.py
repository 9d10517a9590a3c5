"""Shared benchmark plumbing: machine facts, peak memory, result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(os.environ.get("ITERIS_ENV", Path.home() / ".cache" / "comfyui-iteris")) / "bench"
GB = 1024 ** 3


def machine() -> dict:
    """Where a figure was measured."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "ram_gb": memory,
            "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0") == "1",
            # the vector unit PyTorch's CPU kernels use: AVX-512 machines run a forward about twice
            # as fast as AVX2 ones, which moves every ratio to that forward
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version(), "torch": torch.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")}


def machine_line(info: dict) -> str:
    """``machine()`` as the first words of a result file: where and when it was measured."""
    return (f"{info['cpu']} ({info['cpu_capability']}), {info['cores']} cores, {info['ram_gb']} GB RAM, "
            f"torch {info['torch']}, {info['date']}")


def reset_peak_rss() -> None:
    """Make the kernel's peak-RSS counter (VmHWM) start again from the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / GB
    return 0.0


@contextmanager
def stopwatch(into: dict, key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        into[key] = into.get(key, 0.0) + time.perf_counter() - start


def save_results(name: str, data: dict | list, markdown: str, folder: Path = RESULTS) -> tuple[Path, Path]:
    """Write ``<folder>/<name>.json`` (for tools) and ``<name>.md`` (for people); ``folder`` is
    ``bench/results`` unless told otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{name}.json", folder / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with (key, heading) ``columns``; floats get 3 significant digits."""
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(h for _k, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(k)) for k, _h in columns) + " |" for row in rows]
    return "\n".join(lines)
