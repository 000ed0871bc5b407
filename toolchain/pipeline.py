"""`minitron run RECIPE`: the whole Minitron pipeline from one recipe, a thin orchestrator over stage records.

Each stage writes a directory holding its outputs and `stage.json`: the stage's resolved settings and
the keys of its inputs (a teacher's checkpoint fingerprint, an upstream stage's key, the data's content
digest). A stage's key is the hash of that record, so rerunning the command skips every stage whose
record matches, reruns a stage whose settings or inputs changed and, through the keys, everything
downstream of it, and nothing else. A stage works in a hidden directory beside its target and replaces
the target only when it is complete; training stages (teacher correction, distillation) resume from
their last checkpoint in that directory after an interruption. Stages read each other's outputs from
disk only. Every row of the report is measured by the same eval stage, on the same rows, with the same
settings, against the same teacher, which each process loads once.

Run folder:
    run.json, recipe.yaml            marks the folder as a run (another non-empty folder is refused); the latest recipe
    teacher-corrected/               teacher after LM fine-tuning (only with teacher.correction.tokens)
    teacher-eval/                    metrics.json of the teacher
    importance/                      importance.safetensors: the scores every student is pruned by, computed once
    teacher-cache/                   teacher top-k log-probs (and tail samples) of the students' train rows (only with a relative distill.teacher_cache; built once, before the students)
    students/NAME/pruned/            HF checkpoint + pruning.json
    students/NAME/pruned-eval/       metrics.json against the teacher
    students/NAME/distilled/         HF checkpoint + train_log.jsonl
    students/NAME/distilled-eval/    metrics.json against the teacher
    teacher-tasks/, students/NAME/tasks/   tasks.json: lm-evaluation-harness tasks (only with lm_eval.tasks)
    students/NAME/quantized/         ModelOpt unified checkpoint (only with quantize.format)
    students/NAME/export-FORMAT/     exported final student (only with export.format)
    students/NAME/engine/            engine directory with manifest.json (only with engine.profile)
    teacher-engine/, bench/          the teacher's engine and the benchmark of teacher and students: results.json, results.md, plots (bench.enabled)
    summary.json, summary.md         rewritten by every run
"""

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from toolchain import __version__
from toolchain.data import prepare_data, source_fingerprint
from toolchain.errors import UserError, settings_named_by
from toolchain.evaluate import evaluate_model
from toolchain.models import load_config, load_frozen_model, load_model, load_tokenizer, model_fingerprint, parameter_counts, resolve_model_dir
from toolchain.paths import atomic_write_text, check_output_location, replace_path
from toolchain.recipe import Recipe, StudentConfig, check_recipe_inputs, load_recipe, recipe_field_namer
from toolchain.settings import DistillConfig, EvalConfig

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
STAGE_RECORD = "stage.json"
METRICS_FILE = "metrics.json"
TASKS_FILE = "tasks.json"
INTERRUPT_HINT = "; rerun the same command to continue (finished stages are kept, training resumes from its last checkpoint)"


def stage_key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


