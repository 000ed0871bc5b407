"""Soak test of `minitron serve` on a CPU engine: N concurrent streaming gRPC clients for a fixed time.

    python benchmarks/soak_serve.py [--duration-s 600] [--clients 32] [--student DIR | --engine DIR] [--profile cpu-fp32] [--batching inflight]

The student defaults to smollm2-135m depth-pruned to 15 layers (`minitron prune ... --num-layers 15
--calibration-samples 64`), built with `minitron build --profile cpu-fp32`, both cached under
~/.cache/minitron/soak/; `--engine` serves an engine directory already built instead. Reports requests answered, errors, latency / first-token percentiles per window
and the RSS of the server's whole process group (tritonserver + python stubs) at start and end.
Writes benchmarks/results/soak_serve.{json,md}.
"""

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import latency_windows, machine, write_results  # noqa: E402

from toolchain.bench.metrics import percentile  # noqa: E402
from toolchain.bench.report import number, share  # noqa: E402
from toolchain.generate import generate_text  # noqa: E402
from toolchain.paths import cache_dir  # noqa: E402

WORK = cache_dir() / "soak"
PROMPTS = ["The Python tutorial explains", "A list comprehension", "def fibonacci(n):", "Exceptions are raised when",
           "The standard library module os", "Decorators wrap a function", "import json\n", "A generator yields values"]


def minitron(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "toolchain", *args], check=True)


def group_rss_mb(pgid: int) -> float:
    total = 0
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # fields after the command: state, ppid, pgrp, ...
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # rss in pages
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e6


def group_processes(pgid: int) -> int:
    """How many processes of the process group are alive."""
    count = 0
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            count += int(status.read_text().rsplit(")", 1)[1].split()[2]) == pgid
        except (OSError, IndexError, ValueError):
            continue
    return count


