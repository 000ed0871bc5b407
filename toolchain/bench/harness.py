"""`minitron bench`: a teacher against its students on one backend, one workload, against the physical bound, projected onto GPUs.

`bench(teacher, students, ...)` checks every model on the chosen backend (runners.py) before any
work, draws the workload's seeded requests once (workloads.py), measures this CPU's read bandwidth
and matmul rate once (bound.py; the bound of CPU runs), then runs every model through every load
point (load.py) and reports, per model and load point, what trtllm-bench, genai-perf and AIPerf
report (metrics.py), the decode rate as a fraction of the roofline, and per student the speedup
over the teacher beside its bound. It projects the models onto engine profiles' GPUs
(projection.py), writes results.json, results.md (report.py) and PNG plots (plots.py), and fails
with nothing written when more than `max_error_rate` of a model's requests failed.
`project_only` is `minitron bench --project`: the projection alone, from configs, no weights.
Today's `minitron bench ENGINE...` (first the teacher, then the students, through Triton) still works.
"""

import json
import logging
import platform
import shlex
import sys
from pathlib import Path

from toolchain.bench.bound import Device, ModelCost, load_point_bound, measure_cpu
from toolchain.bench.load import run_load_point
from toolchain.bench.runners import RUNNERS, Prepared, RunSettings, Target, engine_config
from toolchain.bench.workloads import Workload, draw_requests, load_workload
from toolchain.errors import UserError, setting
from toolchain.paths import atomic_write_text, check_output_location
from toolchain.settings import BenchConfig, ComputeConfig, DataConfig, ServeConfig

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
REPORT_FILE = "results.md"
LIBRARIES = ("minitron-toolchain", "torch", "transformers", "onnxruntime-genai", "tritonclient", "nvidia-pytriton", "tensorrt_llm")


def environment(threads: int) -> dict:
    import os

    import torch

    from toolchain.bench.bound import cpu_name
    from toolchain.manifest import library_versions

    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": threads, "load_average_1min": os.getloadavg()[0],
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "platform": platform.platform(), "python": platform.python_version(), "libraries": library_versions(LIBRARIES)}


def projection_profiles(names: list[str] | None) -> list:
    """The engine profiles to project onto: those named, or every shipped GPU profile."""
    from toolchain.engine_profile import load_profile, shipped_profile_names

    if names is not None:
        return [load_profile(name) for name in names]
    return [profile for profile in map(load_profile, shipped_profile_names()) if profile.device is not None]


def check_tokenizers(prepared: dict[str, Prepared]) -> None:
    """Every student must tokenize as the teacher does: the same requests must mean the same tokens to all."""
    (teacher, reference), *students = prepared.items()
    vocabulary = reference.tokenizer.get_vocab()
    for label, candidate in students:
        tokenizer = candidate.tokenizer
        if tokenizer.get_vocab() != vocabulary or tokenizer.eos_token_id != reference.tokenizer.eos_token_id:
            raise UserError(f"{label} has another tokenizer than the teacher {teacher} (vocabulary or EOS differ); a student must keep its "
                            "teacher's tokenizer, so both answer the same tokens")


def check_limits(workload: Workload, prepared: dict[str, Prepared]) -> None:
    longest_input, longest_output = workload.longest()
    for label, target in prepared.items():
        if target.max_input_len is not None and longest_input > target.max_input_len:
            raise UserError(f"workload {workload.name} sends prompts of up to {longest_input} tokens but {label} takes at most "
                            f"{target.max_input_len}; lower {setting('workload.input_len')} or rebuild it with a larger max_input_len")
        if target.max_seq_len is not None and longest_input + longest_output > target.max_seq_len:
            raise UserError(f"workload {workload.name} needs up to {longest_input} + {longest_output} tokens per sequence but {label} holds "
                            f"at most {target.max_seq_len}; lower {setting('workload.output_len')} or {setting('workload.input_len')}")


def bound_device(backend: str, compute: ComputeConfig, targets: list[Target], threads: int) -> tuple[Device | None, str | None]:
    """The device the bound is computed for: this CPU (measured once) when the models run on it, else the GPU's data sheet."""
    import torch

    from toolchain.models import resolve_device

    on_gpu = backend == "trtllm" or (backend == "torch" and resolve_device(compute.device).type == "cuda")
    if not on_gpu:
        if backend == "triton" and all(target.is_url() for target in targets):
            return None, "models on a running server: the machine that runs them is unknown here"
        log.info("measuring this CPU's read bandwidth and matmul rate (%d thread(s))", threads)
        return measure_cpu(threads), None
    gpu = torch.cuda.get_device_name()
    for profile in projection_profiles(None):
        if profile.target.lower() in gpu.lower():
            from toolchain.bench.projection import profile_device

            return profile_device(profile), None
    return None, f"no engine profile gives the data sheet of {gpu}"


