"""The recipe: one YAML file that describes the whole pipeline, validated by pydantic.

teacher → (teacher correction) → importance → prune → distill → quantize → export → engine build →
serve → bench. Every field has a default and a description; `minitron validate --schema` lists them.
Built-in recipes ship in `toolchain/recipes/`; any field can be overridden with `--set dotted.key=value`
(students are addressed by index or by name: `students.width.prune.hidden_size=432`).
"""

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from toolchain.errors import UserError
from toolchain.named_yaml import apply_override, builtin_names, read_named_yaml

Dtype = Literal["float32", "bfloat16", "float16"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherCorrectionConfig(Section):
    tokens: int = Field(0, ge=0, description="Tokens of LM-loss fine-tuning of the teacher on the distillation data before pruning (Minitron's teacher correction); 0 skips it.")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate of the teacher correction.")


class TeacherConfig(Section):
    model: str | None = Field(None, description="Teacher: a local Hugging Face directory or a built-in name (`minitron models`). Required; `--teacher` sets it.")
    dtype: Dtype = Field("float32", description="Weights and compute dtype; float32 on CPU (bfloat16 is ~6x slower on AVX2 CPUs), bfloat16 on GPU.")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto (CUDA when present).")
    correction: TeacherCorrectionConfig = Field(default_factory=TeacherCorrectionConfig, description="Teacher correction before pruning.")


class DataConfig(Section):
    spec: str = Field("builtin:python-docs", description="Data: .txt file or folder, .jsonl, .parquet, or builtin:python-docs.")
    text_field: str = Field("text", description="Field (jsonl) or column (parquet) holding the text.")
    seq_len: int = Field(256, gt=0, description="Tokens per packed sequence; must not exceed the models' max_position_embeddings.")
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="Share of documents (by text hash) in the eval split.")
    calibration_fraction: float = Field(0.05, gt=0, lt=1, description="Share of documents (by text hash) in the calibration split.")


class EvalConfig(Section):
    batch_size: int = Field(8, gt=0, description="Sequences per eval batch.")
    max_batches: int | None = Field(None, gt=0, description="Stop after this many eval batches; None evaluates the whole eval split.")


class PruneConfig(Section):
    hidden_size: int | None = Field(None, gt=0, description="Target embedding channels; None keeps the teacher's.")
    ffn_hidden_size: int | None = Field(None, gt=0, description="Target MLP neurons (intermediate_size); None keeps the teacher's.")
    num_attention_heads: int | None = Field(None, gt=0, description="Target query heads, pruned equally in every GQA group; None keeps all.")
    num_key_value_heads: int | None = Field(None, gt=0, description="Target key-value heads (whole GQA groups); None keeps all.")
    num_layers: int | None = Field(None, gt=0, description="Target decoder layers (depth); None keeps all.")
    drop_layers: str | None = Field(None, description="Explicit layers to drop, e.g. '16-31' or '3,5,7-9' (0-based); overrides depth_method.")
    depth_method: Literal["lm_loss", "lm_loss_contiguous", "block_importance", "random"] = Field(
        "lm_loss", description="How layers are chosen: LM-loss increase of each layer alone, of the best contiguous block, block importance (1 - cos), or random (baseline).")
    importance: Literal["activation", "magnitude", "random"] = Field("activation", description="Width importance: Minitron activations, weight magnitude, or random (baselines).")
    batch_aggregation: Literal["mean", "l2", "var"] = Field("l2", description="How activation importance aggregates over the batch (Minitron's best: L2).")
    sequence_aggregation: Literal["mean", "l2", "var"] = Field("mean", description="How activation importance aggregates over the sequence (Minitron's best: mean).")
    calibration_samples: int = Field(1024, gt=0, description="Calibration sequences for importance (Minitron uses 1024).")
    depth_calibration_samples: int | None = Field(None, gt=0, description="Calibration sequences for LM-loss layer scores (one forward pass per candidate); None uses calibration_samples.")
    batch_size: int = Field(8, gt=0, description="Sequences per importance batch.")
    seed: int = Field(0, description="Seed of the random baseline.")


