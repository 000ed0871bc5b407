"""`minitron search`: the best uniform student a budget allows, chosen the Minitron way, with the trade-off shown.

teacher → every uniform shape of the search space (toolchain/search_space.py) → those within the budget
that cannot grow (toolchain/search_budget.py) → a few of them, evenly spread, plus the best width-only
and depth-only shapes → one shared importance pass → each candidate pruned, distilled for the same
short budget and measured against the teacher on the eval split → its speed projected on the profile's
GPU (roofline, toolchain/bench/projection.py) or measured on its CPU engine → ranked by
KL(teacher ‖ student) among those that meet the budget (a CPU speed budget: as measured).

Output directory (resumable: each candidate's result is stored as it finishes; a rerun skips finished
ones; a different search in the same folder is refused):
    search.json                   what this search is (teacher, data, settings)
    importance.safetensors        the shared importance scores
    candidates/ID/pruned/         the candidate's pruned checkpoint
    candidates/ID/distilled/      after the short distillation
    candidates/ID/result.json     shape, size, KL, perplexity
    teacher-cache/                the teacher's top-k log-probs of the distillation rows, shared by every candidate
                                  (unless distill.teacher_cache names another, or a hidden-state loss needs the teacher online)
    engines/, speed.json          with a CPU profile: the CPU engines and their measured batch-1 decode speed
    candidates.json, candidates.md, pareto.png   ranked candidates, speed projected (GPU profile) or measured (CPU profile)
    chosen/                       the best candidate's pruned checkpoint, ready for `minitron distill`
Not here: the long distillation of the chosen student (`minitron distill`, or a recipe's distill stage).
"""

import functools
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from toolchain.errors import UserError, setting
from toolchain.models import load_config, load_frozen_model, load_model, load_tokenizer, model_fingerprint, resolve_model_dir
from toolchain.paths import atomic_write_text, check_output_location
from toolchain.prune.shapes import ModelShape
from toolchain.search_budget import format_quantity, nearest_miss, parse_budget, spread, survivors
from toolchain.search_space import Architecture, enumerate_shapes, parameter_count, shape_cost
from toolchain.settings import ComputeConfig, DataConfig, DistillConfig, EvalConfig, ImportanceConfig, PruneConfig, SearchConfig

log = logging.getLogger(__name__)

IDENTITY_FILE = "search.json"
RESULT_FILE = "result.json"
SPEED_REQUESTS = 4  # measured batch-1 requests per model on the CPU engine


def candidate_id(shape: ModelShape) -> str:
    return (f"h{shape.hidden_size}-f{shape.ffn_hidden_size}-a{shape.num_attention_heads}-k{shape.num_key_value_heads}"
            f"-l{shape.num_layers}")


def prune_settings(shape: ModelShape, depth_method: str) -> PruneConfig:
    return PruneConfig(hidden_size=shape.hidden_size, ffn_hidden_size=shape.ffn_hidden_size, num_attention_heads=shape.num_attention_heads,
                       num_key_value_heads=shape.num_key_value_heads, num_layers=shape.num_layers, depth_method=depth_method)


@dataclass(frozen=True)
class Measure:
    """The quantity a budget constrains, as a function of a shape, and how it is known (computed, projected)."""

    of: Callable[[ModelShape], float]
    kind: str  # computed | projected
    note: str


def budget_measure(kind: str, architecture: Architecture, original: ModelShape, settings: SearchConfig) -> Measure:
    """Parameters are counted; memory is computed at the profile's precision; speed is projected on the profile's device
    (a GPU's data sheet, or this CPU's measured bandwidth and FLOP rate for a CPU profile)."""
    if kind in ("params", "non_embedding"):
        field = "total" if kind == "params" else "non_embedding"
        return Measure(lambda shape: parameter_count(shape, architecture)[field], "computed", "parameters, counted")
    if settings.profile is None:
        raise UserError(f"a {kind} budget needs an engine profile to measure against; pass {setting('search.profile')} (e.g. h100-fp8 or cpu-fp32)")
    from toolchain.bench.bound import measure_cpu
    from toolchain.bench.projection import profile_device, profile_precision
    from toolchain.bench.workloads import load_workload
    from toolchain.engine_profile import load_profile

    profile = load_profile(settings.profile)
    precision = profile_precision(profile)
    cost = lambda shape: shape_cost(shape, architecture, precision)  # noqa: E731
    if kind == "memory":
        return Measure(lambda shape: cost(shape).weight_bytes_stored + cost(shape).kv_bytes_per_token * profile.max_seq_len, "computed",
                       f"weights at {precision.label} plus the KV cache of one {profile.max_seq_len}-token sequence ({profile.name})")
    device = profile_device(profile, measure_cpu(settings.threads) if profile.device is None else None)
    input_len, output_len = load_workload(settings.workload).expected_lengths()
    context = input_len + output_len / 2

    def tokens_per_second(shape: ModelShape) -> float:
        return 1 / device.seconds(cost(shape).decode_step(1, context), precision.compute)

    teacher = tokens_per_second(original)
    note = f"batch-1 decode at {context:.0f} tokens of context on {device.name} ({profile.name}): roofline, projected"
    if kind == "speedup":
        return Measure(lambda shape: tokens_per_second(shape) / teacher, "projected", note)
    return Measure(lambda shape: 1 / tokens_per_second(shape), "projected", note)


