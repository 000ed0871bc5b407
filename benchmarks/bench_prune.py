"""Benchmark of `minitron prune` on the built-in SmolLM2-135M teacher and the built-in Python-docs corpus.

1. Cost of the importance hooks: the decoder's forward pass over the calibration sequences without hooks
   and with Minitron's activation hooks (running sums), alternated, in this one process.
2. Quality right after pruning (no distillation): eval perplexity of the width student (hidden 576→432,
   FFN 1536→768, all 9 heads) chosen by activation importance vs weight magnitude vs random, and of the
   depth student (30→15 layers) chosen by block importance, LM loss per layer, the best contiguous block,
   and random layers.

Writes benchmarks/results/prune.json and prune.md. Usage: python benchmarks/bench_prune.py [--threads 2]
"""

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from toolchain.data import iterate_batches, prepare_data
from toolchain.evaluate import evaluate_model
from toolchain.models import load_model, load_tokenizer
from toolchain.prune import prune
from toolchain.prune.importance import ActivationRecorder
from toolchain.settings import ComputeConfig, DataConfig, EvalConfig, ImportanceConfig, PruneConfig

RESULTS = Path(__file__).parent / "results"
TEACHER = "smollm2-135m"
DATA = "builtin:python-docs"
WIDTH = {"hidden_size": 432, "ffn_hidden_size": 768}
DEPTH = {"num_layers": 15}


@torch.inference_mode()
def hook_overhead(rows, batch_size: int) -> dict:
    """Each calibration batch through the decoder twice, without and with the activation hooks (order alternating
    from batch to batch), so both passes see the same tokens and the same machine load."""
    model = load_model(TEACHER)
    recorder = ActivationRecorder(model, "mean")
    model.model(input_ids=torch.tensor(rows[:batch_size], dtype=torch.long), use_cache=False)  # warm-up
    plain, hooked = [], []
    for index, input_ids in enumerate(iterate_batches(rows, batch_size)):
        for hooks_on in ((False, True) if index % 2 == 0 else (True, False)):
            with recorder.hooks() if hooks_on else contextlib.nullcontext():
                started = time.perf_counter()
                model.model(input_ids=input_ids, use_cache=False)
                (hooked if hooks_on else plain).append(time.perf_counter() - started)
    return {"plain_seconds": sum(plain), "hooked_seconds": sum(hooked), "batches": len(plain), "tokens": int(rows.size),
            "overhead": sum(hooked) / sum(plain) - 1,
            "median_batch_overhead": statistics.median(h / p for h, p in zip(hooked, plain)) - 1}


def perplexity_after_pruning(work: Path, name: str, config: PruneConfig, importance: ImportanceConfig, eval_rows, args, importance_file=None) -> dict:
    out = work / name
    report = prune(TEACHER, out, config, importance, DataConfig(spec=DATA, seq_len=args.seq_len), ComputeConfig(dtype="float32", device="cpu"),
                   importance_file=importance_file)
    metrics = evaluate_model(load_model(out), eval_rows, EvalConfig(batch_size=args.batch_size, max_batches=args.eval_batches), description=name)
    result = {"perplexity": metrics["perplexity"], "loss": metrics["loss"], "parameters": report["parameters"]["pruned"],
              "dropped_layers": report["dropped_layers"], "seconds": report["seconds"]}
    print(f"{name}: perplexity {metrics['perplexity']:.1f} ({report['seconds']})", flush=True)
    if name != "width-activation":
        shutil.rmtree(out)
    return result


