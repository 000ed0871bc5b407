"""Engine profiles: one YAML per deployment target, saying how `minitron build` turns a model into an engine.

A profile names the backend (TensorRT-LLM on a GPU, or onnxruntime-genai on a CPU), the precision
(dtype + quantization), the parallelism, the engine limits (batch, input, sequence, tokens per step),
the KV cache and the TensorRT-LLM plugins. The validators refuse profiles that contradict themselves
or their backend (FP8 on an A100, TP on a CPU, a prompt longer than the sequence) before any work
starts; what a backend accepts is the backend's own business (toolchain/backends/).

Shipped profiles live in `engines/` at the repository root, which ships in the package as
`toolchain/engines` (a link to it); `load_profile` takes a name from there or a path to any YAML
file, and dotted-key overrides of any field. Build-time fields become `trtllm-build` flags;
runtime fields (free memory fraction, block reuse) are recorded for the server.
"""

from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from toolchain.backends import BACKENDS
from toolchain.errors import UserError, setting, validation_message
from toolchain.named_yaml import apply_override, builtin_names, read_named_yaml

PROFILES_DIR = Path(__file__).parent / "engines"


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


GpuPrecision = Literal["float16", "bfloat16", "fp8", "int8"]


class DeviceSheet(Strict):
    """Data-sheet figures of a profile's target GPU (one GPU; dense Tensor Core peaks, no sparsity): what `minitron bench` projects onto."""

    memory_gb: float = Field(..., gt=0, description="GPU memory, GB (1e9 bytes).")
    memory_bandwidth_gb_s: float = Field(..., gt=0, description="Peak memory bandwidth, GB/s.")
    dense_tflops: dict[GpuPrecision, float] = Field(
        ..., min_length=1, description="Dense (no sparsity) Tensor Core peak per precision, TFLOPS (TOPS for int8).")
    source: str = Field(..., min_length=1, description="Where the figures come from (the data sheet).")

    @field_validator("dense_tflops")
    @classmethod
    def positive_peaks(cls, peaks: dict) -> dict:
        if any(value <= 0 for value in peaks.values()):
            raise ValueError(f"every peak must be positive, got {peaks}")
        return peaks


class EngineProfile(Strict):
    name: str = Field(..., description="Profile name (the YAML file name without .yaml).")
    description: str = Field("", description="What the profile is for.")
    backend: str = Field(..., description="tensorrt-llm (GPU engine built with trtllm-build) or onnxruntime-genai (CPU engine).")
    target: str = Field(..., description="Target device: a GPU model for tensorrt-llm (A100, A10G, L4, L40S, H100, H200, B200) or cpu.")
    dtype: Literal["float16", "bfloat16", "float32"] = Field(..., description="Activation dtype and dtype of the weights left unquantized.")
    quantization: str = Field("none", description="Weight/activation quantization: ModelOpt fp8, int8_sq, int4_awq (TensorRT-LLM) or int4_rtn (CPU).")
    calibration_samples: int = Field(128, gt=0, description="Calibration sequences for ModelOpt quantization.")
    tp: int = Field(1, gt=0, description="Tensor-parallel GPUs.")
    pp: int = Field(1, gt=0, description="Pipeline-parallel stages.")
    max_batch_size: int = Field(8, gt=0, description="Most sequences the engine runs at once.")
    max_input_len: int = Field(..., gt=0, description="Longest prompt, in tokens.")
    max_seq_len: int = Field(..., gt=0, description="Longest prompt + generated tokens of one sequence.")
    max_num_tokens: int | None = Field(None, gt=0, description="Most tokens (all sequences) in one engine step: TensorRT-LLM, and the in-flight CPU engine (serve.max_num_tokens overrides it there).")
    kv_cache: KVCacheSettings = Field(default_factory=KVCacheSettings, description="KV cache settings (TensorRT-LLM).")
    plugins: PluginSettings = Field(default_factory=PluginSettings, description="TensorRT-LLM plugin settings.")
    cpu_threads: int | None = Field(None, gt=0, description="Intra-op threads of the CPU engine; None lets onnxruntime choose.")
    device: DeviceSheet | None = Field(None, description="Data-sheet figures of the target GPU, for projections; required for GPU targets, "
                                                         "absent for cpu (the benchmark measures the machine it runs on).")

    @field_validator("backend")
    @classmethod
    def known_backend(cls, backend: str) -> str:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        return backend

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
        return problems + self.device_problems() + BACKENDS[self.backend].profile_problems(self)

    def device_problems(self) -> list[str]:
        """A GPU target needs its data-sheet figures, with a peak for the precision the profile computes in."""
        from toolchain.bench.bound import QUANTIZED_LINEAR_BYTES, precision_of

        if self.target == "cpu":
            return ["device: a cpu profile takes no data-sheet figures (the benchmark measures the CPU it runs on); remove device"] if self.device else []
        if self.device is None:
            return [f"device is required for a {self.target} profile: memory_gb, memory_bandwidth_gb_s, dense_tflops and source from its data sheet"]
        if self.quantization != "none" and self.quantization not in QUANTIZED_LINEAR_BYTES:
            return []  # the backend names the unknown quantization
        compute = precision_of(self.dtype, self.quantization, self.kv_cache.dtype).compute
        if compute in get_args(GpuPrecision) and compute not in self.device.dense_tflops:
            return [f"device.dense_tflops lists no {compute} peak, the precision this profile computes in ({self.quantization}, {self.dtype}); add it"]
        return []


def shipped_profile_names() -> list[str]:
    return builtin_names(PROFILES_DIR)


def load_profile(profile: str | Path, overrides: dict | None = None) -> EngineProfile:
    """Load and validate an engine profile by shipped name or path, with dotted-key `overrides` of its fields applied.

    E.g. overrides {"max_batch_size": 2, "kv_cache.dtype": "auto"}; every problem is a one-line UserError naming the field.
    """
    data, name = read_named_yaml(profile, PROFILES_DIR, "engine profile", "name, backend, target, dtype, ...")
    data.setdefault("name", name)
    for key, value in (overrides or {}).items():
        apply_override(data, key, value)
    try:
        return EngineProfile.model_validate(data)
    except ValidationError as exc:
        field, message = validation_message(exc)
        overridden = field and field in (overrides or {})
        shown = setting(f"profile.{field}") if overridden else field  # an override is named as the user gave it (flag or recipe field)
        given = ", ".join(f"{setting('profile.' + key)}={value}" for key, value in (overrides or {}).items())
        changed = f" with {given}" if given and not overridden else ""
        raise UserError(f"invalid engine profile {profile}{changed}: {shown + ': ' if shown else ''}{message}") from None
