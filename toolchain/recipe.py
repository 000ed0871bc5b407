"""The recipe: one YAML file that composes the settings sections (toolchain/settings.py) into a pipeline.

teacher → (teacher correction) → importance → per student: prune → distill → quantize → export →
engine build → serve → bench. Built-in recipes ship in `toolchain/recipes/` (`minitron recipes`);
any field can be overridden with `--set dotted.key=value` (students are addressed by index or by
name: `students.width.prune.hidden_size=432`). Not here: running it (toolchain/pipeline.py).
"""

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from toolchain.errors import UserError, validation_message
from toolchain.named_yaml import apply_override, builtin_names, parse_yaml, read_named_text, read_named_yaml
from toolchain.settings import (
    SECTIONS,
    BenchConfig,
    ComputeConfig,
    DataConfig,
    DistillConfig,
    EngineConfig,
    EvalConfig,
    ExportConfig,
    ImportanceConfig,
    LmEvalConfig,
    PruneConfig,
    QuantizeConfig,
    SearchConfig,
    Section,
    ServeConfig,
    TeacherCorrectionConfig,
)


class TeacherConfig(Section):
    model: str | None = Field(None, description="Teacher: a local Hugging Face directory or a built-in name (`minitron models`). Required; `--teacher` sets it.")
    correction: TeacherCorrectionConfig = Field(default_factory=TeacherCorrectionConfig, description="Teacher correction before pruning.")


class StudentConfig(Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Student name; its outputs go to OUTPUT_DIR/students/NAME.")
    prune: PruneConfig = Field(default_factory=PruneConfig, description="Pruned architecture of this student.")
    distill: dict[str, Any] = Field(default_factory=dict, description="Fields of the recipe's `distill` this student sets otherwise (e.g. {tokens: 49152}); "
                                                                     "the rest, and later --set distill.FIELD overrides, come from the recipe's.")
    search: SearchConfig | None = Field(None, description="Choose this student's shape by a search under a budget (`minitron search`) instead of "
                                                          "fixed prune targets; the chosen candidate is then distilled like any student.")

    @model_validator(mode="after")
    def targets_or_search(self):
        if self.search is not None and self.prune.targets():
            raise ValueError(f"student {self.name} has both prune targets and a search; keep one (the search chooses the targets)")
        if self.search is not None and self.search.budget is None:
            raise ValueError(f"student {self.name}'s search has no budget; set search.budget (e.g. non_embedding=50%)")
        return self


class Recipe(Section):
    name: str = Field(..., description="Recipe name.")
    description: str = Field("", description="What the recipe produces.")
    output_dir: str = Field("runs/{name}", description="Where the run writes; {name} is replaced by the recipe name.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="The model to compress.")
    compute: ComputeConfig = Field(default_factory=ComputeConfig, description="dtype and device of every stage.")
    data: DataConfig = Field(default_factory=DataConfig, description="Calibration, distillation and eval data, and how it is split.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation of the teacher and of every student (the same rows for all).")
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig, description="lm-evaluation-harness tasks run on the teacher and every final student (none by default), and by `minitron eval --recipe`.")
    importance: ImportanceConfig = Field(default_factory=ImportanceConfig, description="Importance of the teacher's units, computed once for all students.")
    students: list[StudentConfig] = Field(default_factory=list, description="Students to prune and distill from the teacher.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Distillation settings shared by students.")
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig, description="Quantization of the distilled students.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Export of the final students.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Engine build.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Triton serving.")
    bench: BenchConfig = Field(default_factory=BenchConfig, description="Latency/throughput benchmark of the engines.")

    @model_validator(mode="after")
    def unique_student_names(self):
        names = [student.name for student in self.students]
        if len(names) != len(set(names)):
            raise ValueError(f"student names must be unique, got {names}")
        if "teacher" in names:
            raise ValueError("a student cannot be named 'teacher' (the teacher's rows and engine go by that name)")
        return self

    @model_validator(mode="after")
    def valid_student_distill(self):
        for student in self.students:
            self.student_distill(student)
        return self

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir.replace("{name}", self.name))

    def student_distill(self, student: StudentConfig) -> DistillConfig:
        """The recipe's `distill` with the student's own fields laid over it (a budget set there replaces the other budget)."""
        if not student.distill:
            return self.distill
        merged = {**self.distill.model_dump(), **student.distill}
        for budget, other in (("tokens", "steps"), ("steps", "tokens")):
            if budget in student.distill and other not in student.distill:
                merged[other] = None
        try:
            return DistillConfig.model_validate(merged)
        except ValidationError as exc:
            field, message = validation_message(exc)
            raise ValueError(f"students.{student.name}.distill.{field}: {message}" if field else f"students.{student.name}.distill: {message}") from None

    def student(self, name: str | None) -> StudentConfig:
        """A student by name; with no name, the only student."""
        names = [student.name for student in self.students]
        if name is None:
            if len(names) != 1:
                raise UserError(f"recipe {self.name} has students {names or 'none'}; choose one with --recipe-student")
            return self.students[0]
        if name not in names:
            raise UserError(f"recipe {self.name} has no student {name!r}; it has {', '.join(names) or 'none'}")
        return self.students[names.index(name)]

    def section(self, key: str, student: StudentConfig | None = None) -> BaseModel:
        """The recipe's settings of section `key` (settings.SECTIONS), for `student` where they are per student."""
        if key == "prune":
            return (student or self.student(None)).prune
        if key == "search":  # a recipe without a search student lends its other sections to `minitron search`
            student = student or (self.students[0] if len(self.students) == 1 else None)
            return student.search if student is not None and student.search is not None else SearchConfig()
        if key == "distill":
            return self.student_distill(student) if student is not None else self.distill
        if key == "training":
            return (self.student_distill(student) if student is not None else self.distill).training()
        if key == "correction":
            return self.teacher.correction
        return getattr(self, key)