def write_markdown(results: dict) -> str:
    s = results["settings"]
    timing = results["hook_overhead"]
    lines = [
        "# Pruning benchmark: SmolLM2-135M on builtin:python-docs",
        "",
        f"Measured {results['date']} on {s['machine']}, torch {s['torch']}, {s['threads']} intra-op threads, float32, CPU, one process. "
        f"Calibration: {s['calibration_sequences']} sequences x {s['seq_len']} tokens (LM-loss depth scores: {s['depth_calibration_samples']} sequences); "
        f"eval: {s['eval_sequences']} held-out sequences x {s['seq_len']} tokens ({s['eval_tokens']:,} predicted tokens). "
        "No distillation: these are perplexities right after pruning.",
        "",
        "## Importance hooks vs plain forward passes (same tokens, same run)",
        "",
        f"Decoder forward over the {timing['tokens']:,} calibration tokens in {timing['batches']} batches of {s['batch_size']}; each batch runs "
        "without and with the hooks back to back (order alternating), so both see the same tokens and machine load.",
        "",
        "| pass | seconds |",
        "|---|---|",
        f"| plain forward | {timing['plain_seconds']:.1f} |",
        f"| forward + activation hooks (running sums) | {timing['hooked_seconds']:.1f} |",
        "",
        f"Hook overhead: {timing['overhead']:+.1%} in total, {timing['median_batch_overhead']:+.1%} median per batch (target: at most +10%).",
        "",
        f"## Perplexity right after pruning (teacher: {results['teacher']['perplexity']:.2f}, "
        f"{results['teacher']['parameters']['total'] / 1e6:.1f}M parameters, {results['teacher']['parameters']['non_embedding'] / 1e6:.1f}M non-embedding)",
        "",
        "| student | layers chosen / units chosen by | parameters (non-embedding) | eval perplexity |",
        "|---|---|---|---|",
    ]
    for student, rows in (("width 576→432, FFN 1536→768, 9 heads", results["width"]), ("depth 30→15 layers", results["depth"])):
        for method, row in rows.items():
            dropped = f" (dropped {row['dropped_layers']})" if row["dropped_layers"] else ""
            lines.append(f"| {student} | {method}{dropped} | {row['parameters']['total'] / 1e6:.1f}M ({row['parameters']['non_embedding'] / 1e6:.1f}M) "
                         f"| {row['perplexity']:,.1f} |")
    lines += ["", f"Total benchmark wall time: {results['wall_seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--depth-calibration-samples", type=int, default=4)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    packed = prepare_data(DataConfig(spec=DATA, seq_len=args.seq_len), load_tokenizer(TEACHER))
    calibration = packed.split("calibration")[: args.calibration_samples]
    eval_rows = packed.split("eval")
    teacher = evaluate_model(load_model(TEACHER), eval_rows, EvalConfig(batch_size=args.batch_size, max_batches=args.eval_batches), description="teacher")
    print(f"teacher perplexity {teacher['perplexity']:.2f}", flush=True)
    overhead = hook_overhead(calibration, args.batch_size)
    print(f"hook overhead {overhead}", flush=True)

    common = {"calibration_samples": args.calibration_samples, "batch_size": args.batch_size, "depth_calibration_samples": args.depth_calibration_samples}
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as tmp:
        work = Path(tmp)
        width = {method: perplexity_after_pruning(work, f"width-{method}", PruneConfig(**WIDTH), ImportanceConfig(method=method, **common), eval_rows, args)
                 for method in ("activation", "magnitude", "random")}
        depth = {method: perplexity_after_pruning(work, f"depth-{method}", PruneConfig(**DEPTH, depth_method=method), ImportanceConfig(**common), eval_rows, args)
                 for method in ("block_importance", "lm_loss", "lm_loss_contiguous", "random")}
        teacher_parameters = json.loads((work / "width-activation" / "pruning.json").read_text())["parameters"]["original"]

    eval_sequences = min(len(eval_rows), args.eval_batches * args.batch_size)
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "settings": {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads of {os.cpu_count()} cores", "torch": torch.__version__,
                     "threads": args.threads, "calibration_sequences": len(calibration), "depth_calibration_samples": args.depth_calibration_samples,
                     "seq_len": args.seq_len, "batch_size": args.batch_size, "eval_sequences": eval_sequences,
                     "eval_tokens": eval_sequences * (args.seq_len - 1), "teacher": TEACHER, "data": DATA},
        "teacher": {"perplexity": teacher["perplexity"], "loss": teacher["loss"], "parameters": teacher_parameters},
        "hook_overhead": overhead,
        "width": width,
        "depth": depth,
        "wall_seconds": time.perf_counter() - started,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prune.json").write_text(json.dumps(results, indent=1))
    (RESULTS / "prune.md").write_text(write_markdown(results))
    print(write_markdown(results))


if __name__ == "__main__":
    main()
