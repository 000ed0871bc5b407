"""OpenVINO GenAI's ContinuousBatchingPipeline against our in-flight CPU scheduler, side by side in one run (issue 12, point 2).

    flock /work/cpu.lock python benchmarks/bench_openvino_batching.py [--model DIR] [--openvino-python V/bin/python]
        [--variants openvino-fp32 openvino-fp32-u8kv openvino-int8] [--threads 2] [--streams 1 4 16 32] [--check-install]

One Hugging Face checkpoint (default: the main job's distilled depth student) is turned into both engines, cached
under ~/.cache/minitron/openvino-bench/ (outside the repository): `minitron build --profile cpu-fp32
--max-batch-size 32` for ours, and `optimum-cli export openvino --task text-generation-with-past --weight-format
fp32|int8` for OpenVINO. optimum-intel 2.2 requires transformers < 5.6, which the toolchain's environment (transformers
5.x newer than that) cannot hold, so OpenVINO runs from a venv of its own as a subprocess (as AIPerf does in
crosscheck_aiperf.py); it is no dependency of the toolchain. Its venv, checked to resolve on this machine:
`python3 -m venv V && V/bin/pip install openvino-genai "optimum-intel[openvino]" nncf "transformers<5.6"
"huggingface-hub<1.22" torch==2.13.0+cpu && V/bin/pip uninstall -y torchvision` (torch pinned in the same command:
optimum-intel pulls torchvision, which would upgrade an unpinned torch; the torchvision wheel it gets then fails
against the CPU torch, "operator torchvision::nms does not exist", and transformers with it: the export needs none).

Each engine runs in a worker process of its own (this file with --worker), measured the same way: the bench
harness's closed loop (toolchain.bench.load.run_load_point) calls the engine in-process, no Triton, no network: N
client threads, each sending its next request when its last one finishes, 128-token prompts of the data's eval split
(the same token ids for every engine), 32 new tokens, greedy, `--rounds` requests per client after 2 warm-up
requests. Ours is toolchain.cpu_engine.CpuEngine(batching="inflight"), the scheduler of toolchain/cpu_inflight.py
that `minitron serve` runs; OpenVINO's is a ContinuousBatchingPipeline stepped by one engine thread that hands every
request's new tokens to its client as each step finishes (how OpenVINO Model Server drives it). Both get the same
engine threads and at most `max(streams)` sequences per step. Records TTFT, end-to-end latency, output tokens/s, the
worker's peak RSS, and every measured request's greedy token ids, compared across engines.
Writes benchmarks/results/openvino_batching.{json,md}.
"""

import argparse
import json
import os
import queue
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from peak import PeakSampler

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path("/work/main/runs/smollm2-135m-minitron/students/depth/distilled")
DEFAULT_CACHE = Path.home() / ".cache" / "minitron" / "openvino-bench"
DEFAULT_OPENVINO_PYTHON = Path("/work/venv-openvino/bin/python")
# name -> (optimum-cli --weight-format, CPU plugin properties besides the thread count)
OPENVINO_VARIANTS = {
    "openvino-fp32": ("fp32", {"KV_CACHE_PRECISION": "f32"}),  # fp32 weights and KV cache: the same numerics as ours
    "openvino-fp32-u8kv": ("fp32", {}),  # the CPU plugin's default: u8 KV cache
    "openvino-int8": ("int8", {}),  # NNCF int8 weights (optimum-cli's default for int8), u8 KV cache
}
WORKER_TIMEOUT_S = 900


# --- the worker: one engine, every load point, in this process -------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def inflight_sender(engine_dir: Path, threads: int, max_batch: int):
    """Our in-flight scheduler as `minitron serve` builds it from an engine directory; `send(ids, max_new_tokens)` yields token ids."""
    from toolchain.cpu_engine import CpuEngine
    from toolchain.manifest import read_manifest

    RSS["imported"] = rss_mb()  # toolchain.cpu_engine imports torch (through toolchain.models), which the engine does not use
    manifest = read_manifest(engine_dir)
    engine = CpuEngine(engine_dir / manifest.model_dir, threads=threads, max_batch_size=max_batch, tokenizer_dir=engine_dir / manifest.tokenizer_dir,
                       max_input_len=manifest.max_input_len, max_seq_len=manifest.max_seq_len, batching="inflight")
    config = {"max_batch_size": max_batch, "max_num_tokens": engine.scheduler.max_num_tokens, "kv_cache_tokens": engine.scheduler.kv_cache_tokens}
    return lambda ids, max_new_tokens: engine.generate(list(ids), max_new_tokens), config


