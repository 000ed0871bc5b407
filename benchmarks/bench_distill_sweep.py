"""The measured sweep behind the main job's distillation settings: which lr / batch / tokens / losses recover most.

Each arm distils one of the main job's pruned students (its run folder's `students/NAME/pruned`) from the
teacher with `toolchain.distill.distill` and evaluates it on the main job's eval rows (eval split, batch 8,
8 batches: the rows of the pipeline report), so each arm's perplexity over the teacher's (measured once, same rows) is the number the
main job would report with those settings. Arms that name no `teacher_cache=online` distil from one shared
teacher-logit cache (as the recipe does); online arms run the teacher beside the student (needed by the
hidden-state loss). min_lr defaults to lr / 10.

    python benchmarks/bench_distill_sweep.py --run runs/smollm2-135m-minitron \\
        --base "tokens=16384 global_batch_size=8 lr=3e-4 min_lr=3e-5 warmup_steps=2" --arm "width" --arm "width lr=1e-3 global_batch_size=4" --arm "depth lr=1e-3 intermediate_loss=cosine intermediate_loss_weight=1 teacher_cache=online"

Writes benchmarks/results/distill_sweep.{json,md}; finished arms in --work-dir are reused (their
training and eval are read back), so an interrupted sweep resumes.
"""

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

from common import machine, pin_threads, write_results

from toolchain.data import prepare_data
from toolchain.distill import distill
from toolchain.evaluate import evaluate_model
from toolchain.models import load_model, load_tokenizer
from toolchain.settings import ComputeConfig, DataConfig, DistillConfig, EvalConfig

FIELDS = {"tokens": int, "global_batch_size": int, "micro_batch_size": int, "lr": float, "min_lr": float, "warmup_steps": int,
          "intermediate_loss": str, "intermediate_loss_weight": float, "lm_loss_weight": float, "temperature": float,
          "teacher_cache": str, "teacher_cache_top_k": int, "seq_len": int, "gradient_checkpointing": lambda text: text == "true"}


def parse_arm(text: str, base: dict) -> tuple[str, dict]:
    """'STUDENT key=value ...' -> (student, settings over the recipe's distill settings)."""
    student, *pairs = shlex.split(text)
    overrides = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in FIELDS:
            sys.exit(f"error: unknown arm setting {key!r} in {text!r}; use one of {', '.join(FIELDS)}")
        overrides[key] = FIELDS[key](value)
    settings = {**base, **overrides}
    if "lr" in overrides and "min_lr" not in overrides:
        settings["min_lr"] = overrides["lr"] / 10
    return student, settings


