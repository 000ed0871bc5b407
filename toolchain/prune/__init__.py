"""`minitron prune`: Minitron structured pruning (width and depth) of a Hugging Face checkpoint.

teacher → importance (calibration data) → kept units → sliced model. The output directory is a normal
Hugging Face checkpoint (config with explicit head_dim, safetensors, tokenizer, generation config) plus
`pruning.json` (shapes, parameter counts, kept indices, settings) and `importance.safetensors`, which
`--importance` reuses to prune the same model to other targets without another calibration pass.
Runs single-process or under `torchrun` (calibration rows sharded over ranks, sums all-reduced, rank 0
writes). Not here: distillation of the pruned student (`minitron distill`).
"""

import json
import logging
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from pydantic import ValidationError

from toolchain.data import check_seq_len, shard_rows
from toolchain.distributed import distributed_context, prepare_data_on_ranks
from toolchain.errors import UserError
from toolchain.models import load_config, load_model, load_tokenizer, model_fingerprint, resolve_device, resolve_model_dir
from toolchain.paths import atomic_output_dir
from toolchain.prune.importance import (
    activation_importance,
    contiguous_block_losses,
    depth_score_names,
    dropped_layers,
    lm_loss_scores,
    load_importance,
    magnitude_importance,
    random_importance,
    save_importance,
    select_heads,
    top_indices,
)
from toolchain.prune.shapes import TARGET_FLAGS, ModelShape, parameter_counts, pruned_config, target_shape
from toolchain.prune.slicing import PrunePlan, slice_model
from toolchain.recipe import PruneConfig

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def targets_of(config: PruneConfig) -> dict:
    return {name: getattr(config, name) for name in TARGET_FLAGS}


def width_scores(method: str, model, rows, config: PruneConfig) -> dict[str, torch.Tensor]:
    if method == "activation":
        return activation_importance(model, rows, config.batch_size, config.sequence_aggregation, config.batch_aggregation)
    if method == "magnitude":
        return magnitude_importance(model)
    return random_importance(model.config, config.seed)


def choose_kept(scores: dict, original: ModelShape, shape: ModelShape, dropped: list[int]) -> PrunePlan:
    """Top units per axis; every kept layer keeps its own best neurons and heads, all in the same numbers."""
    kept_layers = [i for i in range(original.num_layers) if i not in set(dropped)]
    plan = PrunePlan(kept_layers=kept_layers, hidden=top_indices(scores["hidden"], shape.hidden_size), ffn=[], heads=[], kv_heads=[])
    for layer in kept_layers:
        plan.ffn.append(top_indices(scores["ffn"][layer], shape.ffn_hidden_size))
        kv_heads, heads = select_heads(scores["heads"][layer], original.num_key_value_heads, shape.num_key_value_heads, shape.heads_per_group)
        plan.kv_heads.append(kv_heads)
        plan.heads.append(heads)
    return plan


