"""`minitron bench`: latency and throughput of engines served through Triton, students against their teacher.

Each target is an engine directory (a Triton server is started on it, measured and stopped) or the
URL of a running server (e.g. a TensorRT-LLM engine in NVIDIA's Triton container). Every target gets
the same workload: prompts cut from the eval split of the data (`input_len` tokens of real text
each), `output_len` new tokens asked for greedily, streamed over gRPC by `concurrency` clients until
`requests` requests have been answered. Per concurrency level it reports what trtllm-bench and
genai-perf report: request throughput, output tokens/s, time to first token (TTFT), inter-token
latency (ITL) and end-to-end latency, each as mean/p50/p90/p99, and the ratio of every target to the
first one (the teacher). It does not tune or warm the server beyond one request per target.
A target whose requests failed more often than `max_error_rate` (default 0) fails the benchmark:
exit 2, saying how many failed, nothing written.
"""

import contextlib
import json
import math
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from toolchain.backends import engine_backend
from toolchain.data import prepare_data
from toolchain.errors import UserError, setting
from toolchain.generate import GenerationError, ServerUnreachable, generate_text
from toolchain.manifest import read_manifest
from toolchain.models import load_tokenizer
from toolchain.paths import atomic_write_text, check_output_location
from toolchain.settings import BenchConfig, DataConfig, ServeConfig

PERCENTILES = (50, 90, 99)
BENCH_FILE = "bench.json"


@dataclass
class RequestTiming:
    started: float
    first_response: float | None = None
    finished: float | None = None
    pieces: int = 0
    error: str | None = None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (the definition genai-perf and trtllm-bench use for small samples)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else float("nan")


def summarize(values: list[float]) -> dict:
    if not values:
        return {}
    return {"mean": statistics.fmean(values), **{f"p{q}": percentile(values, q) for q in PERCENTILES}}


def workload_prompts(tokenizer, data: DataConfig, input_len: int, count: int) -> list[str]:
    """`count` prompts of `input_len` tokens of real text from the eval split (cycled if it is short)."""
    rows = prepare_data(data.model_copy(update={"seq_len": input_len}), tokenizer).split("eval")
    return [tokenizer.decode(rows[i % len(rows)].tolist(), skip_special_tokens=True) for i in range(count)]


def one_request(url: str, prompt: str, output_len: int) -> RequestTiming:
    timing = RequestTiming(started=time.perf_counter())
    try:
        for piece in generate_text(url, prompt, max_tokens=output_len, stream=True, protocol="grpc"):
            timing.first_response = timing.first_response or time.perf_counter()
            timing.pieces += 1
    except (GenerationError, ServerUnreachable) as exc:
        timing.error = str(exc)
    timing.finished = time.perf_counter()
    return timing


def run_level(url: str, prompts: list[str], output_len: int, concurrency: int) -> dict:
    """`concurrency` clients take prompts from a shared queue until all are answered.

    Output tokens are the streamed responses: both the CPU model and TensorRT-LLM's streaming
    postprocessing send one per token (the CPU model adds one more only when the answer ends inside
    a multi-byte character). Re-tokenizing the text, as genai-perf does, miscounts when a model emits
    byte fragments. ITL = (latency - TTFT) / (tokens - 1).
    """
    timings: list[RequestTiming] = []
    lock = threading.Lock()
    next_prompt = iter(prompts)

    def client() -> None:
        while True:
            with lock:
                prompt = next(next_prompt, None)
            if prompt is None:
                return
            timing = one_request(url, prompt, output_len)
            with lock:
                timings.append(timing)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    answered = [t for t in timings if t.error is None and t.first_response is not None]
    tokens = [t.pieces for t in answered]
    return {
        "concurrency": concurrency,
        "requests": len(timings),
        "errors": len(timings) - len(answered),
        "error_examples": sorted({t.error for t in timings if t.error})[:3],
        "seconds": wall,
        "request_throughput": len(answered) / wall,
        "output_tokens_per_second": sum(tokens) / wall,
        "output_tokens_per_request": sum(tokens) / max(1, len(answered)),
        "ttft_s": summarize([t.first_response - t.started for t in answered]),
        "itl_s": summarize([(t.finished - t.first_response) / (n - 1) for t, n in zip(answered, tokens) if n > 1]),
        "latency_s": summarize([t.finished - t.started for t in answered]),
    }


@contextlib.contextmanager
def served(target: str, threads: int | None, max_batch_size: int):
    """Yield the gRPC URL of a target: a running server as given, or a Triton started on an engine dir for the block."""
    if not Path(target).is_dir():
        yield target
        return
    from toolchain.serve import serving

    with serving(Path(target), ServeConfig(threads=threads, max_batch_size=max_batch_size)) as running:
        yield running.endpoints.grpc


def check_targets(targets: list[str]) -> dict:
    """Refuse, before any server starts, targets that are neither engine directories served here nor HOST:PORT URLs.

    Returns the manifests of the engine directories among them, in order."""
    manifests = {}
    for target in targets:
        if Path(target).is_dir():
            manifests[target] = read_manifest(Path(target))
            reason = engine_backend(manifests[target].backend).unavailable_reason()
            if reason is not None:
                raise UserError(f"bench target {target} cannot be served here: {reason}; serve it where it runs and pass its gRPC HOST:PORT instead")
        elif ":" not in target:
            raise UserError(f"bench target {target!r} is neither an engine directory nor a HOST:PORT URL")
    return manifests


def check_error_rate(label: str, levels: list[dict], max_error_rate: float) -> None:
    requests = sum(level["requests"] for level in levels)
    failed = sum(level["errors"] for level in levels)
    if requests and failed / requests > max_error_rate:
        example = next(error for level in levels for error in level["error_examples"])
        raise UserError(f"{failed} of {requests} requests to {label} failed, e.g.: {example} -- nothing was written; fix the target, "
                        f"or set {setting('bench.max_error_rate')} (a share in [0, 1]) to accept failed requests")


