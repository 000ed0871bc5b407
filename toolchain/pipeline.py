"""`minitron run RECIPE`: the whole Minitron pipeline from one recipe, resumable stage by stage.

teacher correction → teacher eval → per student: prune → eval → distill → quantize → export → engine
build (from the distilled student; the profile quantizes as it says) → teacher engine + Triton benchmark of all engines → a summary table. Every stage writes its own directory atomically under the run folder, so a
directory that exists is complete: rerunning the same command skips finished stages and resumes an
interrupted distillation from its last checkpoint. Stages read each other's outputs from disk only.

Run folder:
    recipe.yaml                      the resolved recipe (a different recipe in the same folder is refused)
    teacher-corrected/               teacher after LM fine-tuning (only with teacher.correction.tokens)
    teacher-eval.json
    students/NAME/pruned/            HF checkpoint + pruning.json + importance.safetensors + eval.json
    students/NAME/distilled/         HF checkpoint + train_log.jsonl + eval.json
    students/NAME/quantized/         ModelOpt unified checkpoint (only with quantize.format)
    students/NAME/export-FORMAT/     exported final student (only with export.format)
    students/NAME/engine/            engine directory with manifest.json (only with engine.profile)
    teacher-engine/, bench/          the teacher's engine and the Triton benchmark of all engines (bench.enabled)
    summary.json, summary.md
"""

import json
import logging
import math
import shutil
from pathlib import Path

import yaml

from toolchain.data import prepare_data
from toolchain.errors import UserError
from toolchain.evaluate import evaluate_model
from toolchain.models import load_model, load_tokenizer, resolve_model_dir
from toolchain.paths import atomic_write_text
from toolchain.recipe import Recipe, StudentConfig, load_recipe

log = logging.getLogger(__name__)


def parameter_count(model_dir: Path) -> int:
    """Parameters stored in a checkpoint, from the safetensors headers (no weights are read)."""
    from safetensors import safe_open

    total = 0
    for file in Path(model_dir).glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


class Run:
    """The run folder of one recipe, and the shared teacher/data that every stage evaluates against."""

    def __init__(self, recipe: Recipe, overwrite: bool = False):
        if recipe.teacher.model is None:
            raise UserError(f"recipe {recipe.name} has no teacher; pass --teacher PATH (a local Hugging Face directory)")
        self.recipe = recipe
        self.dir = recipe.resolved_output_dir()
        self.claim_folder(overwrite)
        self.device = recipe.teacher.device
        self._teacher_model = None
        self._eval_rows = None

    def claim_folder(self, overwrite: bool) -> None:
        resolved = yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False)
        recipe_file = self.dir / "recipe.yaml"
        if recipe_file.is_file() and recipe_file.read_text() != resolved:
            if not overwrite:
                raise UserError(f"{self.dir} holds a run of a different recipe; choose another --out, or --overwrite to start it afresh")
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(recipe_file, resolved)

    @property
    def teacher(self) -> str:
        corrected = self.dir / "teacher-corrected"
        return str(corrected) if self.recipe.teacher.correction.tokens else self.recipe.teacher.model

    def teacher_model(self):
        if self._teacher_model is None:
            self._teacher_model = load_model(self.teacher, dtype=self.recipe.teacher.dtype, device=self.device)
        return self._teacher_model

    def eval_rows(self):
        if self._eval_rows is None:
            data = self.recipe.data
            packed = prepare_data(data.spec, load_tokenizer(self.teacher), data.seq_len, data.text_field, data.eval_fraction, data.calibration_fraction)
            self._eval_rows = packed.split("eval")
        return self._eval_rows

    def evaluate(self, model_dir: Path, path: Path, against_teacher: bool = True) -> dict:
        """Metrics of a checkpoint, recorded at `path`: computed once, read back on reruns."""
        if path.is_file():
            return json.loads(path.read_text())
        model = load_model(model_dir, dtype=self.recipe.teacher.dtype, device=self.device)
        metrics = evaluate_model(model, self.eval_rows(), self.recipe.eval.batch_size, self.recipe.eval.max_batches,
                                 teacher=self.teacher_model() if against_teacher else None, description=f"eval {Path(model_dir).name}")
        atomic_write_text(path, json.dumps(metrics, indent=2))
        return metrics