def prune(
    model: str,
    data: str,
    out: Path,
    config: PruneConfig,
    importance_file: Path | None = None,
    seq_len: int = 256,
    text_field: str = "text",
    dtype: str = "float32",
    device: str = "cpu",
    overwrite: bool = False,
) -> dict:
    """Prune `model` to the targets in `config` and write a Hugging Face checkpoint to `out`; returns pruning.json."""
    started = time.perf_counter()
    out = Path(out)
    model_dir = resolve_model_dir(model)
    hf_config = load_config(model_dir)
    original = ModelShape.from_config(hf_config)
    shape, explicit_drop = target_shape(original, targets_of(config), config.drop_layers)
    pruned_config(hf_config, shape, list(range(shape.num_layers)))  # transformers' own checks, before any work
    check_seq_len(seq_len, hf_config)
    fingerprint = model_fingerprint(model_dir)
    scores, metadata = {}, {}
    if importance_file is not None:
        scores, metadata = load_importance(importance_file, fingerprint, original.to_dict())
    drop = original.num_layers - shape.num_layers
    depth_method = "explicit" if explicit_drop is not None else config.depth_method
    missing_depth = [name for name in depth_score_names(depth_method, drop) if name not in scores] if explicit_drop is None else []

    with distributed_context(device) as runtime:
        rank, world, device = runtime.rank, runtime.world_size, str(runtime.device)
        writer = atomic_output_dir(out, overwrite) if rank == 0 else nullcontext(None)
        with writer as tmp:
            torch_model = load_model(model_dir, dtype=dtype, device=device)
            timings = {}
            calibration = None
            needs_data = (not scores and config.importance == "activation") or bool(missing_depth)
            if needs_data:
                packed = prepare_data_on_ranks(data, load_tokenizer(model_dir), seq_len, text_field, runtime)
                calibration = packed.split("calibration")[: config.calibration_samples]
                if len(calibration) < config.calibration_samples:
                    log.warning("%s has %d calibration sequences of %d tokens, fewer than the %d asked for; using them all",
                                data, len(calibration), seq_len, config.calibration_samples)
            if not scores:
                begun = time.perf_counter()
                scores = width_scores(config.importance, torch_model, None if calibration is None else shard_rows(calibration, rank, world), config)
                timings["width_importance"] = time.perf_counter() - begun
                metadata = {
                    "model": str(model), "model_fingerprint": fingerprint, "shape": original.to_dict(), "method": config.importance,
                    "batch_aggregation": config.batch_aggregation, "sequence_aggregation": config.sequence_aggregation, "seed": config.seed,
                    "calibration": None if config.importance != "activation" else
                    {"data": data, "sequences": len(calibration), "seq_len": seq_len, "text_field": text_field,
                     "batch_size": config.batch_size, "world_size": world, "dtype": dtype, "device": str(resolve_device(device).type)},
                }
            if missing_depth:
                begun = time.perf_counter()
                depth_rows = shard_rows(calibration[: config.depth_calibration_samples or len(calibration)], rank, world)
                if depth_method == "block_importance":
                    scores["block_importance"] = activation_importance(torch_model, depth_rows, config.batch_size,
                                                                       config.sequence_aggregation, config.batch_aggregation)["block_importance"]
                elif depth_method == "lm_loss":
                    base, scores["lm_loss_without_layer"] = lm_loss_scores(torch_model, depth_rows, config.batch_size, original.num_layers)
                else:
                    base, scores[f"lm_loss_without_block{drop}"] = contiguous_block_losses(torch_model, depth_rows, config.batch_size, original.num_layers, drop)
                metadata.setdefault("depth", {})[missing_depth[0]] = {
                    "data": data, "sequences": min(len(calibration), config.depth_calibration_samples or len(calibration)),
                    "seq_len": seq_len, "world_size": world, **({"base_lm_loss": base} if depth_method != "block_importance" else {})}
                timings["depth_importance"] = time.perf_counter() - begun
            dropped = explicit_drop if explicit_drop is not None else dropped_layers(depth_method, scores, original.num_layers, drop, config.seed)
            plan = choose_kept(scores, original, shape, dropped)
            new_config = pruned_config(torch_model.config, shape, plan.kept_layers)
            report = {
                "model": str(model),
                "model_fingerprint": fingerprint,
                "original": original.to_dict(),
                "pruned": shape.to_dict(),
                "parameters": {"original": parameter_counts(hf_config), "pruned": parameter_counts(new_config)},
                "dropped_layers": dropped,
                "depth_method": depth_method if drop else None,
                "importance": {"file": None if importance_file is None else str(importance_file), **metadata},
                "kept": plan.to_dict(),
                "seconds": timings,
                "output": str(out),
            }
            if rank == 0:
                pruned = slice_model(torch_model, plan, new_config)
                pruned.save_pretrained(tmp, safe_serialization=True)
                for name in TOKENIZER_FILES:
                    if (model_dir / name).is_file():
                        shutil.copy(model_dir / name, tmp / name)
                save_importance(tmp / "importance.safetensors", scores, metadata)
                report["seconds"]["total"] = time.perf_counter() - started
                (tmp / "pruning.json").write_text(json.dumps(report, indent=1))
        runtime.barrier()  # ranks return once rank 0 has written the output
    return report