def engine_counters(metrics_url: str) -> tuple[float, float]:
    """The served engine's summed step seconds and output tokens so far (its custom metrics on the metrics page)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        page = response.read().decode()
    return tuple(float(re.search(rf'^{name}{{model="ensemble"}} (\S+)$', page, re.MULTILINE).group(1))
                 for name in ("minitron_step_seconds_sum", "minitron_output_tokens"))


def engine_in_window(samples: list[tuple], start: float, end: float) -> dict:
    """Engine busy share and engine ms per output token between the samples nearest `start` and `end`: a slower engine
    raises the ms per token, a server that feeds it less lowers the busy share."""
    first = min(samples, key=lambda sample: abs(sample[0] - start))
    last = min(samples, key=lambda sample: abs(sample[0] - end))
    seconds, busy, tokens = last[0] - first[0], last[1] - first[1], last[2] - first[2]
    return {"engine_busy": busy / seconds if seconds > 0 else None, "engine_ms_per_token": 1e3 * busy / tokens if tokens else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=600)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--window-s", type=float, default=60)
    parser.add_argument("--student", type=Path, help="a pruned student HF directory (default: prune smollm2-135m to 15 layers)")
    parser.add_argument("--engine", type=Path, help="a built CPU engine directory to serve (instead of building one from --student)")
    parser.add_argument("--profile", default="cpu-fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batching", choices=["inflight", "static"], default="inflight")
    parser.add_argument("--max-batch-size", type=int, default=32, help="serve's max batch (capped by the engine's; its profile's is built in)")
    args = parser.parse_args()

    if args.engine:
        engine_dir = args.engine
        manifest = json.loads((engine_dir / "manifest.json").read_text())
        engine_name, args.profile = f"{engine_dir.name} ({manifest['source_model']})", manifest["profile_name"]
    else:
        student = args.student or WORK / "smollm2-135m-15layers"
        if not (student / "config.json").is_file():
            minitron("prune", "--model", "smollm2-135m", "--out", str(student), "--num-layers", "15", "--calibration-samples", "64")
        engine_dir = WORK / f"engine-{student.name}-{args.profile}-b32"
        if not (engine_dir / "manifest.json").is_file():
            minitron("build", "--profile", args.profile, "--max-batch-size", "32", "--model", str(student), "--out", str(engine_dir))
        engine_name = student.name

    server = subprocess.Popen([sys.executable, "-m", "toolchain", "serve", "--engine", str(engine_dir), "--threads", str(args.threads),
                               "--batching", args.batching, "--max-batch-size", str(args.max_batch_size)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    banner = ""
    while not banner.splitlines()[-1:] or not banner.splitlines()[-1].startswith("ready"):
        line = server.stdout.readline()
        if not line:
            raise SystemExit(f"minitron serve failed:\n{banner}")
        banner += line
    grpc_url, metrics_url = (re.search(rf"{name}\s+(\S+)", banner).group(1) for name in ("gRPC", "metrics"))
    pgid = int(re.search(r"process group (\d+)", banner).group(1))
    threading.Thread(target=server.stdout.read, daemon=True).start()  # keep the pipe drained

    for prompt in PROMPTS[:2]:  # warm-up, then the start RSS
        "".join(generate_text(grpc_url, prompt, args.max_tokens, stream=True))
    rss_start = group_rss_mb(pgid)
    records, lock = [], threading.Lock()
    t0 = time.monotonic()
    engine_samples = [(0.0, *engine_counters(metrics_url))]  # (seconds, step seconds, output tokens)
    deadline = t0 + args.duration_s

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            start = time.monotonic()
            first, error, tokens = None, None, 0
            try:
                for _ in generate_text(grpc_url, rng.choice(PROMPTS), args.max_tokens, stream=True, timeout_s=300):
                    first = first or time.monotonic() - start
                    tokens += 1
            except Exception as exc:  # counted, reported, and the client carries on
                error = str(exc)[:200]
            with lock:
                records.append({"t": start - t0, "latency_s": time.monotonic() - start, "ttft_s": first, "tokens": tokens, "error": error})

    clients = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for thread in clients:
        thread.start()
    rss_samples = []
    while time.monotonic() < deadline:
        time.sleep(min(10, max(0.1, deadline - time.monotonic())))
        rss_samples.append((round(time.monotonic() - t0), group_rss_mb(pgid)))
        engine_samples.append((time.monotonic() - t0, *engine_counters(metrics_url)))
    for thread in clients:
        thread.join()
    rss_end = group_rss_mb(pgid)
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=120)
    time.sleep(2)
    left_behind = group_processes(pgid)

    answered = [record["error"] is None for record in records]
    windows = latency_windows([record["t"] for record in records],
                              {"latency_s": [record["latency_s"] if ok else None for record, ok in zip(records, answered)],
                               "ttft_s": [record["ttft_s"] if ok else None for record, ok in zip(records, answered)]},
                              args.window_s, (50, 90, 99), failed=[not ok for ok in answered])
    for window in windows:
        window.update(engine_in_window(engine_samples, window["window_start_s"], min(window["window_start_s"] + args.window_s, args.duration_s)))
    ok = [r for r in records if r["error"] is None]
    errors = [r["error"] for r in records if r["error"] is not None]
    output_tokens = sum(r["tokens"] for r in ok)
    command = "flock /work/cpu.lock python benchmarks/soak_serve.py " + " ".join(sys.argv[1:])
    payload = {"command": command.strip(), "engine": str(engine_dir), "profile": args.profile, "engine_threads": args.threads,
               "batching": args.batching, "max_batch_size": args.max_batch_size, "clients": args.clients,
               "duration_s": args.duration_s, "max_tokens": args.max_tokens, "requests": len(records), "answered": len(ok),
               "errors": len(errors), "error_examples": sorted(set(errors))[:5], "stream_pieces_per_s": output_tokens / args.duration_s,
               "latency_p50_s": percentile([r["latency_s"] for r in ok], 50), "latency_p99_s": percentile([r["latency_s"] for r in ok], 99),
               "rss_start_mb": rss_start, "rss_end_mb": rss_end, "rss_growth_pct": 100 * (rss_end - rss_start) / rss_start,
               "rss_first_loaded_mb": rss_samples[0][1], "rss_growth_under_load_pct": 100 * (rss_end - rss_samples[0][1]) / rss_samples[0][1],
               "rss_samples": rss_samples, "engine_samples": engine_samples, **engine_in_window(engine_samples, 0, args.duration_s), "windows": windows, "server_exit_code": server.returncode,
               "processes_left_after_sigterm": left_behind, "machine": machine()}
    lines = [f"# Soak: {args.clients} streaming gRPC clients for {args.duration_s / 60:.1f} min against `minitron serve`", "",
             f"Command: `{payload['command']}`", "",
             f"Engine: {engine_name} built with profile {args.profile} (max batch 32), served with {args.batching} batching, max batch "
             f"{args.max_batch_size}, {args.threads} engine thread(s), {args.max_tokens} new tokens "
             f"per request, greedy. Machine: {os.cpu_count()} cores shared with other jobs.", "",
             f"- requests answered: **{len(ok)}** of {len(records)}; errors: **{len(errors)}**",
             f"- streamed pieces/s (about tokens/s): {payload['stream_pieces_per_s']:.1f}; latency p50 {payload['latency_p50_s']:.2f} s, "
             f"p99 {payload['latency_p99_s']:.2f} s",
             f"- server RSS (tritonserver + stubs): {rss_start:.0f} MB at start, {rss_end:.0f} MB at end "
             f"(**{payload['rss_growth_pct']:+.1f}%**); first sample under full load ({rss_samples[0][0]} s) {rss_samples[0][1]:.0f} MB, "
             f"growth from there **{payload['rss_growth_under_load_pct']:+.1f}%**; exit code after SIGTERM {server.returncode}, "
             f"processes of the server's group left 2 s later: **{left_behind}**", "",
             f"- engine (its `minitron_step_seconds` and `minitron_output_tokens` metrics): busy {share(payload['engine_busy'])} of the time, "
             f"{number(payload['engine_ms_per_token'], 2)} ms of engine step per output token", "",
             "| window start s | requests | errors | latency p50 s | p90 s | p99 s | first token p50 s | p99 s | engine busy | engine ms/token |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {w['window_start_s']:.0f} | {w['requests']} | {w['errors']} | {w['latency_s_p50']:.2f} | {w['latency_s_p90']:.2f} | "
              f"{w['latency_s_p99']:.2f} | {w['ttft_s_p50']:.2f} | {w['ttft_s_p99']:.2f} | {share(w['engine_busy'])} | {number(w['engine_ms_per_token'], 2)} |"
              for w in windows]
    if errors:
        lines += ["", "Error examples: " + "; ".join(payload["error_examples"])]
    write_results("soak_serve", payload, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