def correct_teacher(run: Run) -> None:
    from toolchain.finetune import finetune

    recipe = run.recipe
    out = run.dir / "teacher-corrected"
    if out.is_dir():
        return
    log.info("teacher correction: %s tokens of LM fine-tuning", f"{recipe.teacher.correction.tokens:,}")
    config = recipe.distill.model_copy(update={"tokens": recipe.teacher.correction.tokens, "steps": None,
                                               "lr": recipe.teacher.correction.lr, "min_lr": min(recipe.distill.min_lr, recipe.teacher.correction.lr)})
    finetune(recipe.teacher.model, recipe.data.spec, out, config, seq_len=recipe.data.seq_len, text_field=recipe.data.text_field,
             dtype=recipe.teacher.dtype, device=run.device)


def run_student(run: Run, student: StudentConfig, importance_file: Path | None) -> dict:
    from toolchain.distill import distill
    from toolchain.prune import prune

    recipe = run.recipe
    student_dir = run.dir / "students" / student.name
    pruned = student_dir / "pruned"
    if not pruned.is_dir():
        log.info("student %s: pruning", student.name)
        prune(run.teacher, recipe.data.spec, pruned, student.prune, importance_file=importance_file, seq_len=recipe.data.seq_len,
              text_field=recipe.data.text_field, dtype=recipe.teacher.dtype, device=run.device)
    row = {"name": student.name, "parameters": parameter_count(pruned), "pruned": run.evaluate(pruned, pruned / "eval.json")}
    trained = pruned  # engines are built from it: each profile applies its own quantization
    distill_config = recipe.student_distill(student)
    if distill_config.tokens or distill_config.steps:
        distilled = student_dir / "distilled"
        record = distilled / "eval.json"  # written last by distill, with the eval against the teacher
        if not record.is_file():
            log.info("student %s: distilling", student.name)
            distill(run.teacher, str(pruned), recipe.data.spec, distilled, distill_config, seq_len=recipe.data.seq_len,
                    text_field=recipe.data.text_field, dtype=recipe.teacher.dtype, device=run.device,
                    resume=(distilled / "checkpoints").is_dir(), eval_batches=recipe.eval.max_batches)
        row["distilled"] = json.loads(record.read_text())["eval"]
        trained = distilled
    final = quantize_student(run, trained, student_dir / "quantized", row) if recipe.quantize.format != "none" else trained
    if recipe.export.format != "none":
        from toolchain.export import export

        exported = student_dir / f"export-{recipe.export.format}"
        if not exported.is_dir():
            log.info("student %s: exporting %s", student.name, recipe.export.format)
            export(str(final), recipe.export.format, exported, recipe.export.dtype, recipe.export.tp, recipe.export.pp)
        row["export"] = str(exported)
    if recipe.engine.profile:
        from toolchain.build import build

        engine = student_dir / "engine"
        if not engine.is_dir():
            log.info("student %s: building engine %s", student.name, recipe.engine.profile)
            build(recipe.engine.profile, str(trained), engine, data=recipe.data.spec, seq_len=recipe.data.seq_len)
        row["engine"] = str(engine)
    row["checkpoint"] = str(final)
    return row


def benchmark_engines(run: Run, student_engines: dict[str, str]) -> dict | None:
    """Teacher engine (same profile) first, then the students', through Triton; None where engines cannot run here."""
    from toolchain.backends import engine_backend
    from toolchain.bench import bench
    from toolchain.build import build
    from toolchain.engine_profile import load_profile

    recipe = run.recipe
    reason = engine_backend(load_profile(recipe.engine.profile).backend).unavailable_reason()
    if reason is not None:
        log.info("engines of profile %s cannot be served here (%s): serve them where they run and use `minitron bench HOST:PORT`",
                 recipe.engine.profile, reason)
        return None
    teacher_engine = run.dir / "teacher-engine"
    if not teacher_engine.is_dir():
        log.info("building the teacher's engine %s for the benchmark", recipe.engine.profile)
        build(recipe.engine.profile, run.teacher, teacher_engine, data=recipe.data.spec, seq_len=recipe.data.seq_len)
    record = run.dir / "bench" / "bench.json"
    if record.is_file():
        return json.loads(record.read_text())
    b = recipe.bench
    return bench([str(teacher_engine), *student_engines.values()], labels=["teacher", *student_engines], data=recipe.data.spec,
                 input_len=b.input_len, output_len=b.output_len,
                 concurrency=b.concurrency, requests=b.requests, threads=b.threads, max_batch_size=recipe.serve.max_batch_size,
                 out=run.dir / "bench", max_error_rate=b.max_error_rate)


