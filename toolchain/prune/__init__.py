"""`minitron prune`: Minitron structured pruning (width and depth) of a Hugging Face checkpoint.

teacher → importance (calibration data) → kept units → sliced model. The output directory is a normal
Hugging Face checkpoint (config with explicit head_dim, safetensors, tokenizer, generation config) plus
`pruning.json` (shapes, parameter counts, kept indices, settings) and `importance.safetensors`, which
`--importance` reuses to prune the same model to other targets without another calibration pass (each
score is reused only if it was computed with the settings now asked for). Three steps: importance
(`gather_importance`; also the recipe's own importance stage, `compute_importance`), planning
(`plan_pruning`: which units survive) and writing (`write_pruned_checkpoint`).
Runs single-process or under `torchrun` (calibration rows sharded over ranks, sums all-reduced, rank 0
writes). Not here: distillation of the pruned student (`minitron distill`).
"""

import json
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path

from toolchain.data import check_seq_len, data_key, shard_rows
from toolchain.distributed import Distributed, distributed_context, prepare_data_on_ranks
from toolchain.errors import UserError
from toolchain.models import load_config, load_frozen_model, load_tokenizer, model_fingerprint, parameter_counts, resolve_model_dir, save_tokenizer
from toolchain.paths import atomic_output_dir, check_output_location, replace_path
from toolchain.prune.importance import (
    WIDTH_SCORES,
    activation_importance,
    contiguous_block_losses,
    depth_score_names,
    dropped_layers,
    lm_loss_scores,
    magnitude_importance,
    random_importance,
    reusable_scores,
    save_importance,
    select_heads,
    top_indices,
)
from toolchain.prune.shapes import ModelShape, pruned_config, target_shape
from toolchain.prune.slicing import PrunePlan, slice_model
from toolchain.settings import ComputeConfig, DataConfig, ImportanceConfig, PruneConfig

log = logging.getLogger(__name__)

IMPORTANCE_FILE = "importance.safetensors"


# ---------------------------------------------------------------- importance


def needed_scores(original: ModelShape, shape: ModelShape, prune: PruneConfig, explicit_drop: list[int] | None) -> list[str]:
    """The importance scores a prune to `shape` reads: width scores if any width axis shrinks, the depth method's if layers go."""
    width_axes = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_key_value_heads")
    names = list(WIDTH_SCORES) if any(getattr(shape, axis) != getattr(original, axis) for axis in width_axes) else []
    if explicit_drop is None:
        names += depth_score_names(prune.depth_method, original.num_layers - shape.num_layers)
    return names


def score_identity(name: str, settings: ImportanceConfig, data: str) -> dict:
    """The settings that determine score `name` (two files agree on a score exactly when these agree)."""
    if name in WIDTH_SCORES:
        identity = {"method": settings.method}
        if settings.method == "random":
            identity["seed"] = settings.seed
        if settings.method == "activation":
            identity.update(batch_aggregation=settings.batch_aggregation, sequence_aggregation=settings.sequence_aggregation,
                            calibration_samples=settings.calibration_samples, data=data)
        return identity
    return {"data": data, "calibration_samples": settings.depth_calibration_samples or settings.calibration_samples}


def compute_scores(model, names: list[str], settings: ImportanceConfig, calibration, runtime: Distributed) -> dict[str, dict]:
    """Compute the named scores on this rank's share of the calibration rows; returns {name: {"scores", "sequences", ...}}."""
    computed: dict[str, dict] = {}
    if any(name in WIDTH_SCORES for name in names):
        if settings.method == "activation":
            rows = calibration[: settings.calibration_samples]
            width = activation_importance(model, shard_rows(rows, runtime.rank, runtime.world_size), settings.batch_size,
                                          settings.sequence_aggregation, settings.batch_aggregation)
            sequences = len(rows)
        else:
            width, sequences = (magnitude_importance(model) if settings.method == "magnitude" else random_importance(model.config, settings.seed)), 0
        computed.update({name: {"scores": width[name], "sequences": sequences} for name in WIDTH_SCORES})
    depth_rows = calibration[: settings.depth_calibration_samples or settings.calibration_samples] if calibration is not None else None
    for name in (name for name in names if name not in WIDTH_SCORES):
        rows = shard_rows(depth_rows, runtime.rank, runtime.world_size)
        if name == "block_importance":
            scores = activation_importance(model, rows, settings.batch_size, settings.sequence_aggregation, settings.batch_aggregation)[name]
            computed[name] = {"scores": scores, "sequences": len(depth_rows)}
            continue
        layers = model.config.num_hidden_layers
        if name == "lm_loss_without_layer":
            base, scores = lm_loss_scores(model, rows, settings.batch_size, layers)
        else:
            base, scores = contiguous_block_losses(model, rows, settings.batch_size, layers, int(name.removeprefix("lm_loss_without_block")))
        computed[name] = {"scores": scores, "sequences": len(depth_rows), "base_lm_loss": base}
    return computed