def choose_candidates(original: ModelShape, architecture: Architecture, settings: SearchConfig) -> tuple[list[dict], dict]:
    """The shapes to distil: spread survivors plus the best width-only and depth-only ones, each labelled."""
    budget = parse_budget(settings.budget)
    shapes = enumerate_shapes(original, settings.hidden_multiple, settings.ffn_multiple, settings.layer_step, settings.min_fraction,
                              settings.search_heads)
    if not shapes:
        raise UserError(f"the search space is empty: no hidden size that is a multiple of {setting('search.hidden_multiple')} "
                        f"{settings.hidden_multiple} divides into the heads; lower it or turn on {setting('search.search_heads')}")
    metric = budget_measure(budget.kind, architecture, original, settings)
    measure = metric.of
    limit = budget.limit(measure(original))
    kept = survivors(shapes, measure, budget, limit, settings.tolerance)
    if not kept:
        nearest, value = nearest_miss(shapes, measure, budget, limit)
        raise UserError(f"no candidate meets {setting('search.budget')} {settings.budget} ({format_quantity(budget.kind, limit)}): the nearest, "
                        f"{candidate_id(nearest)}, has {format_quantity(budget.kind, value)}; relax the budget or lower "
                        f"{setting('search.min_fraction')} (the smallest share of each axis searched)")
    width_only = [s for s in kept if s.num_layers == original.num_layers]
    depth_only = [s for s in kept if (s.hidden_size, s.ffn_hidden_size, s.num_attention_heads) ==
                  (original.hidden_size, original.ffn_hidden_size, original.num_attention_heads)]
    size = lambda shape: parameter_count(shape, architecture)["total"]  # noqa: E731
    labelled = {shape: "searched" for shape in spread(kept, settings.max_candidates, key=size)}
    if width_only:
        labelled[max(width_only, key=size)] = "width-only"
    if depth_only:
        labelled[max(depth_only, key=size)] = "depth-only"
    chosen = [{"id": candidate_id(shape), "shape": shape.to_dict(), "kind": kind, "parameters": parameter_count(shape, architecture),
               "budget_value": measure(shape), "budget_value_kind": metric.kind} for shape, kind in labelled.items()]
    summary = {"budget": settings.budget, "budget_kind": budget.kind, "limit": limit, "measure": {"kind": metric.kind, "note": metric.note},
               "space": len(shapes), "within_budget": len(kept)}
    return chosen, summary


def run_candidate(teacher: str, candidate: dict, directory: Path, settings: SearchConfig, importance: ImportanceConfig, importance_file: Path,
                  distill_settings: DistillConfig, data: DataConfig, compute: ComputeConfig, evaluation: EvalConfig, eval_rows,
                  teacher_model: Callable) -> dict:
    """Prune, distil briefly and measure one candidate; its result.json is written last, so a finished candidate is skipped.
    `teacher_model()` gives the frozen teacher of the eval, loaded once for all candidates."""
    from toolchain.distill import distill
    from toolchain.evaluate import evaluate_model
    from toolchain.prune import prune
    from toolchain.training import checkpoint_dirs

    result_file = directory / RESULT_FILE
    if result_file.is_file():
        return json.loads(result_file.read_text())
    shape = ModelShape(**candidate["shape"])
    pruned, distilled = directory / "pruned", directory / "distilled"
    if not (pruned / "pruning.json").is_file():
        shutil.rmtree(pruned, ignore_errors=True)
        prune(teacher, pruned, prune_settings(shape, settings.depth_method), importance, data, compute, importance_file=importance_file)
    distill(teacher, str(pruned), distilled, distill_settings, data, compute, EvalConfig(max_batches=0), resume=bool(checkpoint_dirs(distilled)),
            resume_hint="rerun the same search to continue")
    student = load_model(distilled, dtype=compute.dtype, device=compute.device)
    metrics = evaluate_model(student, eval_rows, evaluation, teacher=teacher_model(),
                             description=f"eval {candidate['id']}")
    result = {**candidate, "kl": metrics["kl"], "perplexity": metrics["perplexity"], "top1_agreement": metrics["top1_agreement"],
              "eval_tokens": metrics["tokens"]}
    atomic_write_text(result_file, json.dumps(result, indent=1) + "\n")
    return result


