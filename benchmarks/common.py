"""Shared bits of the benchmark scripts: thread pinning, machine description, latency over time, writing results."""

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from toolchain.bench.metrics import percentile

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def pin_threads(threads: int) -> None:
    """Fixed intra-op threads: on a shared 2-core machine this is what keeps numbers comparable."""
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def write_results(name: str, payload: dict, markdown: str) -> Path:
    """Write results/NAME.json and results/NAME.md; returns the JSON path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS_DIR / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS_DIR / f"{name}.md").write_text(markdown.rstrip() + "\n")
    return json_path


def latency_windows(sent_s: list[float], columns: dict[str, list], window_s: float, percentiles=(50, 99), failed: list[bool] | None = None) -> list[dict]:
    """Per `window_s` of a run, the requests sent in it (`sent_s`: seconds from the start) and `<column>_p<q>` of each column over
    them; None values (a failed request's latency) are left out, and `failed` adds the window's error count."""
    windows = []
    for start in np.arange(0.0, max(sent_s) + 1e-9, window_s):
        inside = [index for index, sent in enumerate(sent_s) if start <= sent < start + window_s]
        if not inside:
            continue
        window = {"window_start_s": float(start), "requests": len(inside)}
        if failed is not None:
            window["errors"] = sum(failed[index] for index in inside)
        for name, values in columns.items():
            kept = [values[index] for index in inside if values[index] is not None]
            window.update({f"{name}_p{q}": percentile(kept, q) for q in percentiles})
        windows.append(window)
    return windows
