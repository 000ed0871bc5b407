"""Every setting of every stage, declared once: the pydantic sections that are the stages' API.

A stage's public function takes the sections it uses (e.g. `prune(model, out, prune, importance,
data, compute)`); a recipe (toolchain/recipe.py) is these sections composed; the flags of a
subcommand are generated from them (toolchain/cli_args.py: name, type, default and help from the
field), and `minitron validate --schema` and docs/settings.md list them. So a field exists once, and
whatever a recipe sets reaches every stage that reads it.

A field's flag is `--` + its name with dashes, unless the field names another (`flag`), which only
happens where two sections a subcommand shares would clash (eval's batch size) or a name reads
better on the command line (`data.spec` is `--data`). Library code names a setting in an error with
`toolchain.errors.setting("data.seq_len")`: the CLI shows the flag, a recipe run the field path.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Dtype = Literal["float32", "bfloat16", "float16"]
DepthMethod = Literal["lm_loss", "lm_loss_contiguous", "block_importance", "random"]


def flag(name: str) -> dict:
    """Field metadata giving the field another command-line flag than its own name."""
    return {"flag": name}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ComputeConfig(Section):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and compute dtype; auto is bfloat16 on a CUDA GPU that has it, float32 elsewhere (bfloat16 is ~6x slower on AVX2 CPUs).")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="cpu, cuda, cuda:N, or auto (CUDA when present).")


class DataConfig(Section):
    spec: str = Field("builtin:python-docs", description="Data: a .txt file or folder of them, .jsonl, .parquet, or builtin:python-docs.",
                      json_schema_extra=flag("--data"))
    text_field: str = Field("text", description="Field (jsonl) or column (parquet) holding the text.")
    seq_len: int = Field(256, gt=0, description="Tokens per packed sequence; at most the models' max_position_embeddings.")
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="Share of documents (by text hash) in the eval split.")
    calibration_fraction: float = Field(0.05, gt=0, lt=1, description="Share of documents (by text hash) in the calibration split.")

    @model_validator(mode="after")
    def fractions_leave_training_data(self):
        if self.eval_fraction + self.calibration_fraction >= 1:
            raise ValueError("eval_fraction + calibration_fraction must be below 1 (the rest is the train split)")
        return self


class EvalConfig(Section):
    batch_size: int = Field(8, gt=0, description="Sequences per eval batch.", json_schema_extra=flag("--eval-batch-size"))
    max_batches: int | None = Field(None, ge=0, description="Evaluate at most this many batches; none evaluates the whole split, 0 skips the evaluation a stage runs after its work.",
                                    json_schema_extra=flag("--eval-batches"))
    split: Literal["eval", "calibration", "train", "all"] = Field("eval", description="Which split of the data to evaluate on (all: every document; for small files).")


class LmEvalConfig(Section):
    """Downstream tasks of lm-evaluation-harness (`minitron eval MODEL --tasks ...`; needs the lm-eval extra)."""

    tasks: list[str] = Field(default_factory=list, description="lm-eval tasks or groups to run instead of the perplexity eval (e.g. hellaswag,arc_easy,winogrande,mmlu); "
                                                                "their datasets come from the Hugging Face Hub unless the task is local.")
    task_dir: str | None = Field(None, description="A folder of lm-eval task YAML files (e.g. a multiple-choice task over a local JSONL file) added to the known tasks.")
    limit: int | None = Field(None, gt=0, description="At most this many examples per task (a quick look); none runs every example.", json_schema_extra=flag("--task-limit"))
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per prompt; none uses each task's default (Minitron reports MMLU 5-shot).")
    batch_size: int = Field(8, gt=0, description="Requests per forward pass.", json_schema_extra=flag("--task-batch-size"))


class ImportanceConfig(Section):
    """How the importance of every prunable unit is measured; computed once per teacher, data and these settings."""

    method: Literal["activation", "magnitude", "random"] = Field(
        "activation", description="Width importance: Minitron activations, weight magnitude, or random (baselines).", json_schema_extra=flag("--importance-method"))
    batch_aggregation: Literal["mean", "l2", "var"] = Field("l2", description="How activation importance aggregates over the batch (Minitron's best: l2).")
    sequence_aggregation: Literal["mean", "l2", "var"] = Field("mean", description="How activation importance aggregates over the sequence (Minitron's best: mean).")
    calibration_samples: int = Field(1024, gt=0, description="Calibration sequences for importance (Minitron uses 1024).")
    depth_calibration_samples: int | None = Field(None, gt=0, description="Calibration sequences for LM-loss layer scores (one forward pass per candidate); none uses calibration_samples.")
    batch_size: int = Field(8, gt=0, description="Sequences per importance forward pass.")
    seed: int = Field(0, description="Seed of the random baselines (random importance, random depth).", json_schema_extra=flag("--importance-seed"))


PRUNE_TARGETS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_key_value_heads", "num_layers", "drop_layers")


class PruneConfig(Section):
    """The pruned architecture: targets per axis (omitted axes keep the teacher's) and how layers are chosen."""

    hidden_size: int | None = Field(None, gt=0, description="Target embedding channels; none keeps the teacher's.")
    ffn_hidden_size: int | None = Field(None, gt=0, description="Target MLP neurons (intermediate_size); none keeps the teacher's.")
    num_attention_heads: int | None = Field(None, gt=0, description="Target query heads, pruned equally in every GQA group; none keeps all.")
    num_key_value_heads: int | None = Field(None, gt=0, description="Target key-value heads (whole GQA groups); none keeps all.")
    num_layers: int | None = Field(None, gt=0, description="Target decoder layers (depth), chosen by depth_method; none keeps all.")
    drop_layers: str | None = Field(None, description="Explicit layers to drop, e.g. '16-31' or '3,5,7-9' (0-based); overrides depth_method.")
    depth_method: DepthMethod = Field(
        "lm_loss", description="How layers are chosen: LM-loss increase of each layer alone, of the best contiguous block, block importance (1 - cos), or random (baseline).")

    def targets(self) -> dict:
        """The axes this config prunes, with their targets."""
        return {name: getattr(self, name) for name in PRUNE_TARGETS if getattr(self, name) is not None}


class TrainingConfig(Section):
    """The training loop shared by distillation and fine-tuning (teacher correction)."""

    tokens: int | None = Field(None, gt=0, description="Token budget (global batch x seq_len per step); exactly one of tokens/steps.")
    steps: int | None = Field(None, gt=0, description="Optimizer-step budget; exactly one of tokens/steps.")
    global_batch_size: int = Field(8, gt=0, description="Sequences per optimizer step across all ranks (gradient accumulation fills the rest).")
    micro_batch_size: int = Field(4, gt=0, description="Sequences per forward/backward on one rank (lowered to the per-rank batch if larger).")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer: AdamW (Minitron's) or SGD with momentum 0.9.")
    adam_betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas (beta1,beta2).")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (Minitron: 1e-4).")
    min_lr: float = Field(1e-5, ge=0, description="Learning rate at the end of the decay (Minitron: 1e-5).")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay from lr to min_lr after the warm-up, over the rest of the run.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warm-up steps; none uses warmup_fraction of the run, so short runs reach their peak.")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="Warm-up as a share of the run's steps when warmup_steps is not set.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this value.")
    autocast: bool = Field(True, description="bfloat16 autocast on CUDA devices that support it; CPU always runs in the model dtype (bfloat16 is slower there).")
    gradient_checkpointing: bool = Field(False, description="Recompute student activations in backward to save memory.")
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="Strategy under torchrun: DDP (teacher replicated), or FSDP (student and teacher sharded) for models that do not fit one device.")
    save_every: int = Field(100, gt=0, description="Write a resumable checkpoint every N optimizer steps (and at the last step).")
    keep_checkpoints: int = Field(2, gt=0, description="Checkpoints kept on disk (the newest intact one is resumed).")
    seed: int = Field(0, description="Seed of the data order and of the RNG states.")

    @model_validator(mode="after")
    def one_budget(self):
        if self.tokens is not None and self.steps is not None:
            raise ValueError("give a budget in tokens or in steps, not both")
        if self.min_lr > self.lr:
            raise ValueError("min_lr must not exceed lr")
        return self

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up steps of a run of `total_steps`: as set, else the configured share of the run."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return round(self.warmup_fraction * total_steps)