def recipe_field_namer(recipe: Recipe, student: StudentConfig | None = None, correcting_teacher: bool = False):
    """How errors name a setting during a recipe run: the recipe field to change (`students.width.prune.hidden_size`)."""
    def name(path: str) -> str:
        section, _, field = path.partition(".")
        if section in ("prune", "search") and student is not None:
            return f"students.{student.name}.{section}.{field}"
        if section == "training" and correcting_teacher and field in TeacherCorrectionConfig.model_fields:
            return f"teacher.correction.{field}"
        if section in ("training", "distill"):
            return f"students.{student.name}.distill.{field}" if student is not None and field in student.distill else f"distill.{field}"
        if section == "correction":
            return f"teacher.correction.{field}"
        if section == "profile":
            return f"engine.overrides.{field}"
        if section == "workload":
            return f"bench.workload_overrides.{field}"
        return path
    return name


# ---------------------------------------------------------------- loading


RECIPES = resources.files("toolchain.recipes")


def builtin_recipe_names() -> list[str]:
    return builtin_names(RECIPES)


def recipe_text(recipe: str) -> str:
    """The YAML text of a recipe, as written (`minitron recipes show`)."""
    return read_named_text(recipe, RECIPES, "recipe")[0]


def read_recipe_yaml(recipe: str) -> dict:
    return read_named_yaml(recipe, RECIPES, "recipe", "of sections: name, teacher, data, students, ...")[0]


def parse_override(assignment: str) -> tuple[str, object]:
    if "=" not in assignment:
        raise UserError(f"override {assignment!r} must look like section.field=value")
    key, raw = assignment.split("=", 1)
    return key.strip(), parse_yaml(raw, f"the value of --set {key.strip()}") if raw.strip() else None