class TrainingConfig(Section):
    """The training loop shared by distillation and fine-tuning (teacher correction)."""

    tokens: int | None = Field(None, gt=0, description="Token budget; exactly one of tokens/steps.")
    steps: int | None = Field(None, gt=0, description="Optimizer-step budget; exactly one of tokens/steps.")
    global_batch_size: int = Field(8, gt=0, description="Sequences per optimizer step across all ranks (gradient accumulation fills the rest).")
    micro_batch_size: int = Field(4, gt=0, description="Sequences per forward/backward on one rank (lowered to the per-rank batch if larger).")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (Minitron: 1e-4).")
    min_lr: float = Field(1e-5, ge=0, description="Learning rate at the end of the cosine decay (Minitron: 1e-5).")
    warmup_steps: int = Field(40, ge=0, description="Linear warm-up steps (Minitron: 40).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this value.")
    autocast: bool = Field(True, description="bfloat16 autocast on CUDA devices that support it; CPU always runs in the model dtype (bfloat16 is slower there).")
    gradient_checkpointing: bool = Field(False, description="Recompute student activations in backward to save memory.")
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="Strategy under torchrun: DDP (teacher replicated), or FSDP (student and teacher sharded) for models that do not fit one device.")
    save_every: int = Field(100, gt=0, description="Write a resumable checkpoint every N optimizer steps (and at the last step).")
    keep_checkpoints: int = Field(2, gt=0, description="Checkpoints kept on disk.")
    seed: int = Field(0, description="Seed of the data order and of the RNG states.")

    @model_validator(mode="after")
    def one_budget(self):
        if self.tokens is not None and self.steps is not None:
            raise ValueError("give a budget in tokens or in steps, not both")
        if self.min_lr > self.lr:
            raise ValueError("min_lr must not exceed lr")
        return self


class DistillConfig(TrainingConfig):
    """Distillation: the training loop plus the losses. Loss weights are relative (the loss is their weighted mean)."""

    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the logit KL loss (the loss is scaled by T^2).")
    logit_loss_weight: float = Field(1.0, ge=0, description="Weight of the forward KL(teacher || student) on logits, per token.")
    lm_loss_weight: float = Field(0.0, ge=0, description="Weight of the LM cross-entropy on the data.")
    intermediate_loss: Literal["none", "cosine", "mse"] = Field("none", description="Hidden-state loss between mapped teacher and student decoder-layer outputs (needs equal hidden sizes).")
    intermediate_loss_weight: float = Field(0.0, ge=0, description="Weight of the hidden-state loss (averaged over the mapped layers).")

    @model_validator(mode="after")
    def usable_losses(self):
        if self.logit_loss_weight + (self.intermediate_loss_weight if self.intermediate_loss != "none" else 0.0) <= 0:
            raise ValueError("distillation needs a positive logit_loss_weight or an intermediate loss with a positive weight")
        if (self.intermediate_loss == "none") != (self.intermediate_loss_weight == 0):
            raise ValueError("set intermediate_loss (cosine or mse) and a positive intermediate_loss_weight together")
        return self


class StudentConfig(Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Student name; its outputs go to OUTPUT_DIR/students/NAME.")
    prune: PruneConfig = Field(default_factory=PruneConfig, description="Pruning targets of this student.")
    distill: DistillConfig | None = Field(None, description="Distillation settings for this student; None uses the recipe's `distill`.")


class QuantizeConfig(Section):
    format: Literal["none", "fp8", "int8_sq", "int4_awq"] = Field("none", description="ModelOpt quantization of the distilled student.")
    calibration_samples: int = Field(128, gt=0, description="Calibration sequences for quantization.")
    kv_cache: Literal["none", "fp8"] = Field("none", description="Also quantize the KV cache (fp8) when format is set.")


class ExportConfig(Section):
    format: Literal["none", "hf", "trtllm", "onnx"] = Field("none", description="Export of the final (quantized, if quantize.format is set) student; none skips it. The engine build exports on its own.")
    dtype: Dtype = Field("bfloat16", description="Exported weight dtype.")
    tp: int = Field(1, gt=0, description="TensorRT-LLM tensor-parallel ranks.")
    pp: int = Field(1, gt=0, description="TensorRT-LLM pipeline-parallel ranks.")


class EngineConfig(Section):
    profile: str | None = Field("cpu-fp32", description="Engine profile: a name in engines/ or a YAML path; None skips the engine build.")


class ServeConfig(Section):
    host: str = Field("127.0.0.1", description="Address Triton binds; 127.0.0.1 unless you mean to expose it.")
    http_port: int | None = Field(None, gt=0, lt=65536, description="HTTP port; None picks a free one.")
    grpc_port: int | None = Field(None, gt=0, lt=65536, description="gRPC port; None picks a free one.")
    metrics_port: int | None = Field(None, gt=0, lt=65536, description="Prometheus metrics port; None picks a free one.")
    instances: int = Field(1, gt=0, description="Model instances; each CPU instance loads its own engine.")
    max_batch_size: int = Field(8, gt=0, description="Largest batch Triton forms (capped by the engine's max_batch_size).")
    threads: int | None = Field(None, gt=0, description="CPU engine threads per instance; None uses the profile's cpu_threads, else cores / instances.")


class BenchConfig(Section):
    enabled: bool = Field(True, description="After the engine builds, benchmark the teacher's and the students' engines through Triton (CPU engines; TensorRT-LLM engines are benchmarked on the GPU machine with `minitron bench HOST:PORT`).")
    input_len: int = Field(128, gt=0, description="Prompt tokens per request.")
    output_len: int = Field(64, gt=0, description="Generated tokens per request.")
    concurrency: list[int] = Field(default_factory=lambda: [1, 4], description="Concurrent clients; one measurement per value.")
    requests: int = Field(16, gt=0, description="Requests per measurement.")
    threads: int = Field(1, gt=0, description="CPU threads of the engine (pinned for stable numbers).")
    max_error_rate: float = Field(0.0, ge=0, le=1, description="Share of a target's requests that may fail; above it the benchmark fails (exit 2) and writes nothing.")


class Recipe(Section):
    name: str = Field(..., description="Recipe name.")
    description: str = Field("", description="What the recipe produces.")
    output_dir: str = Field("runs/{name}", description="Where the run writes; {name} is replaced by the recipe name.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="The model to compress.")
    data: DataConfig = Field(default_factory=DataConfig, description="Calibration, distillation and eval data.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation settings.")
    students: list[StudentConfig] = Field(default_factory=list, description="Students to prune and distill from the teacher.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Distillation settings shared by students.")
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig, description="Quantization.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Export.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Engine build.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Triton serving.")
    bench: BenchConfig = Field(default_factory=BenchConfig, description="Latency/throughput benchmark.")

    @model_validator(mode="after")
    def unique_student_names(self):
        names = [student.name for student in self.students]
        if len(names) != len(set(names)):
            raise ValueError(f"student names must be unique, got {names}")
        return self

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir.replace("{name}", self.name))

    def student_distill(self, student: StudentConfig) -> DistillConfig:
        return student.distill or self.distill