class Run:
    """The run folder of one recipe, its stage records, and the teacher and eval rows every stage shares."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.dir = recipe.resolved_output_dir()
        self.claim_folder()
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self._eval_rows = None

    def claim_folder(self) -> None:
        check_output_location(self.dir, "the run folder", overwrite=True)
        if self.dir.is_dir() and any(self.dir.iterdir()) and not (self.dir / RUN_FILE).is_file():
            raise UserError(f"{self.dir} is not empty and holds no run of this toolchain (no {RUN_FILE}); choose another --out")
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / RUN_FILE, json.dumps({"toolchain": __version__, "recipe": self.recipe.name}, indent=1) + "\n")
        atomic_write_text(self.dir / "recipe.yaml", yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False))

    def stage(self, name: str, settings: dict, inputs: dict[str, str], produce: Callable[[Path], None], resumable: bool = False) -> str:
        """Run stage `name` (its directory under the run folder) unless its record matches; returns its key.

        `produce(work)` writes the stage's outputs into `work`, a directory beside the target that
        becomes the target only when complete. A resumable stage finds its own partial work there again
        after an interruption (the directory is named by the key, so other settings start afresh).
        """
        target = self.dir / name
        record = {"stage": name, "settings": settings, "inputs": inputs}
        key = stage_key(record)
        if (target / STAGE_RECORD).is_file() and json.loads((target / STAGE_RECORD).read_text()).get("key") == key:
            self.skipped.append(name)
            return key
        work = target.parent / f".{target.name}.{key}"
        for stale in target.parent.glob(f".{target.name}.*"):
            if stale != work or not resumable:
                shutil.rmtree(stale, ignore_errors=True)
        log.info("stage %s: running", name)
        started = time.perf_counter()
        produce(work)
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work / STAGE_RECORD, json.dumps({**record, "key": key, "seconds": time.perf_counter() - started,
                                                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1) + "\n")
        replace_path(target, work)
        self.ran.append(name)
        return key

    def seconds(self, name: str) -> float:
        return json.loads((self.dir / name / STAGE_RECORD).read_text())["seconds"]

    def eval_rows(self, teacher: str):
        """The rows every model is measured on: the recipe's eval split, tokenized once."""
        if self._eval_rows is None:
            self._eval_rows = prepare_data(self.recipe.data, load_tokenizer(teacher)).split(self.recipe.eval.split)
        return self._eval_rows


# ---------------------------------------------------------------- stages