def load_recipe(recipe: str, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe by path or built-in name, apply `key=value` overrides, validate."""
    data = read_recipe_yaml(recipe)
    for assignment in overrides or []:
        apply_override(data, *parse_override(assignment))
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        field, message = validation_message(exc)
        raise UserError(f"invalid recipe field {field}: {message} (recipe {recipe})" if field else f"invalid recipe: {message} (recipe {recipe})") from None


# ---------------------------------------------------------------- reference and plan


def schema_reference(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(field, default, description) for every field, nested sections expanded."""
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        key = f"{prefix}{name}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.append((key, "(section)", field.description or ""))
            rows.extend(schema_reference(annotation, f"{key}."))
            continue
        default = field.get_default(call_default_factory=True)
        rows.append((key, "required" if field.is_required() else repr(default), field.description or ""))
        if key == "students":
            rows.extend(schema_reference(StudentConfig, "students[]."))
    return rows


def settings_reference_markdown() -> str:
    """docs/settings.md: every section's fields with their flag, default and meaning (what --help and --schema say)."""
    from toolchain.cli_args import field_flag

    lines = ["# Settings", "", "Generated by `minitron validate --schema --markdown`; do not edit by hand. Every field is a recipe",
             "field (`section.field`) and a flag of the subcommands whose stage takes that section.", ""]
    for key, model in SECTIONS.items():
        lines += [f"## `{key}`", ""]
        if model.__doc__:
            lines += [model.__doc__.strip().splitlines()[0], ""]
        lines += ["| field | flag | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            default = field.get_default(call_default_factory=True)
            lines.append(f"| `{name}` | `{field_flag(model, name)}` | `{default!r}` | {field.description} |")
        lines.append("")
    return "\n".join(lines)


def describe_plan(recipe: Recipe) -> str:
    """The resolved recipe as YAML, headed by the stages it will run."""
    stages = []
    if recipe.teacher.correction.tokens:
        stages.append(f"teacher correction: {recipe.teacher.correction.tokens:,} tokens of LM fine-tuning")
    if recipe.students:
        stages.append(f"importance: {recipe.importance.method} on {recipe.importance.calibration_samples} calibration sequences, once for all students")
    for student in recipe.students:
        distill = recipe.student_distill(student)
        budget = f"{distill.tokens:,} tokens" if distill.tokens else (f"{distill.steps:,} steps" if distill.steps else "no budget: distillation skipped")
        if student.search is not None:
            search = student.search
            stages.append(f"student {student.name}: search for the best shape within {search.budget}"
                          f"{f' on {search.profile}' if search.profile else ''} ({search.max_candidates}+2 candidates, {search.tokens:,} tokens each), "
                          f"distill the chosen one for {budget}")
        else:
            stages.append(f"student {student.name}: prune to {student.prune.targets() or 'the teacher shape'}, distill for {budget}")
    export = recipe.export
    stages.append(f"quantize: {recipe.quantize.format}; export: {export.format}"
                  + (f" ({export.resolved_dtype()}, tp={export.tp}, pp={export.pp})" if export.format != "none" else ""))
    stages.append(f"engine profile: {recipe.engine.profile or 'none'}")
    if recipe.engine.profile and recipe.bench.enabled:
        stages.append(f"bench: teacher against students, backend {recipe.bench.backend}, workload {recipe.bench.workload}"
                      + (f" with {recipe.bench.workload_overrides}" if recipe.bench.workload_overrides else "")
                      + f", projected onto {recipe.engine.profile} (CPU backends here; GPU engines: `minitron bench --backend trtllm` or `--url`)")
    lines = [f"recipe {recipe.name}: {recipe.description.strip()}", f"output: {recipe.resolved_output_dir()}"]
    lines += ["stages:"] + [f"  {i}. {stage}" for i, stage in enumerate(stages, 1)]
    lines += ["resolved recipe:", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False).rstrip()]
    return "\n".join(lines)


def check_recipe_inputs(recipe: Recipe) -> None:
    """Refuse a recipe that cannot run, before any work: teacher, data, student targets, sequence length, engine profile."""
    from toolchain.data import check_data_spec
    from toolchain.engine_profile import load_profile
    from toolchain.errors import settings_named_by
    from toolchain.models import check_model_available, load_config
    from toolchain.prune.shapes import ModelShape, pruned_config, target_shape

    if recipe.teacher.model is None:
        raise UserError(f"recipe {recipe.name} has no teacher; pass --teacher PATH (a local Hugging Face directory) or set teacher.model")
    check_model_available(recipe.teacher.model)
    check_data_spec(recipe.data.spec)
    config = load_config(recipe.teacher.model)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and recipe.data.seq_len > limit:
        raise UserError(f"data.seq_len {recipe.data.seq_len} exceeds the teacher's max_position_embeddings ({limit}); lower data.seq_len")
    original = ModelShape.from_config(config)
    for student in recipe.students:
        with settings_named_by(recipe_field_namer(recipe, student)):
            if student.search is not None:
                from toolchain.search import choose_candidates
                from toolchain.search_space import Architecture

                choose_candidates(original, Architecture.from_config(config), student.search)
                continue
            shape, _ = target_shape(original, student.prune)
            pruned_config(config, shape, list(range(shape.num_layers)))
    if recipe.engine.profile:
        with settings_named_by(recipe_field_namer(recipe)):
            load_profile(recipe.engine.profile, recipe.engine.overrides)
            if recipe.bench.enabled:
                from toolchain.bench.workloads import load_workload

                load_workload(recipe.bench.workload, recipe.bench.workload_overrides)


# ---------------------------------------------------------------- `minitron validate`, `minitron recipes`


def configure_parser(parser) -> None:
    from toolchain.cli_args import add_recipe_override_arguments

    parser.add_argument("recipe", nargs="?", help=f"a recipe YAML path or a built-in recipe name ({', '.join(builtin_recipe_names())})")
    add_recipe_override_arguments(parser)
    parser.add_argument("--schema", action="store_true", help="list every recipe field with its default and meaning")
    parser.add_argument("--markdown", action="store_true", help="with --schema: the settings reference as Markdown (docs/settings.md)")


def command(args) -> int:
    from toolchain.cli_args import recipe_overrides

    if args.schema:
        if args.markdown:
            print(settings_reference_markdown(), end="")
            return 0
        for key, default, description in schema_reference():
            print(f"{key}  [{default}]\n    {description}")
        return 0
    if args.recipe is None:
        raise UserError(f"name a recipe: a YAML path or one of {', '.join(builtin_recipe_names())}")
    recipe = load_recipe(args.recipe, recipe_overrides(args))
    print(describe_plan(recipe))
    check_recipe_inputs(recipe)
    print("inputs: teacher, data, student targets and engine profile checked")
    return 0
