"""Shared bits of the benchmark scripts: thread pinning, machine description, writing results."""

import json
import os
import platform
import time
from pathlib import Path

import torch

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
