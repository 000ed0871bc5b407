"""`minitron search`: the best uniform student a budget allows, chosen the Minitron way, with the trade-off shown.

teacher → every uniform shape of the search space (toolchain/search_space.py) → those within the budget
that cannot grow (toolchain/search_budget.py) → a few of them, evenly spread, plus the best width-only
and depth-only shapes → one shared importance pass → each candidate pruned, distilled for the same
short budget and measured against the teacher on the eval split → ranked by KL(teacher ‖ student).

Output directory (resumable: each candidate's result is stored as it finishes; a rerun skips finished
ones; a different search in the same folder is refused):
    search.json                   what this search is (teacher, data, settings)
    importance.safetensors        the shared importance scores
    candidates/ID/pruned/         the candidate's pruned checkpoint
    candidates/ID/distilled/      after the short distillation
    candidates/ID/result.json     shape, size, speed (projected or measured), KL, perplexity
    candidates.json, candidates.md, pareto.png
    chosen/                       the best candidate's pruned checkpoint, ready for `minitron distill`
Not here: the long distillation of the chosen student (`minitron distill`, or a recipe's distill stage).
"""

import json
import logging
import shutil
from pathlib import Path

from toolchain.errors import UserError, setting
from toolchain.models import load_config, load_frozen_model, load_model, load_tokenizer, model_fingerprint, resolve_model_dir
from toolchain.paths import atomic_write_text, check_output_location
from toolchain.prune.shapes import ModelShape
from toolchain.search_budget import format_quantity, nearest_miss, parse_budget, spread, survivors
from toolchain.search_space import Architecture, enumerate_shapes, parameter_count
from toolchain.settings import ComputeConfig, DataConfig, DistillConfig, EvalConfig, ImportanceConfig, PruneConfig, SearchConfig

log = logging.getLogger(__name__)

IDENTITY_FILE = "search.json"
RESULT_FILE = "result.json"


def candidate_id(shape: ModelShape) -> str:
    return (f"h{shape.hidden_size}-f{shape.ffn_hidden_size}-a{shape.num_attention_heads}-k{shape.num_key_value_heads}"
            f"-l{shape.num_layers}")


def prune_settings(shape: ModelShape, depth_method: str) -> PruneConfig:
    return PruneConfig(hidden_size=shape.hidden_size, ffn_hidden_size=shape.ffn_hidden_size, num_attention_heads=shape.num_attention_heads,
                       num_key_value_heads=shape.num_key_value_heads, num_layers=shape.num_layers, depth_method=depth_method)


def budget_measure(kind: str, architecture: Architecture):
    """The quantity a budget kind constrains, as a function of a shape."""
    if kind in ("params", "non_embedding"):
        field = "total" if kind == "params" else "non_embedding"
        return lambda shape: parameter_count(shape, architecture)[field]
    raise UserError(f"a {kind} budget needs an engine profile to measure against; pass {setting('search.profile')}")


def choose_candidates(original: ModelShape, architecture: Architecture, settings: SearchConfig) -> tuple[list[dict], dict]:
    """The shapes to distil: spread survivors plus the best width-only and depth-only ones, each labelled."""
    budget = parse_budget(settings.budget)
    shapes = enumerate_shapes(original, settings.hidden_multiple, settings.ffn_multiple, settings.layer_step, settings.min_fraction,
                              settings.search_heads)
    measure = budget_measure(budget.kind, architecture)
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
               "budget_value": measure(shape)} for shape, kind in labelled.items()]
    summary = {"budget": settings.budget, "limit": limit, "space": len(shapes), "within_budget": len(kept)}
    return chosen, summary


def run_candidate(teacher: str, candidate: dict, directory: Path, settings: SearchConfig, importance: ImportanceConfig, importance_file: Path,
                  distill_settings: DistillConfig, data: DataConfig, compute: ComputeConfig, evaluation: EvalConfig, eval_rows) -> dict:
    """Prune, distil briefly and measure one candidate; its result.json is written last, so a finished candidate is skipped."""
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
    metrics = evaluate_model(student, eval_rows, evaluation, teacher=load_frozen_model(teacher, dtype=compute.dtype, device=compute.device),
                             description=f"eval {candidate['id']}")
    result = {**candidate, "kl": metrics["kl"], "perplexity": metrics["perplexity"], "top1_agreement": metrics["top1_agreement"],
              "eval_tokens": metrics["tokens"]}
    atomic_write_text(result_file, json.dumps(result, indent=1) + "\n")
    return result


def search(model: str, out: Path, settings: SearchConfig, importance: ImportanceConfig, distill_settings: DistillConfig, data: DataConfig,
           compute: ComputeConfig, evaluation: EvalConfig) -> dict:
    """Search `model`'s uniform students within `settings.budget`; returns the ranked candidates (candidates.json)."""
    from toolchain.data import prepare_data, source_fingerprint
    from toolchain.prune import compute_importance, needed_scores

    if settings.budget is None:
        raise UserError(f"name a budget: {setting('search.budget')} params=50%, non_embedding=50%, memory=9GiB, speedup=1.8x or latency=20ms")
    out = Path(out)
    check_output_location(out, overwrite=True)
    model_dir = resolve_model_dir(model)
    config = load_config(model_dir)
    original, architecture = ModelShape.from_config(config), Architecture.from_config(config)
    candidates, space = choose_candidates(original, architecture, settings)
    distill_settings = distill_settings.model_copy(update={"tokens": settings.tokens, "steps": None})
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
    results = [run_candidate(model, candidate, out / "candidates" / candidate["id"], settings, importance, importance_file, distill_settings,
                             data, compute, evaluation, eval_rows) for candidate in candidates]
    ranked = sorted(results, key=lambda result: result["kl"])
    for rank, result in enumerate(ranked, 1):
        result["rank"] = rank
    chosen = out / "chosen"
    if chosen.exists():
        shutil.rmtree(chosen)
    shutil.copytree(out / "candidates" / ranked[0]["id"] / "pruned", chosen)
    report = {"teacher": str(model), "space": space, "tokens_per_candidate": settings.tokens, "candidates": ranked, "chosen": ranked[0]["id"]}
    atomic_write_text(out / "candidates.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out / "candidates.md", format_candidates(report))
    return report


def format_candidates(report: dict) -> str:
    space = report["space"]
    lines = [f"# Search under {space['budget']}", "",
             f"Teacher `{report['teacher']}`; {space['space']:,} uniform shapes, {space['within_budget']:,} within the budget; "
             f"{len(report['candidates'])} candidates pruned and distilled for {report['tokens_per_candidate']:,} tokens each, "
             "ranked by KL(teacher ‖ student) on the eval split.", "",
             "| rank | candidate | kind | hidden | FFN | heads (KV) | layers | parameters | KL | perplexity |", "|---|---|---|---|---|---|---|---|---|---|"]
    for result in report["candidates"]:
        shape = result["shape"]
        lines.append(f"| {result['rank']} | `{result['id']}` | {result['kind']} | {shape['hidden_size']} | {shape['ffn_hidden_size']} | "
                     f"{shape['num_attention_heads']} ({shape['num_key_value_heads']}) | {shape['num_layers']} | "
                     f"{result['parameters']['total'] / 1e6:,.1f}M | {result['kl']:.3f} | {result['perplexity']:.2f} |")
    lines += ["", f"Chosen: `{report['chosen']}` (its pruned checkpoint is in `chosen/`; distil it with `minitron distill`)."]
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