def gather_importance(model: str, model_dir: Path, torch_model, names: list[str], settings: ImportanceConfig, data: DataConfig,
                      runtime: Distributed, reuse: Path | None, refuse_mismatch: bool) -> tuple[dict, dict]:
    """The named scores: reused from `reuse` where they were computed with these settings, computed otherwise.

    Returns (scores, metadata) ready for `save_importance`: the file records, per score, its identity.
    """
    original = ModelShape.from_config(torch_model.config)
    fingerprint = model_fingerprint(model_dir)
    tokenizer = load_tokenizer(model_dir)
    data_identity = data_key(data, tokenizer)
    wanted = {name: score_identity(name, settings, data_identity) for name in names}
    scores, records = reusable_scores(reuse, fingerprint, original.to_dict(), wanted, refuse_mismatch) if reuse else ({}, {})
    missing = [name for name in names if name not in scores]
    if missing:
        calibration = None
        if settings.method == "activation" or any(name not in WIDTH_SCORES for name in missing):
            check_seq_len(data.seq_len, torch_model.config)
            calibration = prepare_data_on_ranks(data, tokenizer, runtime).split("calibration")
            asked = max(settings.calibration_samples, settings.depth_calibration_samples or 0)
            if len(calibration) < asked:
                log.warning("%s has %d calibration sequences of %d tokens, fewer than the %d asked for; using them all",
                            data.spec, len(calibration), data.seq_len, asked)
        started = time.perf_counter()
        for name, result in compute_scores(torch_model, missing, settings, calibration, runtime).items():
            scores[name] = result.pop("scores")
            records[name] = {"identity": wanted[name], **result, "data": data.spec, "seq_len": data.seq_len, "world_size": runtime.world_size}
        log.info("importance %s computed in %.1f s", ", ".join(missing), time.perf_counter() - started)
    metadata = {"model": str(model), "model_fingerprint": fingerprint, "shape": original.to_dict(), "scores": records}
    return scores, metadata


def compute_importance(model: str, out_file: Path, names: list[str], settings: ImportanceConfig, data: DataConfig, compute: ComputeConfig,
                       reuse: Path | None = None) -> dict:
    """The importance stage of a recipe: write the named scores of `model` to `out_file`, once for every student.

    Scores in `reuse` computed with the same settings are kept; others are recomputed. Returns the metadata.
    """
    out_file = Path(out_file)
    check_output_location(out_file.parent, overwrite=True)
    model_dir = resolve_model_dir(model)
    with distributed_context(compute.device) as runtime:
        torch_model = load_frozen_model(model_dir, dtype=compute.dtype, device=str(runtime.device))
        scores, metadata = gather_importance(model, model_dir, torch_model, names, settings, data, runtime, reuse, refuse_mismatch=False)
        if runtime.is_main:
            out_file.parent.mkdir(parents=True, exist_ok=True)
            partial = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
            save_importance(partial, scores, metadata)
            replace_path(out_file, partial)
        runtime.barrier()
    return metadata


# ---------------------------------------------------------------- planning and writing


def plan_pruning(scores: dict, original: ModelShape, shape: ModelShape, dropped: list[int]) -> PrunePlan:
    """Top units per axis; every kept layer keeps its own best neurons and heads, all in the same numbers.

    An axis that keeps its size keeps every unit in order (no scores needed).
    """
    kept_layers = [i for i in range(original.num_layers) if i not in set(dropped)]
    keep_all = "hidden" not in scores
    plan = PrunePlan(kept_layers=kept_layers, hidden=list(range(original.hidden_size)) if keep_all else top_indices(scores["hidden"], shape.hidden_size),
                     ffn=[], heads=[], kv_heads=[])
    for layer in kept_layers:
        if keep_all:
            plan.ffn.append(list(range(original.ffn_hidden_size)))
            plan.kv_heads.append(list(range(original.num_key_value_heads)))
            plan.heads.append(list(range(original.num_attention_heads)))
            continue
        plan.ffn.append(top_indices(scores["ffn"][layer], shape.ffn_hidden_size))
        kv_heads, heads = select_heads(scores["heads"][layer], original.num_key_value_heads, shape.num_key_value_heads, shape.heads_per_group)
        plan.kv_heads.append(kv_heads)
        plan.heads.append(heads)
    return plan


def write_pruned_checkpoint(out: Path, torch_model, plan: PrunePlan, new_config, model_dir: Path, scores: dict, metadata: dict, report: dict) -> None:
    """The sliced model as a Hugging Face checkpoint, its tokenizer, the scores it was cut by, and pruning.json."""
    pruned = slice_model(torch_model, plan, new_config)
    pruned.save_pretrained(out, safe_serialization=True)
    save_tokenizer(model_dir, out)
    save_importance(out / IMPORTANCE_FILE, scores, metadata)
    (out / "pruning.json").write_text(json.dumps(report, indent=1))


