"""Size on disk and eval perplexity of ModelOpt float32 / int8_sq / fp8 / int4_awq checkpoints of SmolLM2 and its students.

Run: python benchmarks/bench_quantize.py [--no-students] [--threads 1]
Writes benchmarks/results/quantize.{json,md}. Each quantized model goes through `toolchain.quantize.quantize`
(calibration on the built-in corpus's calibration split, perplexity before/after on the first eval
batches, the unified checkpoint written with float32 for the unquantized tensors: embeddings, lm_head,
norms). On CPU ModelOpt simulates the quantized arithmetic, so perplexities are what the kernels
compute; speed is not measured here (that needs TensorRT-LLM on a GPU). Students are pruned with
`minitron prune` (no distillation) when the prune stage exists. A format the model cannot take
(INT4-AWQ on widths that are not multiples of 128) is recorded with the toolchain's refusal.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, pin_threads, write_results  # noqa: E402
from toolchain.errors import UserError  # noqa: E402
from toolchain.models import read_config, resolve_model_dir  # noqa: E402
from toolchain.paths import directory_bytes  # noqa: E402
from toolchain.quantize import quantize  # noqa: E402
from toolchain.settings import ComputeConfig, DataConfig, EvalConfig, QuantizeConfig  # noqa: E402

FORMATS = ("int8_sq", "fp8", "int4_awq")
STUDENTS = {
    "width (hidden 432, MLP 768)": ["--hidden-size", "432", "--ffn-hidden-size", "768"],
    "depth (15 layers)": ["--num-layers", "15"],
}


def prune_student(args: list[str], out: Path, calibration_samples: int) -> Path:
    command = [sys.executable, "-m", "toolchain", "prune", "--model", "smollm2-135m", "--out", str(out),
               "--calibration-samples", str(calibration_samples), *args]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return out


def measure(name: str, model: str, work: Path, options: argparse.Namespace) -> list[dict]:
    model_dir = resolve_model_dir(model)
    config = read_config(model_dir)
    shape = {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")}
    rows = [{"model": name, "format": "float32", "bytes": directory_bytes(model_dir, "*.safetensors"), "perplexity": None, "seconds": None, **shape}]
    for format in options.formats:
        started = time.perf_counter()
        try:
            result = quantize(str(model_dir), work / format, QuantizeConfig(format=format, calibration_samples=options.calibration_samples),
                              DataConfig(), ComputeConfig(dtype="float32", device="cpu"),
                              EvalConfig(max_batches=options.eval_batches, batch_size=options.batch_size))
        except UserError as exc:
            rows.append({"model": name, "format": format, "refused": str(exc), "seconds": time.perf_counter() - started, **shape})
            print(f"{name} {format}: refused: {exc}", flush=True)
            continue
        rows[0]["perplexity"] = result.perplexity_before
        rows.append({"model": name, "format": format, "bytes": result.checkpoint_bytes, "perplexity": result.perplexity_after,
                     "perplexity_before": result.perplexity_before, "eval_tokens": result.eval_tokens,
                     "calibration_samples": result.calibration_samples, "seconds": result.seconds, **shape})
        print(f"{name} {format}: ppl {result.perplexity_before:.2f} -> {result.perplexity_after:.2f}, "
              f"{result.checkpoint_bytes / 1e6:.0f} MB, {result.seconds:.0f} s", flush=True)
    return rows


def markdown(payload: dict) -> str:
    settings = payload["settings"]
    lines = [
        "# Quantization: size on disk and eval perplexity (ModelOpt on CPU)",
        "",
        f"Machine: {payload['machine']['cpu_count']} CPU cores, {settings['threads']} torch thread(s), {payload['machine']['date']}. "
        f"Calibration: {settings['calibration_samples']} sequences x 256 tokens of the built-in corpus's calibration split; "
        f"eval: first {settings['eval_batches']} batches x {settings['batch_size']} sequences x 256 tokens of its eval split "
        "(the same tokens for every row of a model). Sizes are the safetensors files of the checkpoint; unquantized tensors "
        "(embeddings, lm_head, norms) are float32, as in the baseline. Perplexity after quantization is ModelOpt's simulated "
        "(fake-quant) arithmetic; speed needs TensorRT-LLM on a GPU and is not measured here. Students are pruned, not distilled.",
        "",
        "| model | format | size (MB) | size vs float32 | perplexity | ppl vs float32 | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        base = next(r for r in payload["rows"] if r["model"] == row["model"] and r["format"] == "float32")
        if "refused" in row:
            lines.append(f"| {row['model']} | {row['format']} | refused | | | | |")
            continue
        size_ratio = row["bytes"] / base["bytes"]
        ppl = f"{row['perplexity']:.2f}" if row["perplexity"] is not None else "n/a"
        ppl_ratio = f"{row['perplexity'] / base['perplexity']:.3f}x" if row["perplexity"] and base["perplexity"] else ""
        seconds = f"{row['seconds']:.0f}" if row["seconds"] else ""
        lines.append(f"| {row['model']} | {row['format']} | {row['bytes'] / 1e6:.0f} | {size_ratio:.2f}x | {ppl} | {ppl_ratio} | {seconds} |")
    refusals = [row for row in payload["rows"] if "refused" in row]
    if refusals:
        lines += ["", "Refused (the toolchain's own message, before any work):", ""]
        lines += [f"- {row['model']} {row['format']}: {row['refused']}" for row in refusals]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS))
    parser.add_argument("--no-students", action="store_true")
    options = parser.parse_args()
    pin_threads(options.threads)
    started = time.perf_counter()
    payload = {"machine": machine(), "settings": {k: v for k, v in vars(options).items()}, "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as scratch:
        work = Path(scratch)
        models = [("smollm2-135m", lambda: "smollm2-135m")]
        prune_available = (Path(__file__).resolve().parent.parent / "toolchain" / "prune").is_dir()
        if not options.no_students and prune_available:
            for index, (name, prune_args) in enumerate(STUDENTS.items()):
                models.append((f"student {name}", lambda a=prune_args, i=index: str(prune_student(a, work / f"student-{i}", 64))))
        for index, (name, make) in enumerate(models):
            payload["rows"] += measure(name, make(), work / f"model-{index}", options)
            payload["seconds"] = time.perf_counter() - started
            write_results("quantize", payload, markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