FINISHED = object()
RSS = {}  # the worker's RSS in MB after importing its engine's modules, before loading the engine


def openvino_sender(model_dir: Path, threads: int, max_batch: int, properties: dict):
    """A ContinuousBatchingPipeline stepped by one engine thread: requests join at the next step, their tokens go to their clients after each."""
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    RSS["imported"] = rss_mb()
    scheduler = ov_genai.SchedulerConfig()
    scheduler.max_num_seqs = max_batch
    pipe = ov_genai.ContinuousBatchingPipeline(str(model_dir), scheduler, "CPU", {"INFERENCE_NUM_THREADS": threads, **properties})
    eos = set(pipe.get_config().stop_token_ids) | {pipe.get_config().eos_token_id}
    inbox: queue.Queue = queue.Queue()

    def step_forever() -> None:
        active, next_id = {}, 0
        while True:
            try:
                item = inbox.get(block=not active)
            except queue.Empty:
                item = None
            while item is not None:
                ids, max_new_tokens, events = item
                config = pipe.get_config()
                config.max_new_tokens, config.do_sample = max_new_tokens, False
                handle = pipe.add_request(next_id, ov.Tensor(np.asarray([ids], dtype=np.int64)), config)
                active[next_id], next_id = (handle, events), next_id + 1
                try:
                    item = inbox.get_nowait()
                except queue.Empty:
                    item = None
            pipe.step()
            for request_id, (handle, events) in list(active.items()):
                running = handle.get_status() == ov_genai.GenerationStatus.RUNNING
                while handle.can_read():
                    for output in handle.read().values():
                        for token in output.generated_ids:
                            events.put(int(token))
                if not running:
                    events.put(FINISHED)
                    del active[request_id]

    threading.Thread(target=step_forever, name="openvino-engine", daemon=True).start()

    def send(ids, max_new_tokens):
        events: queue.Queue = queue.Queue()
        inbox.put((ids, max_new_tokens, events))
        while (token := events.get()) is not FINISHED:
            if token not in eos:  # ours never sends the EOS token; neither does this
                yield token

    return send, {"max_num_seqs": max_batch, "scheduler": scheduler.to_string(), "properties": {"INFERENCE_NUM_THREADS": threads, **properties},
                  "openvino_genai": ov_genai.__version__}


def run_worker(args) -> None:
    """Load one engine, run every load point of the requests file against it, write metrics, memory and greedy ids to --out."""
    sys.path.insert(0, str(ROOT))
    from toolchain.bench.load import BenchRequest, LoadPointRequests, run_load_point

    spec = json.loads(args.worker_spec.read_text())
    loaded = time.perf_counter()
    if spec["engine"] == "inflight":
        generate, config = inflight_sender(Path(spec["engine_dir"]), spec["threads"], spec["max_batch"])
    else:
        generate, config = openvino_sender(Path(spec["engine_dir"]), spec["threads"], spec["max_batch"], spec["properties"])
    load_seconds = time.perf_counter() - loaded
    RSS["loaded"] = rss_mb()
    outputs: dict[tuple, list[int]] = {}

    def send(request):
        ids = []
        for token in generate(request.prompt_ids, request.max_new_tokens):
            ids.append(token)
            yield 1
        outputs[request.prompt_ids] = ids

    load_points = []
    for point in spec["points"]:
        requests = LoadPointRequests(point["load"], [BenchRequest("", tuple(ids), spec["max_new_tokens"]) for ids in point["warmup"]],
                                     [BenchRequest("", tuple(ids), spec["max_new_tokens"]) for ids in point["measured"]], None)
        with PeakSampler(rss_mb, 0.2) as rss:
            metrics = run_load_point(send, requests)
        metrics.pop("samples")
        metrics["rss_peak_mb"] = rss.peak
        metrics["rss_peak_over_imports_mb"] = rss.peak - RSS["imported"]
        metrics["greedy_ids"] = [outputs.get(tuple(ids)) for ids in point["measured"]]
        load_points.append(metrics)
        print(f"{spec['name']:20s} streams {point['load']['concurrency']:3d}: TTFT p50 {metrics['ttft_ms']['p50']:.0f} ms, "
              f"p99 {metrics['ttft_ms']['p99']:.0f} ms, e2e p50 {metrics['e2e_ms']['p50']:.0f} ms, {metrics['output_tokens_per_s']:.1f} tok/s, "
              f"{metrics['errors']} errors, RSS {rss.peak:.0f} MB", file=sys.stderr, flush=True)
    args.out.write_text(json.dumps({"config": config, "load_seconds": load_seconds, "rss_imported_mb": RSS["imported"], "rss_loaded_mb": RSS["loaded"],
                                    "load_points": load_points}) + "\n")
    os._exit(0)  # the engine threads are daemons blocked in their runtimes; nothing is left to flush