def prune(model: str, out: Path, settings: PruneConfig, importance: ImportanceConfig, data: DataConfig, compute: ComputeConfig,
          importance_file: Path | None = None, overwrite: bool = False) -> dict:
    """Prune `model` to the targets in `settings` and write a Hugging Face checkpoint to `out`; returns pruning.json.

    Importance is read from `importance_file` where it was computed with the same settings (a score
    computed otherwise is refused), and computed on the calibration split of `data` where it is missing.
    """
    started = time.perf_counter()
    out = Path(out)
    model_dir = resolve_model_dir(model)
    hf_config = load_config(model_dir)
    original = ModelShape.from_config(hf_config)
    shape, explicit_drop = target_shape(original, settings)
    pruned_config(hf_config, shape, list(range(shape.num_layers)))  # transformers' own checks, before any work
    check_seq_len(data.seq_len, hf_config)
    check_output_location(out, overwrite=overwrite)
    drop = original.num_layers - shape.num_layers
    depth_method = "explicit" if explicit_drop is not None else settings.depth_method
    names = needed_scores(original, shape, settings, explicit_drop)

    with distributed_context(compute.device) as runtime:
        writer = atomic_output_dir(out, overwrite) if runtime.is_main else nullcontext(None)
        with writer as tmp:
            torch_model = load_frozen_model(model_dir, dtype=compute.dtype, device=str(runtime.device))
            begun = time.perf_counter()
            scores, metadata = gather_importance(model, model_dir, torch_model, names, importance, data, runtime, importance_file, refuse_mismatch=True)
            importance_seconds = time.perf_counter() - begun
            dropped = explicit_drop if explicit_drop is not None else dropped_layers(depth_method, scores, original.num_layers, drop, importance.seed)
            plan = plan_pruning(scores, original, shape, dropped)
            new_config = pruned_config(torch_model.config, shape, plan.kept_layers)
            report = {
                "model": str(model),
                "model_fingerprint": metadata["model_fingerprint"],
                "original": original.to_dict(),
                "pruned": shape.to_dict(),
                "parameters": {"original": parameter_counts(hf_config), "pruned": parameter_counts(new_config)},
                "dropped_layers": dropped,
                "depth_method": depth_method if drop else None,
                "settings": settings.model_dump(mode="json"),
                "importance": {"file": None if importance_file is None else str(importance_file), "method": importance.method,
                               "scores": metadata["scores"]},
                "kept": plan.to_dict(),
                "seconds": {"importance": importance_seconds},
                "output": str(out),
            }
            if runtime.is_main:
                report["seconds"]["total"] = time.perf_counter() - started
                write_pruned_checkpoint(tmp, torch_model, plan, new_config, model_dir, scores, metadata, report)
        runtime.barrier()  # ranks return once rank 0 has written the output
    return report


def configure_parser(parser) -> None:
    from toolchain.cli_args import add_output_flags, add_recipe_source, add_section_flags

    parser.add_argument("--model", help="teacher: a local Hugging Face directory or a built-in name (default: the --recipe's teacher)")
    add_output_flags(parser, "output directory: the pruned checkpoint")
    parser.add_argument("--importance", dest="importance_file", type=Path,
                        help="reuse the importance.safetensors of an earlier prune of the same model (scores computed with other settings are refused)")
    add_recipe_source(parser, student=True)
    for section in ("prune", "importance", "data", "compute"):
        add_section_flags(parser, section)


def format_report(report: dict) -> str:
    original, pruned = report["original"], report["pruned"]
    lines = [f"pruned {report['model']} → {report['output']}"]
    for key, value in original.items():
        lines.append(f"  {key:<20} {value:>8} → {pruned[key]}")
    counts = report["parameters"]
    for kind in ("total", "non_embedding"):
        lines.append(f"  {kind + ' params':<20} {counts['original'][kind] / 1e6:>7.1f}M → {counts['pruned'][kind] / 1e6:.1f}M")
    if report["dropped_layers"]:
        lines.append(f"  dropped layers ({report['depth_method']}): {report['dropped_layers']}")
    lines.append(f"  importance: {report['importance']['method']}" + (f" (reused from {report['importance']['file']})" if report["importance"]["file"] else ""))
    return "\n".join(lines)


def command(args) -> int:
    from toolchain.cli_args import sections_from_args
    from toolchain.recipe import load_recipe

    settings, importance, data, compute = sections_from_args(args, "prune", "importance", "data", "compute")
    model = args.model or (load_recipe(args.recipe).teacher.model if args.recipe else None)
    if model is None:
        raise UserError("name the model to prune with --model (a local Hugging Face directory or a built-in name)")
    report = prune(model, args.out, settings, importance, data, compute, importance_file=args.importance_file, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0