def builtin_recipe_names() -> list[str]:
    return builtin_names(resources.files("toolchain.recipes"))


def read_recipe_yaml(recipe: str) -> dict:
    return read_named_yaml(recipe, resources.files("toolchain.recipes"), "recipe", "of sections: name, teacher, data, ...")[0]


def parse_override(assignment: str) -> tuple[str, object]:
    if "=" not in assignment:
        raise UserError(f"override {assignment!r} must look like section.field=value")
    key, raw = assignment.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def load_recipe(recipe: str, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe by path or built-in name, apply `key=value` overrides, validate."""
    data = read_recipe_yaml(recipe)
    for assignment in overrides or []:
        apply_override(data, *parse_override(assignment))
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "(recipe)"
        raise UserError(f"invalid recipe field {field}: {error['msg']} (recipe {recipe})") from None


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


def describe_plan(recipe: Recipe) -> str:
    """The resolved recipe as YAML, headed by the stages it will run."""
    stages = []
    if recipe.teacher.correction.tokens:
        stages.append(f"teacher correction: {recipe.teacher.correction.tokens:,} tokens of LM fine-tuning")
    for student in recipe.students:
        targets = {k: v for k, v in student.prune.model_dump().items() if k in PRUNE_TARGETS and v is not None}
        distill = recipe.student_distill(student)
        budget = f"{distill.tokens:,} tokens" if distill.tokens else (f"{distill.steps:,} steps" if distill.steps else "no budget: distillation skipped")
        stages.append(f"student {student.name}: prune to {targets or 'the teacher shape'}, distill for {budget}")
    export = recipe.export
    stages.append(f"quantize: {recipe.quantize.format}; export: {export.format}"
                  + (f" ({export.dtype}, tp={export.tp}, pp={export.pp})" if export.format != "none" else ""))
    stages.append(f"engine profile: {recipe.engine.profile or 'none'}")
    if recipe.engine.profile and recipe.bench.enabled:
        stages.append(f"bench: the teacher's and students' engines through Triton, {recipe.bench.input_len} prompt / "
                      f"{recipe.bench.output_len} new tokens, concurrency {recipe.bench.concurrency} (CPU engines; GPU engines: `minitron bench HOST:PORT`)")
    lines = [f"recipe {recipe.name}: {recipe.description.strip()}", f"output: {recipe.resolved_output_dir()}"]
    if recipe.teacher.model is None:
        lines.append("teacher.model: not set; pass --teacher PATH (a local Hugging Face directory) to run it")
    lines += ["stages:"] + [f"  {i}. {stage}" for i, stage in enumerate(stages, 1)]
    lines += ["resolved recipe:", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False).rstrip()]
    return "\n".join(lines)


PRUNE_TARGETS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_key_value_heads", "num_layers", "drop_layers")


def configure_parser(parser) -> None:
    from toolchain.cli_args import add_recipe_override_arguments

    parser.add_argument("recipe", nargs="?", help=f"a recipe YAML path or a built-in recipe name ({', '.join(builtin_recipe_names())})")
    add_recipe_override_arguments(parser)
    parser.add_argument("--schema", action="store_true", help="list every recipe field with its default and meaning")


def command(args) -> int:
    from toolchain.cli_args import recipe_overrides

    if args.schema:
        for key, default, description in schema_reference():
            print(f"{key}  [{default}]\n    {description}")
        return 0
    if args.recipe is None:
        raise UserError(f"name a recipe: a YAML path or one of {', '.join(builtin_recipe_names())}")
    print(describe_plan(load_recipe(args.recipe, recipe_overrides(args))))
    return 0