def arm_label(student: str, settings: dict, base: dict) -> str:
    changed = {key: value for key, value in settings.items() if base.get(key) != value and key != "min_lr"}
    return student + (" " + " ".join(f"{key}={value}" for key, value in changed.items()) if changed else " (base)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="the main job's run folder (pruned students, teacher cache)")
    parser.add_argument("--arm", action="append", required=True, help="'STUDENT key=value ...' (see FIELDS)")
    parser.add_argument("--base", default="", help="'key=value ...' over the recipe's distill settings, the settings every arm starts from")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-distill-sweep"))
    parser.add_argument("--name", default="distill_sweep", help="results file name")
    args = parser.parse_args()
    pin_threads(args.threads)
    from toolchain.recipe import load_recipe

    recipe = load_recipe("smollm2-135m-minitron")
    base = {**recipe.distill.model_dump(exclude_none=True), "seq_len": recipe.data.seq_len}
    base["teacher_cache"] = str((args.run / base["teacher_cache"]).resolve())
    base.pop("save_every", None)
    base = parse_arm(f"base {args.base}", base)[1]
    evaluation = EvalConfig(batch_size=recipe.eval.batch_size, max_batches=recipe.eval.max_batches)
    compute = ComputeConfig(dtype="float32", device="cpu")
    started = time.perf_counter()
    eval_rows = prepare_data(DataConfig(spec=recipe.data.spec, seq_len=recipe.data.seq_len), load_tokenizer(recipe.teacher.model)).split("eval")
    teacher_perplexity = evaluate_model(load_model(recipe.teacher.model), eval_rows, evaluation, description="eval teacher")["perplexity"]
    arms = []
    for text in args.arm:
        student, settings = parse_arm(text, base)
        seq_len = settings.pop("seq_len")
        if settings.get("teacher_cache") == "online":
            settings.pop("teacher_cache")
            settings.pop("teacher_cache_top_k", None)
        elif seq_len != recipe.data.seq_len:
            settings["teacher_cache"] += f"-seq{seq_len}"  # a cache is keyed on its sequence length
        key = hashlib.sha256(json.dumps([student, settings, seq_len], sort_keys=True).encode()).hexdigest()[:10]
        out = args.work_dir / f"{student}-{key}"
        if not (out / "eval.json").is_file():
            distill(recipe.teacher.model, str(args.run / "students" / student / "pruned"), out, DistillConfig(**settings),
                    DataConfig(spec=recipe.data.spec, seq_len=seq_len), compute, EvalConfig(max_batches=0))
        summary = json.loads((out / "eval.json").read_text())
        measured = out / "sweep_eval.json"  # the arm's eval on the report rows, kept so a resumed sweep does not repeat it
        if not measured.is_file():
            measured.write_text(json.dumps(evaluate_model(load_model(out), eval_rows, evaluation, description=f"eval {student}")))
        metrics = json.loads(measured.read_text())
        arms.append({"arm": arm_label(student, {**settings, "seq_len": seq_len}, {**base, "seq_len": recipe.data.seq_len}), "student": student,
                     "settings": {**settings, "seq_len": seq_len}, "out": str(out), "train_seconds": summary["train_seconds"],
                     "tokens": summary["tokens"], "steps": summary["steps"], "perplexity": metrics["perplexity"],
                     "ratio": metrics["perplexity"] / teacher_perplexity})
        print(json.dumps(arms[-1]), flush=True)

    best = {student: min((arm for arm in arms if arm["student"] == student), key=lambda arm: arm["ratio"]) for student in dict.fromkeys(a["student"] for a in arms)}
    command = f"python benchmarks/bench_distill_sweep.py --run {args.run} --base {shlex.quote(args.base)}" + "".join(f" --arm {shlex.quote(text)}" for text in args.arm)
    payload = {"benchmark": "distillation settings sweep on the main job's pruned students", "command": command, "recipe_distill": base,
               "teacher_perplexity": teacher_perplexity,
               "eval": evaluation.model_dump(), "arms": arms, "best": {student: arm["arm"] for student, arm in best.items()},
               "seconds": time.perf_counter() - started, "machine": machine()}
    lines = ["# Distillation settings sweep (main job's students, smollm2-135m teacher)", "", f"Command: `{command}`", "",
             f"Each arm distils the main job's pruned student ({args.run}/students/NAME/pruned) and is evaluated on the main job's "
             f"report rows (eval split, seq {recipe.data.seq_len}, batch {evaluation.batch_size}, {evaluation.max_batches} batches). "
             f"Unnamed settings are the base's (the recipe's distill settings with --base applied: {', '.join(f'{k}={v}' for k, v in base.items() if k != 'teacher_cache')}); "
             f"min_lr is lr/10 where lr is set. {machine()['torch_threads']} torch threads on {machine()['cpu_count']} cores, "
             f"{payload['seconds'] / 60:.1f} min in all (train seconds below are each run's own, on a machine shared with other work).", "",
             f"Teacher perplexity on these rows: {teacher_perplexity:.2f}.", "",
             "| arm | tokens | steps | train s | perplexity | / teacher |", "|---|---|---|---|---|---|"]
    for arm in arms:
        lines.append(f"| {arm['arm']} | {arm['tokens']:,} | {arm['steps']} | {arm['train_seconds']:.0f} | {arm['perplexity']:.2f} | "
                     f"{arm['ratio']:.2f}x |")
    lines += ["", "Best per student (lowest perplexity ratio): " + "; ".join(f"{student}: {arm['arm']} ({arm['ratio']:.2f}x)" for student, arm in best.items())]
    write_results(args.name, payload, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
