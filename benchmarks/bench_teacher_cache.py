"""Distillation from the teacher-logit cache against online KD: training tokens/s and the students' KL at equal tokens.

In one run, on the smollm2-135m width student (hidden 576→432, FFN 1536→768, pruned by `minitron prune`):
- online: `minitron distill` with the teacher running every step (the reference);
- cache build: the teacher once over the same run's train rows (`build_teacher_cache`, top-k log-probs);
- cached: the same distillation from the cache (the teacher not loaded while training).
Same student, data, seed, schedule and token budget, so both read the same rows in the same order.
Tokens/s is the median of the per-step rates in train_log.jsonl (the first step, which warms up, left out).
KL(teacher ‖ student) and perplexity of both final students on the same eval rows.
Targets: cached tokens/s ≥ 1.4x online; cached KL within 3% of online KL.

    python benchmarks/bench_teacher_cache.py [--tokens 16384] [--top-k 64] [--pruned DIR] [--eval-batches 4] [--threads 2]
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench_distill_quality import prune_student
from common import machine, pin_threads, write_results

from toolchain.distill import build_teacher_cache, distill
from toolchain.settings import ComputeConfig, DataConfig, DistillConfig, EvalConfig


def step_rates(run: Path) -> list[float]:
    return [json.loads(line)["tokens_per_second"] for line in (run / "train_log.jsonl").read_text().splitlines()][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--pruned", type=Path, help="an existing pruned student (default: run `minitron prune`)")
    parser.add_argument("--hidden-size", type=int, default=432)
    parser.add_argument("--ffn-hidden-size", type=int, default=768)
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--data", default="builtin:python-docs")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    pin_threads(args.threads)

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-teacher-cache-"))
    pruned = args.pruned or prune_student(args.teacher, args.data, work / "pruned", args.hidden_size, args.ffn_hidden_size, args.calibration_samples)
    data, compute = DataConfig(spec=args.data, seq_len=args.seq_len), ComputeConfig(dtype="float32", device="cpu")
    evaluation = EvalConfig(max_batches=args.eval_batches)
    online_config = DistillConfig(tokens=args.tokens, lr=args.lr, min_lr=args.lr / 10, save_every=10_000)
    cached_config = online_config.model_copy(update={"teacher_cache": str(work / "cache"), "teacher_cache_top_k": args.top_k})

    summaries, seconds = {}, {}
    started = time.perf_counter()
    summaries["online"] = distill(args.teacher, str(pruned), work / "online", online_config, data, compute, evaluation, overwrite=True)
    seconds["online_total"] = time.perf_counter() - started
    started = time.perf_counter()
    build = build_teacher_cache(args.teacher, [cached_config], data, compute)
    seconds["cache_build"] = time.perf_counter() - started
    started = time.perf_counter()
    summaries["cached"] = distill(args.teacher, str(pruned), work / "cached", cached_config, data, compute, evaluation, overwrite=True)
    seconds["cached_total"] = time.perf_counter() - started

    rates = {arm: statistics.median(step_rates(work / arm)) for arm in ("online", "cached")}
    train_seconds = {arm: summaries[arm]["train_seconds"] for arm in ("online", "cached")}
    speedup = rates["cached"] / rates["online"]
    kl = {arm: summaries[arm]["eval"]["kl"] for arm in ("online", "cached")}
    kl_change = kl["cached"] / kl["online"] - 1
    cache_bytes = sum(path.stat().st_blocks * 512 for path in (work / "cache").glob("*.npy"))
    payload = {
        "benchmark": "KD from the teacher-logit cache vs online KD: tokens/s and the students' KL at equal tokens",
        "teacher": args.teacher, "student": str(pruned) if args.pruned else f"minitron prune --hidden-size {args.hidden_size} "
                                                                           f"--ffn-hidden-size {args.ffn_hidden_size} --calibration-samples {args.calibration_samples}",
        "tokens": args.tokens, "seq_len": args.seq_len, "top_k": args.top_k, "settings": online_config.model_dump(mode="json"),
        "tokens_per_second": rates, "train_seconds": train_seconds, "speedup": speedup, "target_speedup": 1.4, "speedup_met": speedup >= 1.4,
        "cache_build": {**build, "seconds": seconds["cache_build"], "disk_bytes": cache_bytes},
        "eval": {arm: summaries[arm]["eval"] for arm in ("online", "cached")}, "kl_change": kl_change, "target_kl_change": 0.03,
        "kl_met": abs(kl_change) <= 0.03, "seconds": seconds, "machine": machine(),
    }
    gib = 1024 ** 3
    rows = ["| arm | tokens/s (median step) | train s | KL(teacher‖student) | perplexity | top-1 agreement |", "|---|---|---|---|---|---|"]
    for arm in ("online", "cached"):
        metrics = summaries[arm]["eval"]
        rows.append(f"| {arm} | {rates[arm]:,.1f} | {train_seconds[arm]:.0f} | {metrics['kl']:.4f} | {metrics['perplexity']:.2f} | {metrics['top1_agreement']:.1%} |")
    markdown = "\n".join([
        "# Teacher-logit cache vs online KD", "",
        f"Command: `python benchmarks/bench_teacher_cache.py --tokens {args.tokens} --top-k {args.top_k} --eval-batches {args.eval_batches}`. "
        f"Teacher {args.teacher}; student {payload['student']}; {args.tokens:,} tokens of {args.data} (sequences of {args.seq_len}), "
        f"global batch {online_config.global_batch_size}, lr {args.lr:g} → {args.lr / 10:g}; eval on {args.eval_batches} batches of the eval split; "
        f"{machine()['torch_threads']} torch threads on {machine()['cpu_count']} shared cores.", "",
        *rows, "",
        f"**Cached / online tokens/s = {speedup:.2f}x** (target ≥ 1.4x: {'met' if speedup >= 1.4 else 'NOT met'}). "
        f"**KL of the cached student vs the online one: {kl_change:+.1%}** (target within 3%: {'met' if abs(kl_change) <= 0.03 else 'NOT met'}).", "",
        f"Cache build: the teacher over {build['computed_rows']} train rows in {seconds['cache_build']:.0f} s, {cache_bytes / gib:.3f} GiB on disk "
        f"(top-{args.top_k} int32 ids + float32 log-probs + the rest's log-mass per token). Each further student or epoch on these rows reuses it: "
        f"with n students the teacher costs one build instead of n online passes.",
    ])
    write_results("teacher_cache", payload, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
