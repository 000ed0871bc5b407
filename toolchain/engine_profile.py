"""Engine profiles: one YAML per deployment target, saying how `minitron build` turns a model into an engine.

A profile names the backend (TensorRT-LLM on a GPU, or onnxruntime-genai on a CPU), the precision
(dtype + quantization), the parallelism, the engine limits (batch, input, sequence, tokens per step),
the KV cache and the TensorRT-LLM plugins. The validators refuse profiles that contradict themselves
or their target (FP8 on an A100, TP on a CPU, a prompt longer than the sequence) before any work starts.

Shipped profiles live in `engines/` at the repository root; `load_profile` takes a name from there or
a path to any YAML file. Build-time fields become `trtllm-build` flags (see toolchain/build.py);
runtime fields (free memory fraction, block reuse) are recorded for the server.
"""

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from toolchain.errors import UserError

PROFILES_DIR = Path(__file__).resolve().parent.parent / "engines"

# GPUs a profile may target, and whether their tensor cores run FP8 (compute capability >= 8.9).
GPU_TARGETS = {
    "A100": {"fp8": False, "compute_capability": "8.0"},
    "A10G": {"fp8": False, "compute_capability": "8.6"},
    "L4": {"fp8": True, "compute_capability": "8.9"},
    "L40S": {"fp8": True, "compute_capability": "8.9"},
    "H100": {"fp8": True, "compute_capability": "9.0"},
    "H200": {"fp8": True, "compute_capability": "9.0"},
    "B200": {"fp8": True, "compute_capability": "10.0"},
}
CPU_TARGET = "cpu"

Backend = Literal["tensorrt-llm", "onnxruntime-genai"]
# ModelOpt formats run on TensorRT-LLM; int4_rtn is onnxruntime-genai's own round-to-nearest int4 (block 32).
Quantization = Literal["none", "fp8", "int8_sq", "int4_awq", "int4_rtn"]
MODELOPT_QUANTIZATIONS = ("fp8", "int8_sq", "int4_awq")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KVCacheSettings(Strict):
    type: Literal["paged", "continuous"] = Field("paged", description="Paged KV cache (needed for in-flight batching) or one contiguous buffer per sequence.")
    dtype: Literal["auto", "fp8"] = Field("auto", description="KV cache element type; auto follows the model dtype, fp8 is calibrated by ModelOpt (needs a ModelOpt quantization).")
    tokens_per_block: int = Field(64, gt=0, description="Tokens per paged KV block (a power of two).")
    free_gpu_memory_fraction: float = Field(0.9, gt=0, le=1, description="Share of the GPU memory left after loading that the runtime gives the KV cache.")
    enable_block_reuse: bool = Field(True, description="Reuse KV blocks of shared prompt prefixes across requests (runtime setting).")


class PluginSettings(Strict):
    gemm_plugin: Literal["auto", "float16", "bfloat16", "float32", "fp8", "disable"] = Field("auto", description="TensorRT-LLM GEMM plugin; auto picks it from the dtype.")
    gpt_attention_plugin: Literal["auto", "float16", "bfloat16", "float32", "disable"] = Field("auto", description="Fused attention plugin; paged KV cache and context FMHA need it.")
    context_fmha: bool = Field(True, description="Fused multi-head attention in the context (prefill) phase.")
    use_paged_context_fmha: bool = Field(True, description="Context FMHA over the paged KV cache; needed for chunked prefill and KV block reuse.")
    use_fp8_context_fmha: bool = Field(False, description="FP8 context FMHA (needs FP8 weights, an FP8 KV cache and an FP8 GPU).")
    remove_input_padding: bool = Field(True, description="Pack the tokens of a batch without padding (in-flight batching needs it).")
    multiple_profiles: bool = Field(True, description="Several TensorRT optimisation profiles; longer build, no runtime cost.")


