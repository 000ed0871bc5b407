"""CPU engine (onnxruntime-genai, fp32 and int4) decode speed against transformers' generate, same prompts, pinned threads.

    python benchmarks/bench_cpu_engine.py [--model smollm2-135m] [--threads 1] [--prompt-len 128] [--new-tokens 64]

Per prompt: time to first token (prefill) and decode tokens/s = (generated - 1) / (time after the first
token). transformers' first token is timed by a separate generate of one token. Greedy, batch 1.
Writes benchmarks/results/cpu_engine.{json,md}.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, pin_threads, write_results  # noqa: E402

from toolchain.cpu_engine import CpuEngine, build_cpu_engine  # noqa: E402
from toolchain.data import prepare_data  # noqa: E402
from toolchain.models import load_model, load_tokenizer, resolve_model_dir  # noqa: E402
from toolchain.settings import DataConfig  # noqa: E402


def prompts_from_eval_split(model: str, count: int, length: int) -> list[list[int]]:
    rows = prepare_data(DataConfig(seq_len=max(256, length)), load_tokenizer(model)).split("eval")
    return [rows[i][:length].tolist() for i in range(count)]


def time_transformers(model, prompt: list[int], new_tokens: int) -> dict:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        output = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        total = time.perf_counter() - start
    generated = output.shape[1] - len(prompt)
    return {"generated": generated, "ttft_s": first, "decode_tok_s": (generated - 1) / max(total - first, 1e-9), "tokens": output[0, len(prompt):].tolist()}


def time_engine(engine: CpuEngine, prompt: list[int], new_tokens: int) -> dict:
    start = time.perf_counter()
    tokens, first = [], None
    for token in engine.generate(prompt, max_new_tokens=new_tokens):
        if first is None:
            first = time.perf_counter() - start
        tokens.append(token)
    total = time.perf_counter() - start
    return {"generated": len(tokens), "ttft_s": first, "decode_tok_s": (len(tokens) - 1) / max(total - first, 1e-9), "tokens": tokens}


def summarize(runs: list[dict]) -> dict:
    return {"decode_tok_s_median": statistics.median(r["decode_tok_s"] for r in runs),
            "ttft_s_median": statistics.median(r["ttft_s"] for r in runs),
            "generated_tokens": [r["generated"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    pin_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    prompts = prompts_from_eval_split(args.model, args.prompts, args.prompt_len)

    hf = load_model(args.model, dtype="float32")
    time_transformers(hf, prompts[0], 4)  # warm-up
    results = {"transformers-fp32": [time_transformers(hf, p, args.new_tokens) for p in prompts]}
    del hf
    with tempfile.TemporaryDirectory(prefix="bench-cpu-engine-") as scratch:
        for precision in ("fp32", "int4"):
            start = time.perf_counter()
            build_cpu_engine(model_dir, Path(scratch) / precision, precision)
            build_s = time.perf_counter() - start
            size_mb = sum(f.stat().st_size for f in (Path(scratch) / precision).iterdir()) / 1e6
            with CpuEngine(Path(scratch) / precision, threads=args.threads) as engine:
                time_engine(engine, prompts[0], 4)  # warm-up
                results[f"ort-genai-{precision}"] = [time_engine(engine, p, args.new_tokens) for p in prompts]
            results[f"ort-genai-{precision}"].append({"build_s": build_s, "size_mb": size_mb})

    reference = results["transformers-fp32"]
    summary = {}
    for name, runs in results.items():
        timed = [r for r in runs if "decode_tok_s" in r]
        summary[name] = summarize(timed)
        summary[name]["speedup_vs_transformers"] = summary[name]["decode_tok_s_median"] / summarize(reference)["decode_tok_s_median"]
        summary[name]["greedy_equal_to_transformers"] = [r["tokens"] == ref["tokens"] for r, ref in zip(timed, reference)]
        summary[name].update(next((r for r in runs if "build_s" in r), {}))
    payload = {"model": args.model, "threads": args.threads, "prompts": args.prompts, "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens, "machine": machine(), "summary": summary}
    lines = [f"# CPU engine vs transformers: {args.model}", "",
             f"{args.prompts} prompts of {args.prompt_len} tokens from the python-docs eval split, up to {args.new_tokens} new tokens, "
             f"greedy, batch 1, **{args.threads} thread(s)** pinned (torch and onnxruntime intra-op). Medians over prompts, one run.", "",
             "| engine | decode tok/s | vs transformers | first token s | greedy = transformers | build s | size MB |",
             "|---|---|---|---|---|---|---|"]
    for name, row in summary.items():
        lines.append(f"| {name} | {row['decode_tok_s_median']:.1f} | {row['speedup_vs_transformers']:.2f}x | {row['ttft_s_median']:.3f} | "
                     f"{sum(row['greedy_equal_to_transformers'])}/{len(row['greedy_equal_to_transformers'])} | "
                     f"{row.get('build_s', float('nan')):.1f} | {row.get('size_mb', float('nan')):.0f} |")
    lines += ["", f"Machine: {payload['machine']['cpu_count']} cores, {payload['machine']['platform']}, {payload['machine']['date']} "
              "(shared with other jobs; numbers are noisy)."]
    write_results("cpu_engine", payload, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
