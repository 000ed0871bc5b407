"""Static vs in-flight batching of `minitron serve` on a CPU engine, side by side in one run (issue 12's targets).

    flock /work/cpu.lock python benchmarks/bench_serve_batching.py [--engine DIR] [--threads 2] [--streams 1 4 16 32] [--results NAME]

The engine defaults to smollm2-135m depth-pruned to 15 layers (`minitron prune --model smollm2-135m --num-layers 15
--calibration-samples 64`), built with `minitron build --profile cpu-fp32 --max-batch-size 32`, cached under
~/.cache/minitron/soak/ (where benchmarks/soak_serve.py keeps its student). For each batching mode one server
(`toolchain.serve.serving`, the same engine threads): in-flight and static at max batch 32, and static at the cpu-fp32
profile's own max batch 4 (what `minitron serve` ran before in-flight batching); the three servers are up together and
each load point runs on the three in turn (an idle server takes no CPU; a drift of the shared machine's speed then falls
on every mode alike); at each stream count N the bench harness's
closed loop (toolchain.bench.load): N streaming gRPC clients, 128-token prompts of the data's eval split, 32 new
tokens, greedy, `--rounds` measured requests per client in steady state (after one warm-up request per client, with the
load kept until the last measured request ends). Records TTFT, end-to-end latency, output tokens/s, the server's memory
(RSS of tritonserver + its python stubs, peak while measuring) and, at the most streams, latency percentiles per
`--window` seconds of the measurement.
Writes benchmarks/results/serve_batching.{json,md}.
"""

import argparse
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import latency_windows, machine, write_results  # noqa: E402
from peak import PeakSampler  # noqa: E402
from soak_serve import WORK, group_rss_mb  # noqa: E402

from toolchain.backends.onnxruntime_genai import inflight_max_num_tokens  # noqa: E402
from toolchain.bench.load import run_load_point  # noqa: E402
from toolchain.bench.runners import TritonRunner  # noqa: E402
from toolchain.bench.workloads import draw_requests, load_workload  # noqa: E402
from toolchain.manifest import read_manifest  # noqa: E402
from toolchain.models import read_tokenizer  # noqa: E402
from toolchain.serve import serving  # noqa: E402
from toolchain.settings import DataConfig, ServeConfig  # noqa: E402

CPU_PROFILE_BATCH = 4  # engines/cpu-fp32.yaml's max_batch_size


def default_engine() -> Path:
    student = WORK / "smollm2-135m-15layers"
    engine_dir = WORK / "engine-smollm2-135m-15layers-cpu-fp32-b32"
    run = lambda *args: subprocess.run([sys.executable, "-m", "toolchain", *args], check=True)  # noqa: E731
    if not (student / "config.json").is_file():
        run("prune", "--model", "smollm2-135m", "--out", str(student), "--num-layers", "15", "--calibration-samples", "64")
    if not (engine_dir / "manifest.json").is_file():
        run("build", "--profile", "cpu-fp32", "--max-batch-size", "32", "--model", str(student), "--out", str(engine_dir))
    return engine_dir