class EngineProfile(Strict):
    name: str = Field(..., description="Profile name (the YAML file name without .yaml).")
    description: str = Field("", description="What the profile is for.")
    backend: Backend = Field(..., description="tensorrt-llm (GPU engine built with trtllm-build) or onnxruntime-genai (CPU engine).")
    target: str = Field(..., description=f"Target device: one of {', '.join(GPU_TARGETS)} or {CPU_TARGET}.")
    dtype: Literal["float16", "bfloat16", "float32"] = Field(..., description="Activation dtype and dtype of the weights left unquantized.")
    quantization: Quantization = Field("none", description="Weight/activation quantization: ModelOpt fp8, int8_sq, int4_awq (TensorRT-LLM) or int4_rtn (CPU).")
    calibration_samples: int = Field(128, gt=0, description="Calibration sequences for ModelOpt quantization.")
    tp: int = Field(1, gt=0, description="Tensor-parallel GPUs.")
    pp: int = Field(1, gt=0, description="Pipeline-parallel stages.")
    max_batch_size: int = Field(8, gt=0, description="Most sequences the engine runs at once.")
    max_input_len: int = Field(..., gt=0, description="Longest prompt, in tokens.")
    max_seq_len: int = Field(..., gt=0, description="Longest prompt + generated tokens of one sequence.")
    max_num_tokens: int | None = Field(None, gt=0, description="Most tokens (all sequences) in one engine step; TensorRT-LLM only.")
    kv_cache: KVCacheSettings = Field(default_factory=KVCacheSettings, description="KV cache settings (TensorRT-LLM).")
    plugins: PluginSettings = Field(default_factory=PluginSettings, description="TensorRT-LLM plugin settings.")
    cpu_threads: int | None = Field(None, gt=0, description="Intra-op threads of the CPU engine; None lets onnxruntime choose.")

    @property
    def is_gpu(self) -> bool:
        return self.backend == "tensorrt-llm"

    @model_validator(mode="after")
    def consistent(self):
        problems = self.contradictions()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def contradictions(self) -> list[str]:
        """Every reason this profile cannot be built as written; empty when it can."""
        problems = []
        if self.max_input_len > self.max_seq_len:
            problems.append(f"max_input_len {self.max_input_len} > max_seq_len {self.max_seq_len}: a prompt must leave room in the sequence; raise max_seq_len or lower max_input_len")
        if self.backend == "onnxruntime-genai":
            problems += self.cpu_contradictions()
        else:
            problems += self.gpu_contradictions()
        return problems

    def cpu_contradictions(self) -> list[str]:
        problems = []
        if self.target != CPU_TARGET:
            problems.append(f"backend onnxruntime-genai builds CPU engines, but target is {self.target!r}; set target: cpu")
        if self.tp > 1 or self.pp > 1:
            problems.append(f"tp={self.tp}, pp={self.pp} on a CPU engine: tensor/pipeline parallelism needs GPUs; set tp: 1 and pp: 1")
        if self.dtype != "float32":
            problems.append(f"dtype {self.dtype} on CPU: onnxruntime-genai's CPU builder takes float32 (int4 weights via quantization: int4_rtn)")
        if self.quantization not in ("none", "int4_rtn"):
            problems.append(f"quantization {self.quantization} is a ModelOpt format for TensorRT-LLM; a CPU engine takes none or int4_rtn")
        if self.kv_cache.dtype != "auto":
            problems.append("a quantized KV cache needs TensorRT-LLM; set kv_cache.dtype: auto on a CPU profile")
        return problems

    def gpu_contradictions(self) -> list[str]:
        problems = []
        if self.target not in GPU_TARGETS:
            return [f"unknown GPU target {self.target!r} for tensorrt-llm; use one of {', '.join(GPU_TARGETS)} (or backend onnxruntime-genai with target cpu)"]
        gpu = GPU_TARGETS[self.target]
        uses_fp8 = self.quantization == "fp8" or self.kv_cache.dtype == "fp8" or self.plugins.use_fp8_context_fmha or self.plugins.gemm_plugin == "fp8"
        if uses_fp8 and not gpu["fp8"]:
            problems.append(f"FP8 on {self.target} (compute capability {gpu['compute_capability']}): it has no FP8 tensor cores; use bfloat16, int8_sq or int4_awq")
        if self.kv_cache.dtype == "fp8" and self.quantization not in MODELOPT_QUANTIZATIONS:
            problems.append("kv_cache.dtype fp8 is calibrated together with the weights: set quantization to fp8, int8_sq or int4_awq, or kv_cache.dtype: auto")
        if self.quantization == "int4_rtn":
            problems.append("int4_rtn is the CPU engine's quantization; TensorRT-LLM takes int4_awq")
        if self.dtype == "float32":
            problems.append("dtype float32 on tensorrt-llm: its checkpoints are exported in float16 or bfloat16 (and its quantized kernels take 16-bit activations)")
        if self.max_num_tokens is None:
            problems.append("max_num_tokens is required for tensorrt-llm (tokens in one engine step); e.g. max_batch_size * 256 or max_input_len")
        elif self.max_num_tokens < self.max_input_len and not self.plugins.use_paged_context_fmha:
            problems.append(f"max_num_tokens {self.max_num_tokens} < max_input_len {self.max_input_len} without paged context FMHA: a full prompt cannot be split into chunks; raise max_num_tokens or enable plugins.use_paged_context_fmha")
        if self.kv_cache.type == "paged" and self.plugins.gpt_attention_plugin == "disable":
            problems.append("a paged KV cache needs the gpt_attention_plugin; enable it or use kv_cache.type: continuous")
        if (self.plugins.context_fmha or self.plugins.use_paged_context_fmha) and self.plugins.gpt_attention_plugin == "disable":
            problems.append("context FMHA runs inside the gpt_attention_plugin; enable the plugin or disable context_fmha")
        if self.plugins.use_paged_context_fmha and (self.kv_cache.type != "paged" or not self.plugins.context_fmha):
            problems.append("use_paged_context_fmha needs context_fmha and a paged KV cache")
        if self.plugins.use_fp8_context_fmha and not (self.quantization == "fp8" and self.kv_cache.dtype == "fp8"):
            problems.append("use_fp8_context_fmha needs quantization: fp8 and kv_cache.dtype: fp8")
        if self.kv_cache.enable_block_reuse and not self.plugins.use_paged_context_fmha:
            problems.append("KV block reuse needs plugins.use_paged_context_fmha; enable it or set kv_cache.enable_block_reuse: false")
        if self.kv_cache.tokens_per_block & (self.kv_cache.tokens_per_block - 1):
            problems.append(f"kv_cache.tokens_per_block {self.kv_cache.tokens_per_block} is not a power of two")
        if self.plugins.gemm_plugin == "fp8" and self.quantization != "fp8":
            problems.append("gemm_plugin fp8 needs quantization: fp8")
        return problems


def shipped_profile_names() -> list[str]:
    return sorted(path.stem for path in PROFILES_DIR.glob("*.yaml")) if PROFILES_DIR.is_dir() else []


def profile_path(profile: str | Path) -> Path:
    """A profile argument (a YAML path or a shipped name) as a file path."""
    path = Path(profile).expanduser()
    if path.is_file():
        return path
    if str(profile) in shipped_profile_names():
        return PROFILES_DIR / f"{profile}.yaml"
    if path.suffix in (".yaml", ".yml") or "/" in str(profile):
        raise UserError(f"engine profile file {path} does not exist; pass an existing YAML or a shipped name ({', '.join(shipped_profile_names())})")
    raise UserError(f"unknown engine profile {str(profile)!r}; use a YAML path or one of {', '.join(shipped_profile_names())}")


def load_profile(profile: str | Path) -> EngineProfile:
    """Load and validate an engine profile by shipped name or path; every problem is a one-line UserError."""
    path = profile_path(profile)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"engine profile {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"engine profile {path} must be a YAML mapping (name, backend, target, dtype, ...)")
    data.setdefault("name", path.stem)
    try:
        return EngineProfile.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        raise UserError(f"invalid engine profile {path}: {field + ': ' if field else ''}{message}") from None