def configure_parser(parser) -> None:
    from toolchain.cli_args import add_data_arguments, add_model_arguments

    parser.add_argument("--model", help="teacher: a local Hugging Face directory or a built-in name (default: the recipe's teacher)")
    add_data_arguments(parser)
    parser.set_defaults(data=None, seq_len=None)  # None: from the recipe, else builtin:python-docs and 256
    parser.add_argument("--out", required=True, type=Path, help="output directory (written atomically; must be empty or absent)")
    targets = parser.add_argument_group("targets (omit an axis to keep it)")
    targets.add_argument("--hidden-size", type=int, help="embedding channels")
    targets.add_argument("--ffn-hidden-size", type=int, help="MLP neurons per layer (intermediate_size)")
    targets.add_argument("--num-attention-heads", type=int, help="query heads, pruned equally in every GQA group")
    targets.add_argument("--num-key-value-heads", type=int, help="key-value heads (whole GQA groups with their query heads)")
    targets.add_argument("--num-layers", type=int, help="decoder layers, chosen by --depth-method")
    targets.add_argument("--drop-layers", help="explicit 0-based layers to drop, e.g. 16-31 or 3,5,7-9")
    method = parser.add_argument_group("importance")
    method.add_argument("--depth-method", choices=["lm_loss", "lm_loss_contiguous", "block_importance", "random"])
    method.add_argument("--importance-method", dest="importance", choices=["activation", "magnitude", "random"])
    method.add_argument("--importance", dest="importance_file", type=Path, help="reuse the importance.safetensors of an earlier run on the same model")
    method.add_argument("--calibration-samples", type=int, help="calibration sequences (default 1024, Minitron's)")
    method.add_argument("--depth-calibration-samples", type=int, help="sequences for LM-loss layer scores (default: all calibration sequences)")
    method.add_argument("--batch-size", type=int, help="sequences per forward pass (default 8)")
    method.add_argument("--batch-aggregation", choices=["mean", "l2", "var"])
    method.add_argument("--sequence-aggregation", choices=["mean", "l2", "var"])
    method.add_argument("--seed", type=int, help="seed of the random baselines")
    parser.add_argument("--recipe", help="take the targets from a recipe (a YAML path or built-in name); flags override them")
    parser.add_argument("--student", help="the recipe's student whose targets to use")
    add_model_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--json", action="store_true", help="print pruning.json instead of a summary")


CONFIG_FLAGS = {**TARGET_FLAGS, "drop_layers": "--drop-layers", "depth_method": "--depth-method", "importance": "--importance-method",
                "calibration_samples": "--calibration-samples", "depth_calibration_samples": "--depth-calibration-samples",
                "batch_size": "--batch-size", "batch_aggregation": "--batch-aggregation", "sequence_aggregation": "--sequence-aggregation",
                "seed": "--seed"}


def config_from_args(args) -> tuple[PruneConfig, str | None, str | None, int | None]:
    """PruneConfig from the recipe's student (if any) with the flags on top; also the recipe's teacher, data and seq_len."""
    from toolchain.recipe import load_recipe

    base, teacher, data, seq_len = {}, None, None, None
    if args.recipe is not None:
        recipe = load_recipe(args.recipe)
        students = {student.name: student for student in recipe.students}
        if args.student is None and len(students) != 1:
            raise UserError(f"recipe {args.recipe} has students {', '.join(students) or '(none)'}; choose one with --student")
        name = args.student or next(iter(students))
        if name not in students:
            raise UserError(f"recipe {args.recipe} has no student {name!r}; choose one of {', '.join(students)}")
        base = students[name].prune.model_dump()
        teacher, data, seq_len = recipe.teacher.model, recipe.data.spec, recipe.data.seq_len
    elif args.student is not None:
        raise UserError("--student needs --recipe")
    overrides = {key: getattr(args, key) for key in CONFIG_FLAGS}
    values = {**base, **{key: value for key, value in overrides.items() if value is not None}}
    try:
        return PruneConfig.model_validate(values), teacher, data, seq_len
    except ValidationError as exc:
        error = exc.errors()[0]
        key = str(error["loc"][0]) if error["loc"] else ""
        raise UserError(f"invalid {CONFIG_FLAGS.get(key, key)}: {error['msg']}, got {error.get('input')!r}") from None


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
    lines.append(f"  importance: {report['importance']['method']}" + (f" (from {report['importance']['file']})" if report["importance"]["file"] else ""))
    return "\n".join(lines)


def command(args) -> int:
    config, teacher, recipe_data, recipe_seq_len = config_from_args(args)
    model = args.model or teacher
    if model is None:
        raise UserError("name the model to prune with --model (a local Hugging Face directory or a built-in name)")
    report = prune(model, args.data or recipe_data or "builtin:python-docs", args.out, config, importance_file=args.importance_file,
                   seq_len=args.seq_len or recipe_seq_len or 256, text_field=args.text_field, dtype=args.dtype, device=args.device,
                   overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0