def measured_cpu_speeds(teacher: str, students: dict[str, Path], out: Path, settings: SearchConfig, data: DataConfig, compute: ComputeConfig) -> dict:
    """Batch-1 decode speed of the teacher and each distilled candidate on the CPU engine of the search's (CPU) profile.

    Engines are built once (engines/ID) and measured in one harness run, so every ratio comes from the
    same machine state; speed.json keeps the result for reruns."""
    from toolchain.bench.harness import bench
    from toolchain.build import build
    from toolchain.engine_profile import load_profile
    from toolchain.settings import BenchConfig, ServeConfig

    record = out / "speed.json"
    if record.is_file() and set(json.loads(record.read_text())) == set(students):
        return json.loads(record.read_text())
    profile = load_profile(settings.profile)
    engines = {"teacher": out / "engines" / "teacher", **{label: out / "engines" / label for label in students}}
    for label, source in {"teacher": teacher, **students}.items():
        if not (engines[label] / "manifest.json").is_file():
            shutil.rmtree(engines[label], ignore_errors=True)
            build(profile, str(source), engines[label], data)
    measurement = BenchConfig(backend="cpu-engine", workload=settings.workload, threads=settings.threads, profiles=[],
                              workload_overrides={"concurrency": [1], "requests": SPEED_REQUESTS, "warmup": 1})
    results = bench(str(engines["teacher"]), [str(engines[label]) for label in students], measurement, data, ServeConfig(), compute,
                    labels=["teacher", *students])
    point = {model["label"]: model["load_points"][0] for model in results["models"]}
    speeds = {label: {"speedup": point[label]["output_tokens_per_s_per_user"] / point["teacher"]["output_tokens_per_s_per_user"],
                      "latency": point[label]["itl_ms"]["p50"] / 1e3, "kind": "measured",
                      "note": f"CPU engine ({profile.name}), batch 1, {settings.threads} thread(s), ITL p50"} for label in students}
    atomic_write_text(record, json.dumps(speeds, indent=1) + "\n")
    return speeds


def candidate_speeds(results: list[dict], original: ModelShape, architecture: Architecture, teacher: str, out: Path, settings: SearchConfig,
                     data: DataConfig, compute: ComputeConfig) -> None:
    """Add each candidate's speed (speedup and latency against the teacher), projected on a GPU profile, measured on a CPU one."""
    if settings.profile is None:
        return
    from toolchain.engine_profile import load_profile

    if load_profile(settings.profile).device is None:
        speeds = measured_cpu_speeds(teacher, {r["id"]: out / "candidates" / r["id"] / "distilled" for r in results}, out, settings, data, compute)
    else:
        speedup = budget_measure("speedup", architecture, original, settings)
        latency = budget_measure("latency", architecture, original, settings)
        speeds = {r["id"]: {"speedup": speedup.of(ModelShape(**r["shape"])), "latency": latency.of(ModelShape(**r["shape"])), "kind": "projected",
                            "note": speedup.note} for r in results}
    for result in results:
        result["speed"] = speeds[result["id"]]


def meets_budget(result: dict, settings: SearchConfig, limit: float) -> bool:
    """A candidate meets the budget with its best-known value: the measured speed where there is one, else what chose it."""
    budget = parse_budget(settings.budget)
    measured = result.get("speed", {}).get("kind") == "measured" and budget.kind in ("speedup", "latency")
    value = result["speed"][budget.kind] if measured else result["budget_value"]
    return budget.meets(value, limit, settings.tolerance)