def quantize_student(run: Run, model_dir: Path, out: Path, row: dict) -> Path:
    """ModelOpt quantization of the final student; its perplexity before/after goes into the summary row."""
    from toolchain.quantize import REPORT_FILE, quantize

    recipe = run.recipe
    if not out.is_dir():
        log.info("%s: quantizing to %s", model_dir, recipe.quantize.format)
        quantize(str(model_dir), recipe.quantize.format, out, recipe.data.spec, recipe.quantize.calibration_samples, recipe.data.seq_len,
                 recipe.data.text_field, recipe.quantize.kv_cache, recipe.eval.max_batches, recipe.eval.batch_size, device=run.device)
    row["quantized"] = json.loads((out / REPORT_FILE).read_text())
    return out


def run_pipeline(recipe: Recipe, overwrite: bool = False) -> dict:
    """Run every stage of the recipe that has not finished yet; returns the summary."""
    run = Run(recipe, overwrite)
    if recipe.teacher.correction.tokens:
        correct_teacher(run)
    teacher_dir = resolve_model_dir(run.teacher)
    summary = {"recipe": recipe.name, "run_dir": str(run.dir), "teacher": {"model": run.teacher, "parameters": parameter_count(teacher_dir),
                                                                         "eval": run.evaluate(teacher_dir, run.dir / "teacher-eval.json", False)}}
    summary["students"] = []
    importance_file = None
    for student in recipe.students:
        summary["students"].append(run_student(run, student, importance_file))
        importance_file = run.dir / "students" / student.name / "pruned" / "importance.safetensors"
    engines = {student["name"]: student["engine"] for student in summary["students"] if "engine" in student}
    if engines and recipe.bench.enabled:
        summary["bench"] = benchmark_engines(run, engines)
    atomic_write_text(run.dir / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(run.dir / "summary.md", format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    teacher = summary["teacher"]
    lines = [f"# {summary['recipe']}", "", f"Run folder: `{summary['run_dir']}`; eval split of the recipe's data.", "",
             "| model | parameters | perplexity | KL(teacher‖model) | top-1 agreement |", "|---|---|---|---|---|",
             f"| teacher | {teacher['parameters'] / 1e6:.1f}M | {teacher['eval']['perplexity']:.2f} | – | – |"]
    for student in summary["students"]:
        for stage in ("pruned", "distilled"):
            if stage in student:
                metrics = student[stage]
                lines.append(f"| {student['name']} ({stage}) | {student['parameters'] / 1e6:.1f}M | {metrics['perplexity']:.2f} | "
                             f"{metrics['kl']:.3f} | {metrics['top1_agreement']:.1%} |")
    engines = [f"- {s['name']}: `{s['engine']}`" for s in summary["students"] if "engine" in s]
    if engines:
        lines += ["", "Engines:"] + engines
    if summary.get("bench"):
        from toolchain.bench import format_bench

        lines += ["", "Serving benchmark (first row: the teacher's engine):", "", format_bench(summary["bench"])]
    return "\n".join(lines) + "\n"


def configure_parser(parser) -> None:
    from toolchain.cli_args import add_recipe_override_arguments

    parser.add_argument("recipe", help="a recipe YAML path or a built-in recipe name (see `minitron validate --help`)")
    add_recipe_override_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="discard an existing run of a different recipe in the output folder")


def command(args) -> int:
    from toolchain.cli_args import recipe_overrides

    summary = run_pipeline(load_recipe(args.recipe, recipe_overrides(args)), overwrite=args.overwrite)
    print(format_summary(summary))
    return 0