def evaluation_stage(run: Run, name: str, model: Path, model_key: str, teacher: str, teacher_key: str, data_settings: dict,
                     against_teacher: bool = True) -> dict:
    """The eval of one model, the same for the teacher and every student; returns its metrics."""
    recipe = run.recipe

    def produce(work: Path) -> None:
        compute = recipe.compute
        frozen_teacher = load_frozen_model(teacher, dtype=compute.dtype, device=compute.device)
        network = frozen_teacher if not against_teacher else load_model(model, dtype=compute.dtype, device=compute.device)
        metrics = evaluate_model(network, run.eval_rows(teacher), recipe.eval, teacher=frozen_teacher if against_teacher else None,
                                 description=f"eval {name}")
        work.mkdir(parents=True)
        (work / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")

    run.stage(name, {"eval": recipe.eval.model_dump(mode="json"), "data": data_settings, "compute": recipe.compute.model_dump(mode="json")},
              {"model": model_key, "teacher": teacher_key}, produce)
    return json.loads((run.dir / name / METRICS_FILE).read_text())


def tasks_stage(run: Run, name: str, model: Path | str, model_key: str) -> dict:
    """The recipe's lm-evaluation-harness tasks on one model (the teacher, or a student's final checkpoint); returns {task: metrics}."""
    from toolchain.downstream import run_tasks

    recipe = run.recipe

    def produce(work: Path) -> None:
        results = run_tasks(str(model), recipe.lm_eval, recipe.compute)
        work.mkdir(parents=True)
        (work / TASKS_FILE).write_text(json.dumps(results, indent=2) + "\n")

    run.stage(name, {"lm_eval": recipe.lm_eval.model_dump(mode="json"), "compute": recipe.compute.model_dump(mode="json")}, {"model": model_key}, produce)
    return json.loads((run.dir / name / TASKS_FILE).read_text())["tasks"]


def teacher_stage(run: Run, data_settings: dict) -> tuple[str, str]:
    """The teacher every student is cut from: the given one, or after teacher correction. Returns (model, key)."""
    recipe = run.recipe
    source = recipe.teacher.model
    source_key = f"model:{model_fingerprint(resolve_model_dir(source))}"
    if not recipe.teacher.correction.tokens:
        return source, source_key
    from toolchain.finetune import finetune
    from toolchain.training import checkpoint_dirs

    correction = recipe.teacher.correction
    training = recipe.distill.training().model_copy(update={"tokens": correction.tokens, "steps": None, "lr": correction.lr,
                                                            "min_lr": min(recipe.distill.min_lr, correction.lr)})

    def produce(work: Path) -> None:
        with settings_named_by(recipe_field_namer(recipe, correcting_teacher=True)):
            finetune(source, work, training, recipe.data, recipe.compute, EvalConfig(max_batches=0), resume=bool(checkpoint_dirs(work)),
                     resume_hint=INTERRUPT_HINT.removeprefix("; "))

    key = run.stage("teacher-corrected", {"training": training.model_dump(mode="json"), "data": data_settings,
                                          "compute": recipe.compute.model_dump(mode="json")}, {"teacher": source_key}, produce, resumable=True)
    return str(run.dir / "teacher-corrected"), key


def importance_stage(run: Run, teacher: str, teacher_key: str, data_settings: dict) -> str | None:
    """Importance of the teacher's units, computed once for every student (only the scores some student needs)."""
    from toolchain.prune import IMPORTANCE_FILE, compute_importance, needed_scores
    from toolchain.prune.shapes import ModelShape, target_shape

    recipe = run.recipe
    original = ModelShape.from_config(load_config(teacher))
    names = []
    for student in (student for student in recipe.students if student.search is None):  # a search computes its own
        with settings_named_by(recipe_field_namer(recipe, student)):
            shape, explicit_drop = target_shape(original, student.prune)
        names += [name for name in needed_scores(original, shape, student.prune, explicit_drop) if name not in names]
    if not names:
        return None
    previous = run.dir / "importance" / IMPORTANCE_FILE

    def produce(work: Path) -> None:
        compute_importance(teacher, work / IMPORTANCE_FILE, names, recipe.importance, recipe.data, recipe.compute,
                           reuse=previous if previous.is_file() else None)

    return run.stage("importance", {"importance": recipe.importance.model_dump(mode="json"), "scores": names, "data": data_settings,
                                    "compute": recipe.compute.model_dump(mode="json")}, {"teacher": teacher_key}, produce)


def student_distill_settings(run: Run, student: StudentConfig) -> DistillConfig:
    """A student's distillation settings, with a relative teacher-cache directory placed in the run folder."""
    settings = run.recipe.student_distill(student)
    if settings.teacher_cache is not None and not Path(settings.teacher_cache).is_absolute():
        settings = settings.model_copy(update={"teacher_cache": str(run.dir / settings.teacher_cache)})
    return settings


def teacher_cache_stage(run: Run, teacher: str) -> list[dict]:
    """The teacher runs once over the train rows of every student that distils from a cache (per cache directory), before
    any of them trains; the cache keeps what it built, so a rerun computes only rows it lacks. Returns what each build did."""
    from toolchain.distill import build_teacher_cache

    by_directory: dict[str, list[DistillConfig]] = {}
    for student in run.recipe.students:
        with settings_named_by(recipe_field_namer(run.recipe, student)):
            settings = student_distill_settings(run, student)
        if settings.teacher_cache is not None and (settings.tokens or settings.steps):
            by_directory.setdefault(settings.teacher_cache, []).append(settings)
    builds = []
    for runs in by_directory.values():
        started = time.perf_counter()
        builds.append({**build_teacher_cache(teacher, runs, run.recipe.data, run.recipe.compute), "seconds": time.perf_counter() - started})
    return builds


def student_stages(run: Run, student: StudentConfig, teacher: str, teacher_key: str, importance_key: str | None, data_settings: dict) -> dict:
    """prune → eval → distill → eval → quantize → export → engine for one student; returns its summary row and engine key."""
    from toolchain.prune import IMPORTANCE_FILE, prune

    recipe = run.recipe
    base = f"students/{student.name}"
    compute = recipe.compute.model_dump(mode="json")

    settings = student_distill_settings(run, student)
    row = {"name": student.name}
    if student.search is not None:
        from toolchain.search import search

        pruned_key = run.stage(f"{base}/search", {"search": student.search.model_dump(mode="json"), "importance": recipe.importance.model_dump(mode="json"),
                                                  "distill": settings.model_dump(mode="json"), "eval": recipe.eval.model_dump(mode="json"),
                                                  "data": data_settings, "compute": compute},
                               {"teacher": teacher_key},
                               lambda work: search(teacher, work, student.search, recipe.importance, settings, recipe.data, recipe.compute, recipe.eval),
                               resumable=True)
        pruned = run.dir / base / "search" / "chosen"
        row["search"] = {"budget": student.search.budget, "chosen": json.loads((pruned / "pruning.json").read_text())["pruned"],
                         "candidates": str(run.dir / base / "search" / "candidates.md")}
    else:
        def prune_into(work: Path) -> None:
            importance_file = run.dir / "importance" / IMPORTANCE_FILE
            prune(teacher, work, student.prune, recipe.importance, recipe.data, recipe.compute,
                  importance_file=importance_file if importance_key else None)

        pruned_key = run.stage(f"{base}/pruned", {"prune": student.prune.model_dump(mode="json"), "importance": recipe.importance.model_dump(mode="json"),
                                                  "data": data_settings, "compute": compute},
                               {"teacher": teacher_key, "importance": importance_key or "none"}, prune_into)
        pruned = run.dir / base / "pruned"
    row["parameters"] = parameter_counts(load_config(pruned))["total"]
    row["pruned"] = evaluation_stage(run, f"{base}/pruned-eval", pruned, pruned_key, teacher, teacher_key, data_settings)
    trained, trained_key = pruned, pruned_key
    if settings.tokens or settings.steps:
        from toolchain.distill import distill
        from toolchain.training import checkpoint_dirs

        def distill_into(work: Path) -> None:
            distill(teacher, str(pruned), work, settings, recipe.data, recipe.compute, EvalConfig(max_batches=0),
                    resume=bool(checkpoint_dirs(work)), resume_hint=INTERRUPT_HINT.removeprefix("; "))

        trained_key = run.stage(f"{base}/distilled", {"distill": settings.model_dump(mode="json"), "data": data_settings, "compute": compute},
                                {"teacher": teacher_key, "student": pruned_key}, distill_into, resumable=True)
        trained = run.dir / base / "distilled"
        row["distilled"] = evaluation_stage(run, f"{base}/distilled-eval", trained, trained_key, teacher, teacher_key, data_settings)
        row["distill_seconds"] = run.seconds(f"{base}/distilled")
    if recipe.lm_eval.tasks:
        row["tasks"] = tasks_stage(run, f"{base}/tasks", trained, trained_key)
    final, final_key = trained, trained_key
    if recipe.quantize.format != "none":
        from toolchain.quantize import REPORT_FILE, quantize

        final_key = run.stage(f"{base}/quantized", {"quantize": recipe.quantize.model_dump(mode="json"), "eval": recipe.eval.model_dump(mode="json"),
                                                    "data": data_settings, "compute": compute}, {"model": trained_key},
                              lambda work: quantize(str(trained), work, recipe.quantize, recipe.data, recipe.compute, recipe.eval))
        final = run.dir / base / "quantized"
        row["quantized"] = json.loads((final / REPORT_FILE).read_text())
    if recipe.export.format != "none":
        from toolchain.export import export

        exported = f"{base}/export-{recipe.export.format}"
        run.stage(exported, {"export": recipe.export.model_dump(mode="json")}, {"model": final_key},
                  lambda work: export(str(final), work, recipe.export))
        row["export"] = str(run.dir / exported)
    if recipe.engine.profile:
        row["engine_key"] = engine_stage(run, f"{base}/engine", trained, trained_key, data_settings)
        row["engine"] = str(run.dir / base / "engine")
    row["checkpoint"] = str(final)
    return row


def engine_stage(run: Run, name: str, model: Path | str, model_key: str, data_settings: dict) -> str:
    """The engine the recipe's profile describes, built from an unquantized model (the profile quantizes as it says)."""
    from toolchain.build import build
    from toolchain.engine_profile import load_profile

    recipe = run.recipe
    profile = load_profile(recipe.engine.profile, recipe.engine.overrides)
    return run.stage(name, {"engine": profile.model_dump(mode="json"), "data": data_settings}, {"model": model_key},
                     lambda work: build(profile, str(model), work, recipe.data))


def bench_stage(run: Run, teacher: str, teacher_key: str, students: list[dict], data_settings: dict) -> dict | None:
    """The teacher against the students on the recipe's bench backend, projected onto its engine profile; None where that cannot run here.

    torch runs the trained checkpoints; cpu-engine and triton the engines of the recipe's profile (the
    teacher's built here with the same profile); trtllm needs a GPU and tensorrt_llm.
    """
    from toolchain.backends import engine_backend
    from toolchain.bench.harness import RESULTS_FILE, bench
    from toolchain.bench.runners import RUNNERS
    from toolchain.bench.workloads import load_workload
    from toolchain.engine_profile import load_profile

    recipe = run.recipe
    settings = recipe.bench
    if settings.profiles is None:
        settings = settings.model_copy(update={"profiles": [recipe.engine.profile]})
    reason = RUNNERS[settings.backend].unavailable_reason()
    if settings.backend in ("cpu-engine", "triton") and reason is None:
        reason = engine_backend(load_profile(recipe.engine.profile, recipe.engine.overrides).backend).unavailable_reason()
    if reason is not None:
        log.info("the bench stage does not run here (%s): run `minitron bench --backend %s` where it can", reason, settings.backend)
        return None
    if settings.backend == "torch":
        trained = {student["name"]: f"students/{student['name']}/{'distilled' if 'distilled' in student else 'pruned'}" for student in students}
        models = {"teacher": teacher, **{name: str(run.dir / stage) for name, stage in trained.items()}}
        keys = {"teacher": teacher_key, **{name: json.loads((run.dir / stage / STAGE_RECORD).read_text())["key"] for name, stage in trained.items()}}
    else:
        keys = {"teacher": engine_stage(run, "teacher-engine", teacher, teacher_key, data_settings),
                **{student["name"]: student["engine_key"] for student in students}}
        models = {"teacher": str(run.dir / "teacher-engine"), **{student["name"]: student["engine"] for student in students}}
    labels, sources = list(models), list(models.values())
    resolved = {"workload": load_workload(settings.workload, settings.workload_overrides).model_dump(mode="json"),  # the files' contents count
                "profiles": [load_profile(name).model_dump(mode="json") for name in settings.profiles]}
    run.stage("bench", {"bench": settings.model_dump(mode="json"), **resolved, "serve": recipe.serve.model_dump(mode="json"), "data": data_settings,
                        "compute": recipe.compute.model_dump(mode="json"), "labels": labels}, keys,
              lambda work: bench(sources[0], sources[1:], settings, recipe.data, recipe.serve, recipe.compute, out=work, labels=labels,
                                 command=f"minitron run {recipe.name} (bench stage)"))
    results = json.loads((run.dir / "bench" / RESULTS_FILE).read_text())
    for model in results["models"]:
        for point in model["load_points"]:
            point.pop("samples")
    return results


def run_pipeline(recipe: Recipe) -> dict:
    """Run every stage of the recipe whose record does not match; returns the summary."""
    check_recipe_inputs(recipe)
    run = Run(recipe)
    started = time.perf_counter()
    data_settings = {**recipe.data.model_dump(mode="json"), "content": source_fingerprint(recipe.data.spec, recipe.data.text_field)}
    with settings_named_by(recipe_field_namer(recipe)):
        teacher, teacher_key = teacher_stage(run, data_settings)
        teacher_eval = evaluation_stage(run, "teacher-eval", Path(teacher), teacher_key, teacher, teacher_key, data_settings, against_teacher=False)
        teacher_tasks = tasks_stage(run, "teacher-tasks", teacher, teacher_key) if recipe.lm_eval.tasks else None
        importance_key = importance_stage(run, teacher, teacher_key, data_settings)
    teacher_caches = teacher_cache_stage(run, teacher)
    students = []
    for student in recipe.students:
        with settings_named_by(recipe_field_namer(recipe, student)):
            students.append(student_stages(run, student, teacher, teacher_key, importance_key, data_settings))
    summary = {"recipe": recipe.name, "run_dir": str(run.dir),
               "eval": {"data": recipe.data.spec, "split": recipe.eval.split, "seq_len": recipe.data.seq_len, **recipe.eval.model_dump(mode="json")},
               "teacher": {"model": teacher, "parameters": parameter_counts(load_config(teacher))["total"], "eval": teacher_eval},
               "students": [{key: value for key, value in student.items() if key != "engine_key"} for student in students]}
    if teacher_tasks is not None:
        summary["teacher"]["tasks"] = teacher_tasks
    if teacher_caches:
        summary["teacher_cache"] = teacher_caches
    if recipe.engine.profile and recipe.bench.enabled and students:
        with settings_named_by(recipe_field_namer(recipe)):
            summary["bench"] = bench_stage(run, teacher, teacher_key, students, data_settings)
    summary["stages"] = {"ran": run.ran, "skipped": run.skipped, "seconds": time.perf_counter() - started}
    atomic_write_text(run.dir / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(run.dir / "summary.md", format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    teacher, evaluation = summary["teacher"], summary["eval"]
    max_batches = "all" if evaluation["max_batches"] is None else evaluation["max_batches"]
    lines = [f"# {summary['recipe']}", "", f"Run folder: `{summary['run_dir']}`. Every row is measured on the same rows: the {evaluation['split']} "
             f"split of `{evaluation['data']}`, sequences of {evaluation['seq_len']} tokens, batch {evaluation['batch_size']}, "
             f"{max_batches} batches.", "",
             "| model | parameters | perplexity | KL(teacher‖model) | top-1 agreement |", "|---|---|---|---|---|",
             f"| teacher | {teacher['parameters'] / 1e6:.1f}M | {teacher['eval']['perplexity']:.2f} | – | – |"]
    for student in summary["students"]:
        for stage in ("pruned", "distilled"):
            if stage in student:
                metrics = student[stage]
                lines.append(f"| {student['name']} ({stage}) | {student['parameters'] / 1e6:.1f}M | {metrics['perplexity']:.2f} | "
                             f"{metrics['kl']:.3f} | {metrics['top1_agreement']:.1%} |")
    if "tasks" in teacher:
        lines += ["", "lm-evaluation-harness tasks (the final checkpoint of each student):", "", "| model | task | metric | value |", "|---|---|---|---|"]
        for label, tasks in [("teacher", teacher["tasks"])] + [(student["name"], student.get("tasks", {})) for student in summary["students"]]:
            lines += [f"| {label} | {task} | {metric} | {value:.4f} |" for task, metrics in tasks.items() for metric, value in metrics.items()
                      if not metric.endswith("_stderr")]
    for build in summary.get("teacher_cache", []):
        lines += ["", f"Teacher cache `{build['directory']}`: {build['rows']} train rows, {build['computed_rows']} computed in this run "
                      f"({build['seconds']:.0f} s)."]
    searched = [f"- {s['name']}: best within {s['search']['budget']}: {s['search']['chosen']} (all candidates: `{s['search']['candidates']}`)"
                for s in summary["students"] if "search" in s]
    if searched:
        lines += ["", "Shapes chosen by search:"] + searched
    engines = [f"- {s['name']}: `{s['engine']}`" for s in summary["students"] if "engine" in s]
    if engines:
        lines += ["", "Engines:"] + engines
    if summary.get("bench"):
        from toolchain.bench.report import format_results

        lines += ["", "## Benchmark: the teacher against the students (bench/results.md)", "", format_results(summary["bench"], plots_prefix="bench/")]
    stages = summary["stages"]
    lines += ["", f"This run: {len(stages['ran'])} stages ran, {len(stages['skipped'])} were already done, {stages['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def configure_parser(parser) -> None:
    from toolchain.cli_args import add_recipe_override_arguments

    parser.add_argument("recipe", help="a recipe YAML path or a built-in recipe name (`minitron recipes`)")
    add_recipe_override_arguments(parser)


def command(args) -> int:
    from toolchain.cli_args import recipe_overrides

    summary = run_pipeline(load_recipe(args.recipe, recipe_overrides(args)))
    print(format_summary(summary))
    return 0