# --- the driver: engines, requests, workers, comparison ---------------------------------------------------------


def build_inflight_engine(model: Path, cache: Path, max_batch: int) -> Path:
    engine_dir = cache / f"ort-cpu-fp32-b{max_batch}"
    if not (engine_dir / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "toolchain", "build", "--profile", "cpu-fp32", "--max-batch-size", str(max_batch),
                        "--model", str(model), "--out", str(engine_dir)], check=True)
    return engine_dir


def export_openvino(openvino_python: Path, model: Path, cache: Path, weight_format: str) -> tuple[Path, float | None]:
    """optimum-intel's export of the checkpoint (done once; the seconds it took, None when cached)."""
    out = cache / f"openvino-{weight_format}"
    if (out / "openvino_model.xml").is_file():
        return out, None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".openvino-{weight_format}-") as scratch:
        command = [str(openvino_python.parent / "optimum-cli"), "export", "openvino", "--model", str(model), "--task", "text-generation-with-past",
                   "--weight-format", weight_format, scratch]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if result.returncode != 0 or not (Path(scratch) / "openvino_model.xml").is_file():
            raise SystemExit(f"{shlex.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        os.rename(scratch, out)
        Path(scratch).mkdir()  # for TemporaryDirectory's cleanup
    return out, time.perf_counter() - started


def run_engine(python: Path, spec: dict, work: Path) -> dict:
    """One worker process (`python` this file --worker) on `spec`; its results."""
    spec_path, out = work / f"{spec['name']}.spec.json", work / f"{spec['name']}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(spec["threads"])}
    result = subprocess.run([str(python), __file__, "--worker", "--worker-spec", str(spec_path), "--out", str(out)], env=env,
                            timeout=WORKER_TIMEOUT_S, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(result.stderr[-4000:] if result.returncode else "".join(line + "\n" for line in result.stderr.splitlines() if "streams" in line))
    if result.returncode != 0 or not out.is_file():
        raise SystemExit(f"the {spec['name']} worker failed ({result.returncode})")
    return json.loads(out.read_text())


def agreement(ours: list, theirs: list) -> dict:
    """How many requests' greedy ids are identical, where the others first differ, and theirs of those (ours are kept whole)."""
    same = sum(a == b for a, b in zip(ours, theirs))
    first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in zip(ours, theirs) if a != b]
    return {"requests": len(ours), "identical": same, "first_difference_at": sorted(first),
            "differing_ids": {str(index): b for index, (a, b) in enumerate(zip(ours, theirs)) if a != b}}


def check_install(main_python: Path) -> dict:
    """pip --dry-run in scratch venvs: does openvino-genai (the runtime alone) resolve beside the main env's pins, and optimum-intel?"""
    pins = subprocess.run([str(main_python), "-c", "import importlib.metadata as m; print(' '.join(f'{p}=={m.version(p)}' for p in "
                           "('transformers', 'huggingface-hub', 'tokenizers', 'numpy', 'torch')))"], capture_output=True, text=True, check=True).stdout.split()
    checks = {}
    with tempfile.TemporaryDirectory(prefix="openvino-pip-check-") as scratch:
        subprocess.run([sys.executable, "-m", "venv", scratch], check=True)
        for name, packages in (("openvino-genai", ["openvino-genai"]), ("optimum-intel[openvino]", ["optimum-intel[openvino]"]),
                               ("optimum-intel[openvino]==2.2.0", ["optimum-intel[openvino]==2.2.0"])):
            command = [f"{scratch}/bin/pip", "install", "--dry-run", "--quiet", "--report", "-", *packages, *pins]
            result = subprocess.run(command, capture_output=True, text=True)
            would = []
            if result.returncode == 0:
                would = sorted(f"{item['metadata']['name']}=={item['metadata']['version']}" for item in json.loads(result.stdout)["install"])
            error = [line for line in result.stderr.splitlines() if "ERROR" in line or "conflict" in line.lower() or "requires" in line.lower()]
            checks[name] = {"command": shlex.join(["pip", "install", "--dry-run", *packages, *pins]), "resolves": result.returncode == 0,
                            "openvino_packages": [p for p in would if "openvino" in p.lower() or "optimum" in p.lower()], "error": error[-6:]}
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a Hugging Face checkpoint (both engines are built from it)")
    parser.add_argument("--openvino-python", type=Path, default=DEFAULT_OPENVINO_PYTHON, help="the python of the OpenVINO venv")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the engines are built once")
    parser.add_argument("--variants", nargs="+", default=["openvino-fp32", "openvino-int8"], choices=list(OPENVINO_VARIANTS))
    parser.add_argument("--threads", type=int, default=2, help="engine threads (the same for every engine)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client at each load point")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--check-install", action="store_true", help="also dry-run pip installs of OpenVINO beside the toolchain's pins")
    parser.add_argument("--markdown-only", action="store_true", help="only rewrite the .md from the results' .json (no measuring)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import RESULTS_DIR, machine, write_results

    if args.markdown_only:
        payload = json.loads((RESULTS_DIR / "openvino_batching.json").read_text())
        write_results("openvino_batching", payload, format_markdown(payload))
        print(format_markdown(payload))
        return

    from toolchain.bench.workloads import draw_requests, load_workload
    from toolchain.models import read_tokenizer
    from toolchain.settings import DataConfig

    started = time.time()
    max_batch = max(args.streams)
    args.cache.mkdir(parents=True, exist_ok=True)
    inflight_dir = build_inflight_engine(args.model, args.cache, max_batch)
    exports, export_seconds = {}, {}
    for weight_format in sorted({OPENVINO_VARIANTS[name][0] for name in args.variants}):
        exports[weight_format], export_seconds[weight_format] = export_openvino(args.openvino_python, args.model, args.cache, weight_format)
    workload = load_workload("cpu-128-128", {"input_len": args.input_len, "output_len": args.output_len, "concurrency": args.streams,
                                             "requests": [n * args.rounds for n in args.streams], "warmup": 2})
    points = [{"load": point.load, "warmup": [list(r.prompt_ids) for r in point.warmup], "measured": [list(r.prompt_ids) for r in point.measured]}
              for point in draw_requests(workload, read_tokenizer(args.model), DataConfig())]
    common_spec = {"threads": args.threads, "max_batch": max_batch, "max_new_tokens": args.output_len, "points": points}
    specs = [({"name": "inflight-ort-fp32", "engine": "inflight", "engine_dir": str(inflight_dir), **common_spec}, Path(sys.executable))]
    for name in args.variants:
        weight_format, properties = OPENVINO_VARIANTS[name]
        specs.append(({"name": name, "engine": "openvino", "engine_dir": str(exports[weight_format]), "properties": properties, **common_spec},
                      args.openvino_python))
    with tempfile.TemporaryDirectory(prefix="openvino-bench-") as work:
        engines = {spec["name"]: run_engine(python, spec, Path(work)) for spec, python in specs}

    ours = engines["inflight-ort-fp32"]
    ratios, agree = {}, {}
    for name in args.variants:
        ratios[name], agree[name] = {}, {}
        for index, streams in enumerate(args.streams):
            mine, theirs = ours["load_points"][index], engines[name]["load_points"][index]
            ratios[name][str(streams)] = {"output_tokens_per_s": theirs["output_tokens_per_s"] / mine["output_tokens_per_s"],
                                     "ttft_p50": theirs["ttft_ms"]["p50"] / mine["ttft_ms"]["p50"],
                                     "ttft_p99": theirs["ttft_ms"]["p99"] / mine["ttft_ms"]["p99"],
                                     "e2e_p50": theirs["e2e_ms"]["p50"] / mine["e2e_ms"]["p50"],
                                     "e2e_p99": theirs["e2e_ms"]["p99"] / mine["e2e_ms"]["p99"],
                                     "rss_peak": theirs["rss_peak_mb"] / mine["rss_peak_mb"],
                                     "rss_peak_over_imports": theirs["rss_peak_over_imports_mb"] / mine["rss_peak_over_imports_mb"]}
            agree[name][str(streams)] = agreement(mine["greedy_ids"], theirs.pop("greedy_ids"))
    scaling = {name: result["load_points"][args.streams.index(16)]["output_tokens_per_s"] / result["load_points"][args.streams.index(1)]["output_tokens_per_s"]
               for name, result in engines.items()} if {1, 16} <= set(args.streams) else {}
    command = "flock /work/cpu.lock python benchmarks/bench_openvino_batching.py " + " ".join(sys.argv[1:])
    payload = {"command": command.strip(), "model": str(args.model), "inflight_engine": str(inflight_dir),
               "openvino_exports": {k: str(v) for k, v in exports.items()}, "export_seconds": export_seconds,
               "openvino_python": str(args.openvino_python), "variants": {name: OPENVINO_VARIANTS[name] for name in args.variants},
               "threads": args.threads, "streams": args.streams, "input_len": args.input_len, "output_len": args.output_len,
               "rounds": args.rounds, "engines": engines, "ratios_over_inflight": ratios, "greedy_agreement": agree,
               "tokens_per_s_16_over_1": scaling, "machine": machine()}
    if args.check_install:
        payload["install_check"] = check_install(Path(sys.executable))
    payload["minutes"] = (time.time() - started) / 60
    write_results("openvino_batching", payload, format_markdown(payload))
    print(format_markdown(payload))


def format_markdown(payload: dict) -> str:
    engines, streams = payload["engines"], payload["streams"]
    lines = ["# OpenVINO GenAI ContinuousBatchingPipeline vs our in-flight CPU scheduler", "",
             f"Command: `{payload['command']}`", "",
             f"Model `{payload['model']}`; ours: its `minitron build --profile cpu-fp32` engine (onnxruntime, "
             f"fp32, toolchain/cpu_inflight.py); OpenVINO GenAI {engines[next(iter(payload['variants']))]['config']['openvino_genai']}: "
             f"its optimum-cli export, from {payload['openvino_python']}. {payload['threads']} engine threads each, in-process (no Triton), "
             f"closed loop, {payload['input_len']}-token prompts of the data's eval split (the same ids for every engine), "
             f"{payload['output_len']} new tokens, greedy, {payload['rounds']} requests per client after 2 warm-up requests. "
             f"Machine: {payload['machine']['cpu_count']} cores shared with other jobs (runs serialised by /work/cpu.lock); "
             f"one run, {payload['minutes']:.1f} min.", ""]
    ours_config = engines["inflight-ort-fp32"]["config"]
    theirs_config = engines[next(iter(payload["variants"]))]["config"]
    scheduler = dict(line.strip().split(": ", 1) for line in theirs_config["scheduler"].splitlines() if ": " in line)
    lines += [f"Scheduling: ours at most {ours_config['max_batch_size']} sequences, {ours_config['max_num_tokens']} tokens per step (waiting "
              f"prompts prefilled together in one forward beside the decoding rows, within that budget), KV budget {ours_config['kv_cache_tokens']} tokens; OpenVINO (its "
              f"SchedulerConfig defaults but max_num_seqs) at most {scheduler['max_num_seqs']} sequences, max_num_batched_tokens "
              f"{scheduler['max_num_batched_tokens']}, dynamic_split_fuse {scheduler['dynamic_split_fuse']}, cache_size {scheduler['cache_size']} "
              "(KV cache grown on demand). optimum-cli export: "
              + ", ".join(f"{fmt} {'cached from an earlier run' if sec is None else f'{sec:.0f} s'}" for fmt, sec in payload["export_seconds"].items())
              + ".", ""]
    lines += ["Variants: " + "; ".join(f"`{name}`: {fmt} weights, CPU properties {props or 'default (u8 KV cache)'}"
                                       for name, (fmt, props) in payload["variants"].items()) + ".", "",
              "| engine | streams | TTFT p50 ms | TTFT p99 ms | e2e p50 ms | e2e p99 ms | output tok/s | errors | peak RSS MB | of it over imports MB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for index, count in enumerate(streams):
        for name, result in engines.items():
            point = result["load_points"][index]
            lines.append(f"| {name} | {count} | {point['ttft_ms']['p50']:.0f} | {point['ttft_ms']['p99']:.0f} | {point['e2e_ms']['p50']:.0f} | "
                         f"{point['e2e_ms']['p99']:.0f} | {point['output_tokens_per_s']:.1f} | {point['errors']} | {point['rss_peak_mb']:.0f} | "
                         f"{point['rss_peak_over_imports_mb']:.0f} |")
    lines += ["", "Peak RSS is the worker process's (engine, runtime, harness); 'over imports' subtracts what the process held after importing "
              "its engine's modules, before loading the model (" + ", ".join(f"{name} {result['rss_imported_mb']:.0f} MB" for name, result in engines.items())
              + "; ours imports torch through toolchain.models and does not use it). Engine load time: "
              + ", ".join(f"{name} {result['load_seconds']:.1f} s" for name, result in engines.items()) + ".", "",
              "Ratios OpenVINO / ours (below 1 is OpenVINO faster for latencies, above 1 for tok/s):", "",
              "| engine | streams | output tok/s | TTFT p50 | TTFT p99 | e2e p50 | e2e p99 | peak RSS | over imports | greedy ids identical |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, by_streams in payload["ratios_over_inflight"].items():
        for count, ratio in by_streams.items():
            same = payload["greedy_agreement"][name][count]
            lines.append(f"| {name} | {count} | {ratio['output_tokens_per_s']:.2f} | {ratio['ttft_p50']:.2f} | {ratio['ttft_p99']:.2f} | "
                         f"{ratio['e2e_p50']:.2f} | {ratio['e2e_p99']:.2f} | {ratio['rss_peak']:.2f} | {ratio['rss_peak_over_imports']:.2f} | {same['identical']}/{same['requests']} |")
    if payload["tokens_per_s_16_over_1"]:
        lines += ["", "Output tok/s at 16 streams over one stream: "
                  + ", ".join(f"{name} {value:.2f}x" for name, value in payload["tokens_per_s_16_over_1"].items()) + "."]
    diffs = {name: sorted(i for by in agree.values() for i in by["first_difference_at"]) for name, agree in payload["greedy_agreement"].items()}
    lines += ["", "Where greedy ids differ, the first differing position (0 = first new token): "
              + "; ".join(f"{name}: {values or 'none'}" for name, values in diffs.items()) + "."]
    if "install_check" in payload:
        lines += ["", "Install check (pip --dry-run in a scratch venv, beside the toolchain env's versions):", ""]
        for name, check in payload["install_check"].items():
            outcome = f"resolves ({', '.join(check['openvino_packages'])})" if check["resolves"] else f"does not resolve: {' / '.join(check['error'])}"
            lines.append(f"- `{check['command']}`: {outcome}")
    return "\n".join(lines + ["", *choice(payload)])


def choice(payload: dict) -> list[str]:
    """The choice by the numbers: which engine is faster at the loaded stream counts, at the same numerics (fp32 weights and KV cache)."""
    name = "openvino-fp32" if "openvino-fp32" in payload["ratios_over_inflight"] else next(iter(payload["ratios_over_inflight"]))
    verdicts = []
    for count in payload["streams"]:
        r = payload["ratios_over_inflight"][name][str(count)]
        faster = r["output_tokens_per_s"] > 1 and r["e2e_p50"] < 1 and r["ttft_p99"] < 1
        slower = r["output_tokens_per_s"] < 1 and r["e2e_p50"] > 1 and r["ttft_p99"] > 1
        verdicts.append(f"{count} stream(s): {'OpenVINO faster' if faster else 'ours faster' if slower else 'mixed'} (output tok/s "
                        f"{r['output_tokens_per_s']:.2f}x, p99 TTFT {r['ttft_p99']:.2f}x, p50 e2e {r['e2e_p50']:.2f}x)")
    lines = ["## Choice", "", f"By the numbers, {name} over ours (same weight and KV-cache precision), faster meaning higher output tok/s "
             f"and lower p99 TTFT and p50 end-to-end latency at once: " + "; ".join(verdicts) + "."]
    checks = payload.get("install_check")
    if checks:
        runtime, exporter, fallback = checks["openvino-genai"], checks["optimum-intel[openvino]==2.2.0"], checks["optimum-intel[openvino]"]
        lines += ["", "Cost of switching: the runtime, openvino-genai, "
                  + ("resolves beside the toolchain environment's transformers, huggingface-hub, tokenizers, numpy and torch, "
                     "so serving needs no pin" if runtime["resolves"] else "does not resolve beside the toolchain environment's versions")
                  + "; the exporter, optimum-intel 2.2.0, " + ("resolves there too" if exporter["resolves"] else "does not (its transformers < 5.6 pin)")
                  + ", and left unpinned pip falls back to " + (", ".join(p for p in fallback["openvino_packages"] if p.startswith("optimum-intel")) or "nothing")
                  + ". An OpenVINO engine family would export in a venv of its own at `minitron build` time (as this benchmark does) "
                  "unless that fallback exports with the toolchain's transformers; see docs/serve.md."]
    return lines


if __name__ == "__main__":
    main()