class TeacherCorrectionConfig(Section):
    tokens: int = Field(0, ge=0, description="Tokens of LM-loss fine-tuning of the teacher on the distillation data before pruning (Minitron's teacher correction); 0 skips it.")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate of the teacher correction (the other training settings are distill's).")


class DistillConfig(TrainingConfig):
    """Distillation: the training loop plus the losses. Loss weights are relative (the loss is their weighted mean)."""

    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the logit KL loss (the loss is scaled by T^2).")
    logit_loss_weight: float = Field(1.0, ge=0, description="Weight of the forward KL(teacher || student) on logits, per token.")
    lm_loss_weight: float = Field(0.0, ge=0, description="Weight of the LM cross-entropy on the data.")
    intermediate_loss: Literal["none", "cosine", "mse"] = Field("none", description="Hidden-state loss between mapped teacher and student decoder-layer outputs (needs equal hidden sizes).")
    intermediate_loss_weight: float = Field(0.0, ge=0, description="Weight of the hidden-state loss (averaged over the mapped layers).")
    teacher_cache: str | None = Field(None, description="Directory of a teacher-logit cache: the teacher's top-k log-probabilities of the train rows, built once "
                                                        "(resumably) and reused by every student and epoch, so the teacher does not run while training; in a recipe a relative path lies in the run folder; none runs the teacher online.")
    teacher_cache_top_k: int = Field(64, gt=0, description="Log-probabilities kept per token in the teacher cache (its k most likely tokens; the rest of the mass is kept as one number).")
    teacher_cache_tail_samples: int = Field(32, ge=0, description="Tokens drawn per position from the teacher's distribution outside its top-k and kept in the cache, each "
                                                                 "standing for an equal share of the rest's mass: the loss is then an unbiased estimate of the full KL and "
                                                                 "its gradient; 0 keeps the rest as one bin (the KL of the coarsened distributions, a lower bound).")
    loss_chunk_tokens: int = Field(128, gt=0, description="Tokens per chunk of the logit losses: softmaxes and gradients over the vocabulary exist for this many tokens at a time, not the whole batch.")

    @model_validator(mode="after")
    def usable_losses(self):
        if self.logit_loss_weight + (self.intermediate_loss_weight if self.intermediate_loss != "none" else 0.0) <= 0:
            raise ValueError("distillation needs a positive logit_loss_weight or an intermediate loss with a positive weight")
        if (self.intermediate_loss == "none") != (self.intermediate_loss_weight == 0):
            raise ValueError("set intermediate_loss (cosine or mse) and a positive intermediate_loss_weight together")
        if self.teacher_cache is not None and self.intermediate_loss != "none":
            raise ValueError("the teacher cache holds logits only; the hidden-state loss needs the teacher online (drop teacher_cache or intermediate_loss)")
        return self

    def training(self) -> TrainingConfig:
        """The loop settings alone (what teacher correction shares with distillation)."""
        return TrainingConfig(**{name: getattr(self, name) for name in TrainingConfig.model_fields})


class QuantizeConfig(Section):
    format: Literal["none", "fp8", "int8_sq", "int4_awq"] = Field("none", description="ModelOpt quantization: fp8, int8_sq (SmoothQuant), int4_awq; none skips it in a recipe.")
    calibration_samples: int = Field(128, gt=0, description="Calibration sequences for quantization.")
    kv_cache: Literal["none", "fp8"] = Field("none", description="Also quantize the KV cache (fp8).")
    checkpoint_dtype: Dtype = Field("float32", description="dtype of the weights the quantization leaves unquantized, in the written checkpoint.")


class ExportConfig(Section):
    format: Literal["none", "hf", "trtllm", "onnx"] = Field("none", description="Export format: hf (unified HF checkpoint), trtllm (TensorRT-LLM checkpoint), onnx (CPU engine folder); none skips it in a recipe.")
    dtype: Dtype | None = Field(None, description="Exported weight dtype; none is bfloat16 for hf/trtllm and float32 for onnx.")
    tp: int = Field(1, gt=0, description="TensorRT-LLM tensor-parallel ranks.")
    pp: int = Field(1, gt=0, description="TensorRT-LLM pipeline-parallel stages.")

    def resolved_dtype(self) -> str:
        return self.dtype or ("float32" if self.format == "onnx" else "bfloat16")


class EngineConfig(Section):
    profile: str | None = Field("cpu-fp32", description="Engine profile: a shipped name (engines/) or a YAML path; none skips the engine build.")
    overrides: dict = Field(default_factory=dict, description="Profile fields to override, by dotted key (e.g. {max_batch_size: 2, kv_cache.dtype: auto}).")


class ServeConfig(Section):
    host: str = Field("127.0.0.1", description="Address Triton binds; 127.0.0.1 unless you mean to expose it (no authentication).")
    http_port: int | None = Field(None, ge=1, le=65535, description="HTTP port; none picks a free one.")
    grpc_port: int | None = Field(None, ge=1, le=65535, description="gRPC port; none picks a free one.")
    metrics_port: int | None = Field(None, ge=1, le=65535, description="Prometheus metrics port; none picks a free one.")
    instances: int = Field(1, gt=0, description="Model instances; each CPU instance loads its own engine.")
    max_batch_size: int = Field(8, gt=0, description="Largest batch Triton forms (capped by the engine's max_batch_size).")
    threads: int | None = Field(None, gt=0, description="CPU engine threads per instance; none uses the profile's cpu_threads, else cores / instances.")
    batching: Literal["inflight", "static"] = Field(
        "inflight", description="How a CPU engine batches concurrent requests: inflight (a request joins the running batch at the next step "
                                "and leaves it when it finishes or is cancelled) or static (onnxruntime-genai's Engine: a batch runs until "
                                "all its requests finish; later ones wait). TensorRT-LLM engines always batch in flight.")
    max_num_tokens: int | None = Field(None, gt=0, description="In-flight CPU engine: tokens per step, the decoding requests plus the new prompts "
                                                                "prefilled beside them (waiting prompts together while, padded to the longest, "
                                                                "they fit; a longer prompt in chunks); none: the profile's max_num_tokens, else "
                                                                "its max_input_len.")
    kv_cache_tokens: int | None = Field(None, gt=0, description="In-flight CPU engine: KV-cache budget in tokens over all running requests (each "
                                                                 "reserves prompt + max_tokens when it starts, later ones wait); none: max batch "
                                                                 "x max_seq_len. It must hold one request of max_input_len.")


class BenchConfig(Section):
    """Benchmark of the teacher against its students (`minitron bench`, and the bench stage of a recipe run)."""

    enabled: bool = Field(True, description="In a recipe run: benchmark the teacher against the students after their engines are built (CPU backends here; TensorRT-LLM engines on the GPU machine with `minitron bench --backend trtllm` or `--url`).")
    backend: Literal["torch", "cpu-engine", "triton", "trtllm"] = Field(
        "triton", description="What runs the models: torch (transformers generate, in-process, batched), cpu-engine (the CPU engine in-process), "
                              "triton (a Triton server, streaming gRPC), trtllm (TensorRT-LLM's LLM API on a GPU).")
    workload: str = Field("cpu-smoke", description="Workload: a shipped name (benchmarks/workloads/) or a YAML path.")
    workload_overrides: dict = Field(default_factory=dict, description="Workload fields to override, by name (e.g. {requests: 8, concurrency: [1, 2]}); flags --input-len, --requests, ... set them.")
    threads: int = Field(1, gt=0, description="CPU threads of each engine and of the bandwidth measurement (pinned for stable numbers).")
    max_error_rate: float = Field(0.0, ge=0, le=1, description="Share of a model's requests that may fail; above it the benchmark fails (exit 2) and writes nothing.")
    profiles: list[str] | None = Field(None, description="Engine profiles to project the models onto; none: every shipped GPU profile (in a recipe run: the recipe's engine profile).",
                                       json_schema_extra=flag("--profile"))


class SearchConfig(Section):
    """Architecture search under a budget: which uniform students are candidates, and how briefly each is distilled."""

    budget: str | None = Field(None, description="KIND=VALUE: params=4.5B or params=50% (total parameters), non_embedding=50%, memory=9GiB, speedup=1.8x or latency=20ms (the last three need a profile).")
    profile: str | None = Field(None, description="Engine profile the memory, speedup and latency budgets are measured on: projected for a GPU profile, measured on the CPU engine for a CPU one.")
    hidden_multiple: int = Field(64, gt=0, description="Candidate hidden sizes are multiples of this (and the teacher's own).")
    ffn_multiple: int = Field(128, gt=0, description="Candidate FFN sizes are multiples of this (and the teacher's own).")
    layer_step: int = Field(1, gt=0, description="Candidate layer counts step down from the teacher's by this.")
    min_fraction: float = Field(0.5, gt=0, le=1, description="No axis is searched below this share of the teacher's size.")
    search_heads: bool = Field(True, description="Search query and key-value heads too (whole GQA groups, equal heads per group); off keeps the teacher's.")
    tolerance: float = Field(0.01, ge=0, lt=1, description="A budget is met within this share (parameter counts are quoted rounded).")
    max_candidates: int = Field(6, gt=0, description="Candidates distilled, evenly spread over the survivors, besides the best width-only and depth-only ones.")
    tokens: int = Field(16384, gt=0, description="Distillation tokens per candidate (the same short budget for all).")
    depth_method: DepthMethod = Field("lm_loss", description="How candidates with fewer layers choose them (as prune.depth_method).")
    workload: str = Field("gpu-128-128", description="Workload whose prompt and answer lengths set the context of the speed and latency budgets (a shipped name or a YAML path).")
    threads: int = Field(1, gt=0, description="CPU threads of the CPU measurements (this CPU's bandwidth, the CPU engines' decode speed).")


# Section key -> model: how `toolchain.errors.setting("key.field")` finds a field's flag, and what
# the recipe's top-level sections are made of (students' `prune` and `distill` and the teacher's
# `correction` are sections too; `training` names the loop settings wherever they come from).
SECTIONS: dict[str, type[Section]] = {
    "compute": ComputeConfig,
    "data": DataConfig,
    "eval": EvalConfig,
    "lm_eval": LmEvalConfig,
    "importance": ImportanceConfig,
    "prune": PruneConfig,
    "training": TrainingConfig,
    "correction": TeacherCorrectionConfig,
    "distill": DistillConfig,
    "quantize": QuantizeConfig,
    "export": ExportConfig,
    "engine": EngineConfig,
    "serve": ServeConfig,
    "bench": BenchConfig,
    "search": SearchConfig,
}