def search(model: str, out: Path, settings: SearchConfig, importance: ImportanceConfig, distill_settings: DistillConfig, data: DataConfig,
           compute: ComputeConfig, evaluation: EvalConfig) -> dict:
    """Search `model`'s uniform students within `settings.budget`; returns the ranked candidates (candidates.json)."""
    from toolchain.data import prepare_data, source_fingerprint
    from toolchain.prune import compute_importance, needed_scores

    if settings.budget is None:
        raise UserError(f"name a budget: {setting('search.budget')} params=50%, non_embedding=50%, memory=9GiB, speedup=1.8x or latency=20ms")
    parse_budget(settings.budget)
    out = Path(out)
    check_output_location(out, overwrite=True)
    model_dir = resolve_model_dir(model)
    config = load_config(model_dir)
    original, architecture = ModelShape.from_config(config), Architecture.from_config(config)
    candidates, space = choose_candidates(original, architecture, settings)
    distill_settings = distill_settings.model_copy(update={"tokens": settings.tokens, "steps": None})
    if distill_settings.intermediate_loss == "none":
        # every candidate trains on the same rows: the teacher runs once over them, not once per candidate;
        # a relative cache directory (a recipe's) lies in OUT, as a run's lies in its run folder
        cache = Path(distill_settings.teacher_cache or "teacher-cache")
        distill_settings = distill_settings.model_copy(update={"teacher_cache": str(cache if cache.is_absolute() else out / cache)})
    identity = {"teacher": model_fingerprint(model_dir), "data": {**data.model_dump(mode="json"), "content": source_fingerprint(data.spec, data.text_field)},
                "search": settings.model_dump(mode="json"), "importance": importance.model_dump(mode="json"),
                "distill": distill_settings.model_dump(mode="json"), "eval": evaluation.model_dump(mode="json"), "compute": compute.model_dump(mode="json")}
    identity_file = out / IDENTITY_FILE
    if identity_file.is_file():
        if json.loads(identity_file.read_text()) != identity:
            raise UserError(f"{out} holds a search with other settings, teacher or data; choose another --out (its finished candidates stay there)")
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty and holds no search; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(identity_file, json.dumps(identity, indent=1) + "\n")
    log.info("search space: %d shapes, %d within %s; distilling %d candidates for %d tokens each", space["space"], space["within_budget"],
             settings.budget, len(candidates), settings.tokens)

    importance_file = out / "importance.safetensors"
    names = []
    for candidate in candidates:
        shape = ModelShape(**candidate["shape"])
        names += [name for name in needed_scores(original, shape, prune_settings(shape, settings.depth_method), None) if name not in names]
    compute_importance(model, importance_file, names, importance, data, compute, reuse=importance_file if importance_file.is_file() else None)
    eval_rows = prepare_data(data, load_tokenizer(model_dir)).split(evaluation.split)
    teacher_model = functools.cache(lambda: load_frozen_model(model, dtype=compute.dtype, device=compute.device))
    results = [run_candidate(model, candidate, out / "candidates" / candidate["id"], settings, importance, importance_file, distill_settings,
                             data, compute, evaluation, eval_rows, teacher_model) for candidate in candidates]
    candidate_speeds(results, original, architecture, model, out, settings, data, compute)
    for result in results:
        result["meets_budget"] = meets_budget(result, settings, space["limit"])
    ranked = sorted(results, key=lambda result: (not result["meets_budget"], result["kl"]))
    for rank, result in enumerate(ranked, 1):
        result["rank"] = rank
    report = {"teacher": str(model), "space": space, "tokens_per_candidate": settings.tokens, "candidates": ranked,
              "chosen": ranked[0]["id"] if ranked[0]["meets_budget"] else None}
    atomic_write_text(out / "candidates.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out / "candidates.md", format_candidates(report))
    write_pareto_plot(report, out / "pareto.png")
    if report["chosen"] is None:
        raise UserError(f"no candidate meets {settings.budget} as measured on {settings.profile} (candidates.md lists them); relax the budget")
    chosen = out / "chosen"
    if chosen.exists():
        shutil.rmtree(chosen)
    shutil.copytree(out / "candidates" / report["chosen"] / "pruned", chosen)
    return report


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both speed (higher) and KL (lower), by speed."""
    front = [i for i, (speed, kl) in enumerate(points)
             if not any(s >= speed and k <= kl and (s, k) != (speed, kl) for s, k in points)]
    return sorted(front, key=lambda i: points[i][0])


def write_pareto_plot(report: dict, path: Path) -> None:
    """KL after the short distillation against speed (speedup, projected or measured; parameters without a profile), the front joined,
    width-only and depth-only marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from toolchain.bench.plots import save

    results = report["candidates"]
    with_speed = all("speed" in result for result in results)
    xs = [result["speed"]["speedup"] if with_speed else 1 / result["parameters"]["total"] * results[0]["parameters"]["total"] for result in results]
    kls = [result["kl"] for result in results]
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    markers = {"searched": ("o", "tab:blue"), "width-only": ("s", "tab:orange"), "depth-only": ("^", "tab:green")}
    for kind, (marker, colour) in markers.items():
        chosen = [i for i, result in enumerate(results) if result["kind"] == kind]
        axis.scatter([xs[i] for i in chosen], [kls[i] for i in chosen], marker=marker, color=colour, label=kind, zorder=3)
    front = pareto_front(list(zip(xs, kls)))
    axis.plot([xs[i] for i in front], [kls[i] for i in front], color="grey", linestyle="--", label="Pareto front", zorder=2)
    for x, kl, result in zip(xs, kls, results):
        axis.annotate(str(result["rank"]), (x, kl), textcoords="offset points", xytext=(4, 4), fontsize=8)
    kind = results[0]["speed"]["kind"] if with_speed else None
    axis.set_xlabel(f"speedup over the teacher ({kind})" if with_speed else "teacher parameters / candidate parameters")
    axis.set_ylabel("KL(teacher ‖ student) after the short distillation")
    axis.set_title(f"search under {report['space']['budget']}: lower right is better", fontsize=10)
    axis.legend(fontsize=8)
    save(figure, path)


def format_candidates(report: dict) -> str:
    space = report["space"]
    lines = [f"# Search under {space['budget']}", "",
             f"Teacher `{report['teacher']}`; {space['space']:,} uniform shapes, {space['within_budget']:,} within the budget "
             f"({space['measure']['note']}); {len(report['candidates'])} candidates pruned and distilled for {report['tokens_per_candidate']:,} "
             "tokens each, ranked by KL(teacher ‖ student) on the eval split (candidates that miss the budget last).", "",
             f"| rank | candidate | kind | hidden | FFN | heads (KV) | layers | parameters | {space['budget_kind']} ({space['measure']['kind']}) "
             "| speedup | KL | perplexity | meets budget |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in report["candidates"]:
        shape, speed = result["shape"], result.get("speed")
        speedup = f"{speed['speedup']:.2f}x ({speed['kind']})" if speed else "–"
        lines.append(f"| {result['rank']} | `{result['id']}` | {result['kind']} | {shape['hidden_size']} | {shape['ffn_hidden_size']} | "
                     f"{shape['num_attention_heads']} ({shape['num_key_value_heads']}) | {shape['num_layers']} | "
                     f"{result['parameters']['total'] / 1e6:,.1f}M | {format_quantity(space['budget_kind'], result['budget_value'])} | {speedup} | "
                     f"{result['kl']:.3f} | {result['perplexity']:.2f} | {'yes' if result['meets_budget'] else 'no'} |")
    if report["chosen"]:
        lines += ["", f"Chosen: `{report['chosen']}` (its pruned checkpoint is in `chosen/`; distil it with `minitron distill`). Plot: pareto.png."]
    else:
        lines += ["", "No candidate meets the budget as measured; none was chosen. Plot: pareto.png."]
    return "\n".join(lines) + "\n"


def configure_parser(parser) -> None:
    from toolchain.cli_args import add_recipe_source, add_section_flags

    parser.add_argument("--model", required=True, help="teacher: a local Hugging Face directory or a built-in name")
    parser.add_argument("--out", required=True, type=Path, help="search directory (resumable: rerun the same command to continue)")
    parser.add_argument("--json", action="store_true", help="print candidates.json")
    add_recipe_source(parser)
    for section in ("search", "importance", "distill", "data", "compute", "eval"):
        add_section_flags(parser, section, exclude=("tokens", "steps") if section == "distill" else ())


def command(args) -> int:
    from toolchain.cli_args import sections_from_args

    settings, importance, distill_settings, data, compute, evaluation = sections_from_args(args, "search", "importance", "distill", "data", "compute", "eval")
    report = search(args.model, args.out, settings, importance, distill_settings, data, compute, evaluation)
    print(json.dumps(report, indent=1) if args.json else format_candidates(report))
    return 0