def student_speedup(point: dict, teacher: dict, teacher_cost: ModelCost | None) -> dict:
    """The student's ratios over the teacher at one load point.

    `bytes_ratio` compares bytes read per token at the student's batch and context: each model's bound
    rounds its own measured batch, and bytes per token at two different batches would compare batching,
    not models."""
    div = lambda a, b: a / b if a and b else None  # noqa: E731
    measured = div(point["output_tokens_per_s"], teacher["output_tokens_per_s"])
    bound, teacher_bound = point.get("bound"), teacher.get("bound")
    roofline = div(bound and bound["tokens_per_s"], teacher_bound and teacher_bound["tokens_per_s"])
    teacher_bytes = teacher_cost.decode_step(bound["batch"], bound["context"]).bytes / bound["batch"] if bound and teacher_cost else None
    return {"output_tokens_per_s": measured, "bound": roofline, "bytes_ratio": div(teacher_bytes, bound and bound["bytes_per_token"]),
            "fraction_of_bound": div(measured, roofline),
            "ttft_p50": div(teacher["ttft_ms"].get("p50"), point["ttft_ms"].get("p50")),
            "e2e_p50": div(teacher["e2e_ms"].get("p50"), point["e2e_ms"].get("p50"))}


def check_error_rate(label: str, points: list[dict], max_error_rate: float) -> None:
    requests = sum(point["requests"] for point in points)
    failed = sum(point["errors"] for point in points)
    if requests and failed / requests > max_error_rate:
        example = next(error for point in points for error in point["error_examples"])
        raise UserError(f"{failed} of {requests} requests to {label} failed, e.g.: {example} -- nothing was written; fix the target, "
                        f"or set {setting('bench.max_error_rate')} (a share in [0, 1]) to accept failed requests")


def make_targets(teacher: str, students: list[str], labels: list[str] | None, url: str | None) -> list[Target]:
    sources = [teacher, *students]
    labels = labels or sources
    if len(labels) != len(sources):
        raise UserError(f"--labels names {len(labels)} models but {len(sources)} were given (the teacher and {len(students)} student(s))")
    if len(set(labels)) != len(labels):
        raise UserError(f"labels must differ, got {labels}; name them with --labels")
    if url is not None:
        return [Target(label, url, served_name=source) for label, source in zip(labels, sources)]
    return [Target(label, source) for label, source in zip(labels, sources)]