def bench(targets: list[str], settings: BenchConfig, data: DataConfig, serve: ServeConfig, tokenizer: str | None = None,
          labels: list[str] | None = None, out: Path | None = None) -> dict:
    """Measure every target with the same workload; the first target is the baseline of the ratios.

    Prompts come from the eval split of `data`; engine directories are served with `serve`'s batch and
    `settings.threads`. A target with more than `settings.max_error_rate` of its requests failed stops
    the benchmark with a UserError, and nothing is written.
    """
    input_len, output_len, requests, concurrency = settings.input_len, settings.output_len, settings.requests, settings.concurrency
    threads, max_error_rate = settings.threads, settings.max_error_rate
    if not targets:
        raise UserError("name at least one target: an engine directory or a running server's gRPC HOST:PORT")
    labels = labels or [target.rstrip("/") for target in targets]
    if len(labels) != len(targets):
        raise UserError(f"--labels names {len(labels)} targets but {len(targets)} were given")
    if out is not None:
        check_output_location(Path(out), "--out", overwrite=True)  # its files are replaced one by one, atomically
    manifests = check_targets(targets)
    if tokenizer is not None:
        prompt_tokenizer = load_tokenizer(tokenizer)
    elif manifests:
        first, manifest = next(iter(manifests.items()))
        prompt_tokenizer = engine_backend(manifest.backend).load_tokenizer(Path(first), manifest)
    else:
        raise UserError("with only URL targets, pass --tokenizer (a model directory or built-in name) to cut the prompts")
    prompts = workload_prompts(prompt_tokenizer, data, input_len, requests)
    results = {"workload": {"data": data.spec, "input_len": input_len, "output_len": output_len, "requests": requests,
                            "concurrency": list(concurrency), "engine_threads": threads, "max_error_rate": max_error_rate}, "targets": []}
    for target, label in zip(targets, labels):
        with served(target, threads, serve.max_batch_size) as url:
            one_request(url, prompts[0], 4)  # warm-up: first-request costs are not the engine's speed
            levels = [run_level(url, prompts, output_len, level) for level in concurrency]
        check_error_rate(label, levels, max_error_rate)
        results["targets"].append({"target": target, "label": label, "levels": levels})
    add_ratios(results)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out) / BENCH_FILE, json.dumps(results, indent=2))
        atomic_write_text(Path(out) / "bench.md", format_bench(results))
    return results


def add_ratios(results: dict) -> None:
    baseline = results["targets"][0]["levels"]
    for target in results["targets"]:
        for level, base in zip(target["levels"], baseline):
            level["vs_first"] = {
                "output_tokens_per_second": ratio(level["output_tokens_per_second"], base["output_tokens_per_second"]),
                "ttft_p50": ratio(base["ttft_s"].get("p50"), level["ttft_s"].get("p50")),
                "latency_p50": ratio(base["latency_s"].get("p50"), level["latency_s"].get("p50")),
            }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def format_bench(results: dict) -> str:
    w = results["workload"]
    lines = [f"Workload: {w['requests']} requests, {w['input_len']} prompt tokens, up to {w['output_len']} new tokens (greedy, streamed over gRPC), "
             f"engine threads {w['engine_threads']}, data {w['data']}.", "",
             "| target | conc. | req/s | out tok/s | TTFT p50 ms | ITL p50 ms | latency p50 / p99 s | errors | speed-up vs first (tok/s, latency) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for target in results["targets"]:
        for level in target["levels"]:
            ms = lambda stats, key: f"{stats[key] * 1e3:.0f}" if stats else "–"  # noqa: E731
            latency = level["latency_s"]
            vs = level["vs_first"]
            lines.append(f"| {target['label']} | {level['concurrency']} | {level['request_throughput']:.2f} | "
                         f"{level['output_tokens_per_second']:.1f} | {ms(level['ttft_s'], 'p50')} | {ms(level['itl_s'], 'p50')} | "
                         f"{latency.get('p50', float('nan')):.2f} / {latency.get('p99', float('nan')):.2f} | {level['errors']} | "
                         f"{format_ratio(vs['output_tokens_per_second'])}, {format_ratio(vs['latency_p50'])} |")
    return "\n".join(lines) + "\n"


def format_ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value else "–"


def configure_parser(parser) -> None:
    from toolchain.cli_args import add_recipe_source, add_section_flags

    parser.add_argument("targets", nargs="+", help="engine directories (a Triton server is started on each) or running servers' gRPC HOST:PORT; "
                                                  "the first is the baseline (the teacher)")
    parser.add_argument("--tokenizer", help="tokenizer for the prompts (default: the first engine's)")
    parser.add_argument("--labels", type=lambda s: s.split(","), help="comma-separated names of the targets in the tables (default: as given)")
    parser.add_argument("--out", type=Path, help="write bench.json and bench.md into this directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    add_recipe_source(parser)
    add_section_flags(parser, "bench", exclude=("enabled",))
    add_section_flags(parser, "data", title="data settings (the prompts come from its eval split)")
    add_section_flags(parser, "serve", exclude=("host", "http_port", "grpc_port", "metrics_port", "threads"))


def command(args) -> int:
    from toolchain.cli_args import sections_from_args

    settings, data, serve = sections_from_args(args, "bench", "data", "serve")
    results = bench(args.targets, settings, data, serve, tokenizer=args.tokenizer, labels=args.labels, out=args.out)
    print(json.dumps(results, indent=2) if args.json else format_bench(results))
    return 0