def measure(engine_dir: Path, runs: dict, points, threads: int, window_s: float, max_num_tokens: int | None) -> dict:
    """One server per batching mode of `runs` (label -> (mode, max batch)), all up at once, each load point run on every mode in turn.

    An idle server takes no CPU (its engine thread waits for requests), and running the modes one after the other at each
    load point puts a drift of the shared machine's speed on all of them alike rather than on whichever mode ran last.
    """
    modes = {}
    with ExitStack() as stack:
        servers = {}
        for label, (mode, batch) in runs.items():
            settings = ServeConfig(threads=threads, batching=mode, max_batch_size=batch, max_num_tokens=max_num_tokens if mode == "inflight" else None)
            running = stack.enter_context(serving(engine_dir, settings))
            servers[label] = (running.server.process.pid, TritonRunner.sender(running.endpoints.grpc, "ensemble"))
            modes[label] = {"batching": mode, "max_batch_size": batch, "rss_idle_mb": group_rss_mb(running.server.process.pid), "load_points": []}
        for point in points:
            for label, (pgid, send) in servers.items():
                with PeakSampler(lambda: group_rss_mb(pgid), 0.5) as rss:
                    metrics = run_load_point(send, point)
                samples = metrics.pop("samples")
                metrics["rss_peak_mb"] = rss.peak
                metrics["windows"] = latency_windows(samples["sent_s"], {name: samples[name] for name in ("ttft_ms", "e2e_ms")}, window_s)
                modes[label]["load_points"].append(metrics)
                print(f"{label:9s} streams {point.load['concurrency']:3d}: TTFT p50 {metrics['ttft_ms']['p50']:.0f} ms, "
                      f"p99 {metrics['ttft_ms']['p99']:.0f} ms, e2e p50 {metrics['e2e_ms']['p50']:.0f} ms, "
                      f"{metrics['output_tokens_per_s']:.1f} tok/s, {metrics['errors']} errors, RSS {rss.peak:.0f} MB", flush=True)
    return modes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, help="a CPU engine directory (default: the 15-layer smollm2 student, built if missing)")
    parser.add_argument("--threads", type=int, default=2, help="engine threads (the same for both modes)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--rounds", type=int, default=4, help="measured requests per client at each load point")
    parser.add_argument("--window", type=float, default=5.0, help="seconds per window of the latency-over-time table")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-num-tokens", type=int, help="in-flight tokens per engine step (default: the engine profile's)")
    parser.add_argument("--results", default="serve_batching", help="name of the results files in benchmarks/results/")
    args = parser.parse_args()

    engine_dir = args.engine or default_engine()
    manifest = read_manifest(engine_dir)
    max_batch = max(args.streams)
    if manifest.max_batch_size < max_batch:
        raise SystemExit(f"{engine_dir} allows batches of {manifest.max_batch_size}; build it with --max-batch-size {max_batch}")
    workload = load_workload("cpu-128-128", {"input_len": args.input_len, "output_len": args.output_len, "concurrency": args.streams,
                                             "requests": [n * args.rounds for n in args.streams], "warmup": 1})
    points = draw_requests(workload, read_tokenizer(engine_dir / manifest.tokenizer_dir), DataConfig())
    started = time.time()
    static_batch = min(CPU_PROFILE_BATCH, max_batch)
    runs = {"inflight": ("inflight", max_batch), "static": ("static", max_batch), f"static-b{static_batch}": ("static", static_batch)}
    step_tokens = inflight_max_num_tokens(ServeConfig(max_num_tokens=args.max_num_tokens), manifest)  # what the in-flight server gets
    modes = measure(engine_dir, runs, points, args.threads, args.window, args.max_num_tokens)

    def at(label: str, streams: int) -> dict:
        return next(point for point in modes[label]["load_points"] if point["load"]["concurrency"] == streams)

    most = max(args.streams)
    inflight = at("inflight", most)
    ratios = {label: {"e2e_p50_inflight_over_static": inflight["e2e_ms"]["p50"] / at(label, most)["e2e_ms"]["p50"],
                      "ttft_p99_inflight_over_static": inflight["ttft_ms"]["p99"] / at(label, most)["ttft_ms"]["p99"],
                      "tokens_per_s_inflight_over_static": inflight["output_tokens_per_s"] / at(label, most)["output_tokens_per_s"]}
              for label in runs if label != "inflight"}
    scaling = {}
    if 1 in args.streams and 16 in args.streams:
        scaling = {label: at(label, 16)["output_tokens_per_s"] / at(label, 1)["output_tokens_per_s"] for label in runs}
    targets = {}
    for label, ratio in ratios.items():
        against = f"static (max batch {modes[label]['max_batch_size']})"
        targets[f"in-flight p50 e2e <= 0.5x {against} at {most} streams"] = ratio["e2e_p50_inflight_over_static"] <= 0.5
        targets[f"in-flight p99 TTFT <= 0.3x {against} at {most} streams"] = ratio["ttft_p99_inflight_over_static"] <= 0.3
        targets[f"in-flight tok/s >= {against} at {most} streams"] = ratio["tokens_per_s_inflight_over_static"] >= 1
    if scaling:
        targets["in-flight tok/s at 16 streams >= 3x one stream"] = scaling["inflight"] >= 3
    command = "flock /work/cpu.lock python benchmarks/bench_serve_batching.py " + " ".join(sys.argv[1:])
    payload = {"command": command.strip(), "engine": str(engine_dir), "profile": manifest.profile_name, "engine_threads": args.threads,
               "max_batch_size": max_batch, "inflight_max_num_tokens": step_tokens, "input_len": args.input_len, "output_len": args.output_len, "rounds": args.rounds,
               "minutes": (time.time() - started) / 60, "modes": modes, "ratios": ratios, "tokens_per_s_16_over_1": scaling,
               "targets_met": targets, "machine": machine()}
    lines = [f"# Static vs in-flight batching of `minitron serve` ({engine_dir.name})", "",
             f"Command: `{payload['command']}`", "",
             f"Engine {engine_dir.name} (profile {manifest.profile_name}), {args.threads} engine thread{'s' if args.threads > 1 else ''}, "
             f"{args.input_len}-token prompts of the data's eval split, {args.output_len} new tokens, greedy, streaming gRPC, closed loop "
             f"in steady state: {args.rounds} measured requests per client after one warm-up request per client, the load kept "
             f"until the last measured request ends (tokens/s counts every token inside that window); in-flight steps of at most {step_tokens} tokens. "
             f"The three servers are up together and each load point runs on them in turn. Machine: {os.cpu_count()} cores shared with other jobs "
             f"(runs serialised by /work/cpu.lock); one run, {payload['minutes']:.1f} min.", "",
             "| batching | max batch | streams | TTFT p50 ms | TTFT p99 ms | e2e p50 ms | e2e p99 ms | output tok/s | errors | server RSS peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for streams in args.streams:
        for label in runs:
            point = at(label, streams)
            lines.append(f"| {modes[label]['batching']} | {modes[label]['max_batch_size']} | {streams} | {point['ttft_ms']['p50']:.0f} | {point['ttft_ms']['p99']:.0f} | {point['e2e_ms']['p50']:.0f} | "
                         f"{point['e2e_ms']['p99']:.0f} | {point['output_tokens_per_s']:.1f} | {point['errors']} | {point['rss_peak_mb']:.0f} |")
    lines.append("")
    for label, ratio in ratios.items():
        lines.append(f"At {most} streams, in-flight over static (max batch {modes[label]['max_batch_size']}): p50 e2e "
                     f"{ratio['e2e_p50_inflight_over_static']:.2f}, p99 TTFT {ratio['ttft_p99_inflight_over_static']:.2f}, "
                     f"output tok/s {ratio['tokens_per_s_inflight_over_static']:.2f}.")
    if scaling:
        lines.append("Output tok/s at 16 streams over one stream: " + ", ".join(f"{label} {value:.2f}x" for label, value in scaling.items()) + ".")
    lines += ["", f"Latency over time at {most} streams: percentiles of the requests sent in each {args.window:g} s of the measurement.", "",
              "| batching | max batch | window start s | requests | TTFT p50 ms | TTFT p99 ms | e2e p50 ms | e2e p99 ms |", "|---|---|---|---|---|---|---|---|"]
    for label in runs:
        for window in at(label, most)["windows"]:
            lines.append(f"| {modes[label]['batching']} | {modes[label]['max_batch_size']} | {window['window_start_s']:.0f} | {window['requests']} | "
                         f"{window['ttft_ms_p50']:.0f} | {window['ttft_ms_p99']:.0f} | {window['e2e_ms_p50']:.0f} | {window['e2e_ms_p99']:.0f} |")
    lines += ["", "Issue 12 targets:", ""] + [f"- {name}: **{'met' if met else 'not met'}**" for name, met in targets.items()]
    write_results(args.results, payload, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