def bench(teacher: str, students: list[str], settings: BenchConfig, data: DataConfig, serve: ServeConfig, compute: ComputeConfig = ComputeConfig(),
          out: Path | None = None, labels: list[str] | None = None, url: str | None = None, tokenizer: str | None = None,
          command: str | None = None) -> dict:
    """Measure the teacher and every student with the same workload on `settings.backend`; the teacher is the baseline of the speedups.

    Everything is checked before the first request (backend available here, models, tokenizers,
    engine limits against the workload, `out`, the projection profiles). A model with more than
    `settings.max_error_rate` of its requests failed stops the benchmark with a UserError and nothing
    is written. With `out`, results.json, results.md and the plots are written there.
    """
    runner = RUNNERS[settings.backend]
    if url is not None and settings.backend != "triton":
        raise UserError(f"--url names models on a running Triton server; measure them with --backend triton, not {settings.backend}")
    reason = runner.unavailable_reason()
    if reason is not None:
        raise UserError(f"--backend {settings.backend} cannot run here: {reason}")
    if out is not None:
        check_output_location(Path(out), "--out", overwrite=True)  # its files are replaced one by one, atomically
    workload = load_workload(settings.workload, settings.workload_overrides)
    profiles = projection_profiles(settings.profiles)
    targets = make_targets(teacher, students, labels, url)
    run_settings = RunSettings(settings.threads, serve, compute)
    prepared: dict[str, Prepared] = {}
    for target in targets:  # a model on a running server cuts its prompts with --tokenizer, else with the teacher's
        prepared[target.label] = runner.prepare(target, run_settings, tokenizer or (prepared[targets[0].label].tokenizer if prepared else None))
    check_tokenizers(prepared)
    check_limits(workload, prepared)
    points = draw_requests(workload, prepared[targets[0].label].tokenizer, data)
    device, no_device = bound_device(settings.backend, compute, targets, settings.threads)
    started = environment(settings.threads)  # the load average before the run: other work on the machine skews every number
    models, costs = [], []
    for target in targets:
        ready = prepared[target.label]
        cost = ModelCost.from_config(ready.config, ready.precision) if ready.config is not None else None
        costs.append(cost)
        no_bound = ready.no_bound_reason or no_device
        model = {"label": target.label, "source": target.source, "max_batch": ready.max_batch, "cost": cost.describe() if cost else None,
                 "no_bound_reason": no_bound, "load_points": []}
        log.info("bench %s (%s): %d load point(s)", target.label, settings.backend, len(points))
        with runner.running(target, ready, run_settings) as running:
            for point in points:
                routed = running.harness_seconds()
                metrics = run_load_point(running.send, point)
                add_runner_overhead(metrics, running.harness_seconds() - routed)
                metrics["bound"] = load_point_bound(cost, device, metrics, ready.max_batch) if cost and device else None
                model["load_points"].append(metrics)
                log.info("  %s: %.1f output tok/s, TTFT p50 %s ms, %d error(s)", point.load, metrics["output_tokens_per_s"] or 0,
                         f"{metrics['ttft_ms']['p50']:.0f}" if metrics["ttft_ms"] else "–", metrics["errors"])
        check_error_rate(target.label, model["load_points"], settings.max_error_rate)
        models.append(model)
    for model in models[1:]:
        for point, teacher_point in zip(model["load_points"], models[0]["load_points"]):
            point["speedup"] = student_speedup(point, teacher_point, costs[0])
    configs = {label: ready.config for label, ready in prepared.items()}
    results = {"command": command, "backend": settings.backend, "threads": settings.threads, "workload": workload.model_dump(mode="json"),
               "environment": {**started, "load_average_1min_after": environment(settings.threads)["load_average_1min"]}, "bound_device": device.describe() if device else None, "models": models,
               "projection": projection_of(configs, profiles, workload, device) if None not in configs.values() else None}
    if out is not None:
        write_results(results, Path(out))
    return results


def add_runner_overhead(metrics: dict, runner_seconds: float) -> None:
    """Add the runner's own routing time to the client's bookkeeping time per token."""
    harness, tokens = metrics["harness"], sum(metrics["samples"]["output_tokens"])
    if harness["seconds_per_token"] is None or not tokens:
        return
    harness["seconds_per_token"] += runner_seconds / tokens
    itl = metrics["itl_ms"].get("mean")
    harness["fraction_of_itl"] = harness["seconds_per_token"] * 1e3 / itl if itl else None


def projection_of(configs: dict, profiles: list, workload: Workload, measured_cpu: Device | None) -> dict:
    from toolchain.bench.projection import project

    input_len, output_len = workload.expected_lengths()
    cpu = measured_cpu if measured_cpu is not None and "float32" in measured_cpu.peak_flops else None
    usable = [profile for profile in profiles if profile.device is not None or cpu is not None]
    return project(configs, usable, input_len, output_len, workload.concurrency or [1], measured_cpu=cpu)


def write_results(results: dict, out: Path) -> None:
    from toolchain.bench.plots import write_plots
    from toolchain.bench.report import format_results

    out.mkdir(parents=True, exist_ok=True)
    if results["models"]:
        results["plots"] = write_plots(results, out)
    atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / REPORT_FILE, format_results(results))


def config_of(source: str):
    """The transformers config of a model given as a folder holding at least config.json, a built-in name, or an engine directory."""
    from transformers import AutoConfig

    from toolchain.manifest import read_manifest
    from toolchain.models import BUILTIN_MODELS, load_config

    path = Path(source)
    if source in BUILTIN_MODELS:
        return load_config(source)
    if (path / "manifest.json").is_file():
        config, reason = engine_config(path, read_manifest(path))
        if config is None:
            raise UserError(f"cannot project {source}: {reason}")
        return config
    if not (path / "config.json").is_file():
        raise UserError(f"{source} holds no config.json; --project needs a model folder (config.json is enough), a built-in name or an engine directory")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}/config.json: {str(exc).splitlines()[0]}") from None


