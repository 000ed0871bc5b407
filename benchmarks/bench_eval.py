"""Eval throughput of `minitron eval` (toolchain.evaluate.evaluate_model) against a bare transformers loop.

Both run the same model on the same packed batches of the eval split, alternating in rounds so that
machine noise hits both alike; the reported ratio uses the median round of each. Target: the
toolchain within 5% of the bare loop.

    python benchmarks/bench_eval.py [--model smollm2-135m] [--batches 4] [--rounds 3] [--threads 2]
"""

import argparse
import statistics
import time

import torch
from common import machine, pin_threads, write_results

from toolchain.data import iterate_batches, prepare_data
from toolchain.evaluate import evaluate_model
from toolchain.models import load_model, load_tokenizer
from toolchain.settings import DataConfig, EvalConfig


@torch.no_grad()
def bare_loop(model, rows, batch_size, max_batches) -> float:
    """What a user would write by hand: HF forward with labels, loss averaged over batches."""
    started = time.perf_counter()
    for input_ids in iterate_batches(rows, batch_size, max_batches):
        model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.item()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="builtin:python-docs")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    pin_threads(args.threads)

    model = load_model(args.model)
    rows = prepare_data(DataConfig(spec=args.data, seq_len=args.seq_len), load_tokenizer(args.model)).split("eval")
    tokens = min(len(rows), args.batch_size * args.batches) * args.seq_len
    bare_loop(model, rows, args.batch_size, 1)  # warm-up
    toolchain_seconds, bare_seconds = [], []
    for _ in range(args.rounds):
        toolchain_seconds.append(evaluate_model(model, rows, EvalConfig(batch_size=args.batch_size, max_batches=args.batches))["seconds"])
        bare_seconds.append(bare_loop(model, rows, args.batch_size, args.batches))
    toolchain_tps = tokens / statistics.median(toolchain_seconds)
    bare_tps = tokens / statistics.median(bare_seconds)
    ratio = toolchain_tps / bare_tps
    payload = {
        "benchmark": "eval throughput: minitron eval vs bare transformers loop",
        "model": args.model, "data": args.data, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "batches": args.batches, "tokens_per_round": tokens, "rounds": args.rounds,
        "toolchain_seconds": toolchain_seconds, "bare_seconds": bare_seconds,
        "toolchain_tokens_per_second": toolchain_tps, "bare_tokens_per_second": bare_tps,
        "toolchain_over_bare": ratio, "target": ">= 0.95", "met": ratio >= 0.95, "machine": machine(),
    }
    markdown = f"""# Eval throughput: `minitron eval` vs a bare transformers loop

{args.model} on {args.data} (eval split), {args.batches} batches of {args.batch_size} x {args.seq_len} tokens,
{args.rounds} alternating rounds, {args.threads} torch threads, float32 CPU. Medians of the rounds.

| loop | tokens/s |
|---|---|
| toolchain (`evaluate_model`: NLL, perplexity) | {toolchain_tps:,.0f} |
| bare transformers (`model(labels=...)`) | {bare_tps:,.0f} |
| **ratio toolchain / bare** | **{ratio:.3f}** (target >= 0.95: {'met' if ratio >= 0.95 else 'missed'}) |

Measured {payload['machine']['date']} on {payload['machine']['platform']} ({payload['machine']['cpu_count']} CPUs, shared
with other jobs: absolute numbers are noisy, the ratio is what this run shows).
"""
    print(markdown)
    write_results("eval", payload, markdown)


if __name__ == "__main__":
    main()