def project_only(teacher: str, students: list[str], settings: BenchConfig, labels: list[str] | None = None, out: Path | None = None,
                 command: str | None = None) -> dict:
    """`minitron bench --project`: the projection of teacher and students onto the profiles, from their configs; no weights, no GPU."""
    if out is not None:
        check_output_location(Path(out), "--out", overwrite=True)
    workload = load_workload(settings.workload, settings.workload_overrides)
    profiles = projection_profiles(settings.profiles)
    targets = make_targets(teacher, students, labels, None)
    configs = {target.label: config_of(target.source) for target in targets}
    cpu = measure_cpu(settings.threads) if any(profile.device is None for profile in profiles) else None
    results = {"command": command, "workload": workload.model_dump(mode="json"), "projection": projection_of(configs, profiles, workload, cpu)}
    if out is not None:
        from toolchain.bench.report import format_projection

        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out) / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
        atomic_write_text(Path(out) / REPORT_FILE, format_projection(results["projection"]) + "\n")
    return results


# ---------------------------------------------------------------- CLI


def configure_parser(parser) -> None:
    from toolchain.bench.workloads import Workload
    from toolchain.cli_args import add_recipe_source, add_section_flags

    parser.add_argument("targets", nargs="*", metavar="ENGINE", help="today's form: engine directories or running servers' gRPC HOST:PORT, "
                                                                      "the teacher first (through Triton); use --teacher/--student otherwise")
    parser.add_argument("--teacher", help="the teacher: a model folder or built-in name (torch), an engine directory (cpu-engine, triton, "
                                          "trtllm), or a served model's name with --url; for --project a folder holding config.json is enough")
    parser.add_argument("--student", dest="students", action="append", default=[], help="a student, as --teacher; repeat for several")
    parser.add_argument("--url", help="a running Triton server's gRPC HOST:PORT: --teacher and --student name models it serves")
    parser.add_argument("--project", action="store_true", help="only project the models onto the engine profiles' GPUs (no weights, no GPU)")
    parser.add_argument("--tokenizer", help="tokenizer for the prompts of models on a running server (a model folder or built-in name)")
    parser.add_argument("--labels", type=lambda s: s.split(","), help="comma-separated names of the models in the results (default: as given)")
    parser.add_argument("--out", type=Path, help="write results.json, results.md and the plots into this directory")
    parser.add_argument("--json", action="store_true", help="print results.json instead of the report")
    add_recipe_source(parser)
    add_section_flags(parser, "bench", exclude=("enabled", "workload_overrides"))
    add_section_flags(parser, "workload", Workload, title="workload fields (override the workload's values)", exclude=("name", "description"))
    add_section_flags(parser, "data", title="data settings (prompts: workload `prompts: data` cuts them from its eval split)")
    add_section_flags(parser, "serve", exclude=("host", "http_port", "grpc_port", "metrics_port", "threads"))
    add_section_flags(parser, "compute", title="compute settings (the torch backend)")


def command(args) -> int:
    from toolchain.bench.report import format_projection, format_results
    from toolchain.cli_args import flat_flags, sections_from_args

    settings, data, serve, compute = sections_from_args(args, "bench", "data", "serve", "compute")
    overrides = flat_flags(args, "workload")
    if overrides:
        settings = settings.model_copy(update={"workload_overrides": {**settings.workload_overrides, **overrides}})
    if args.targets and (args.teacher or args.students or args.url):
        raise UserError("name the models either as ENGINE... (the teacher first) or with --teacher/--student, not both")
    teacher, students = (args.targets[0], args.targets[1:]) if args.targets else (args.teacher, args.students)
    if teacher is None:
        raise UserError("name the teacher: --teacher MODEL (and --student MODEL for each student), or ENGINE... with the teacher first")
    line = shlex.join(["minitron", *sys.argv[1:]])
    if args.project:
        results = project_only(teacher, students, settings, labels=args.labels, out=args.out, command=line)
        print(json.dumps(results, indent=2) if args.json else format_projection(results["projection"]))
        return 0
    results = bench(teacher, students, settings, data, serve, compute, out=args.out, labels=args.labels, url=args.url,
                    tokenizer=args.tokenizer, command=line)
    print(json.dumps(results, indent=2) if args.json else format_results(results))
    return 0
