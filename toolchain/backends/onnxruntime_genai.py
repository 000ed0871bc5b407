"""The onnxruntime-genai backend: CPU engines built and served on this machine.

Build: onnxruntime-genai's model builder (toolchain.cpu_engine) in float32 or int4 round-to-nearest,
then a short greedy generation as a smoke check. Serve: one decoupled python-backend model that runs
the CpuEngine (toolchain/serve/cpu_model.py) behind the TensorRT-LLM ensemble's interface, in the
Triton server bundled with nvidia-pytriton.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from toolchain.backends.base import BuildOutcome, EngineBackend
from toolchain.errors import UserError, setting
from toolchain.manifest import ENGINE_DIR

if TYPE_CHECKING:
    from toolchain.engine_profile import EngineProfile
    from toolchain.manifest import EngineManifest
    from toolchain.settings import DataConfig, ServeConfig

CPU_TARGET = "cpu"
QUANTIZATIONS = ("none", "int4_rtn")
SMOKE_PROMPT = "The"
SMOKE_TOKENS = 8


def precision(profile: EngineProfile) -> str:
    return "int4" if profile.quantization == "int4_rtn" else "fp32"


def inflight_max_num_tokens(serve: ServeConfig, manifest: EngineManifest) -> int:
    """Tokens per in-flight engine step: serve's setting, else the profile's max_num_tokens, else a whole prompt (max_input_len)."""
    return serve.max_num_tokens or manifest.profile.get("max_num_tokens") or manifest.max_input_len


class OnnxRuntimeGenAI(EngineBackend):
    name = "onnxruntime-genai"

    def profile_problems(self, profile: EngineProfile) -> list[str]:
        problems = []
        if profile.target != CPU_TARGET:
            problems.append(f"backend onnxruntime-genai builds CPU engines, but target is {profile.target!r}; set target: cpu")
        if profile.tp > 1 or profile.pp > 1:
            problems.append(f"tp={profile.tp}, pp={profile.pp} on a CPU engine: tensor/pipeline parallelism needs GPUs; set tp: 1 and pp: 1")
        if profile.dtype != "float32":
            problems.append(f"dtype {profile.dtype} on CPU: onnxruntime-genai's CPU builder takes float32 (int4 weights via quantization: int4_rtn)")
        if profile.quantization not in QUANTIZATIONS:
            problems.append(f"quantization {profile.quantization} is not an onnxruntime-genai format; a CPU engine takes {' or '.join(QUANTIZATIONS)}")
        if profile.kv_cache.dtype != "auto":
            problems.append("a quantized KV cache needs TensorRT-LLM; set kv_cache.dtype: auto on a CPU profile")
        return problems

    def check_model(self, profile: EngineProfile, model_dir: Path, config: dict, quantization: str) -> None:
        from toolchain.cpu_engine import check_builder_can_read

        if quantization != "none":
            raise UserError(f"{model_dir} is ModelOpt-quantized ({quantization}); a CPU engine is built from the unquantized model")
        check_builder_can_read(config, model_dir)

    def plan(self, profile: EngineProfile, quantization: str) -> list[str]:
        return [f"build the onnxruntime-genai CPU engine ({precision(profile)}) and generate {SMOKE_TOKENS} tokens as a smoke check"]

    def build(self, profile: EngineProfile, model_dir: Path, config: dict, quantization: str, directory: Path, data: DataConfig) -> BuildOutcome:
        """Build the engine and generate a few greedy tokens from it: a build that cannot generate is refused."""
        from toolchain.cpu_engine import CpuEngine, build_cpu_engine

        build_cpu_engine(model_dir, directory / ENGINE_DIR, precision(profile))
        with CpuEngine(directory / ENGINE_DIR, threads=profile.cpu_threads, max_batch_size=1) as engine:
            tokens = list(engine.generate(SMOKE_PROMPT, max_new_tokens=SMOKE_TOKENS))
            if not tokens:
                raise UserError(f"smoke check failed: the engine generated no token after {SMOKE_PROMPT!r} (it stopped at once)")
            if any(not 0 <= token < engine.limits.vocab_size for token in tokens):
                raise UserError(f"smoke check failed: the engine generated token ids outside its vocabulary: {tokens}")
            text = engine.decode(tokens)
        return BuildOutcome(True, f"CPU engine built; smoke generation {SMOKE_PROMPT!r} -> {text!r}", smoke_text=text)

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("onnxruntime_genai") is None:
            return "onnxruntime-genai is not installed; install it with `pip install 'minitron-toolchain[cpu-engine]'`"
        return None

    def write_repository(self, engine_dir: Path, manifest: EngineManifest, repository: Path, model_name: str,
                         settings: ServeConfig) -> list[str]:
        """One decoupled python model that runs the CpuEngine, batching as `settings.batching` says, `threads` intra-op threads per instance.

        The engine's batch is the profile's max_batch_size, lowered by serve's; in-flight budgets come from serve,
        else the profile (max_num_tokens), else the engine's limits.
        """
        from toolchain.serve.repository import ENSEMBLE_INPUTS, ENSEMBLE_OUTPUTS, copy_model_code, model_config

        engine_dir = Path(engine_dir).resolve()
        batch = min(settings.max_batch_size, manifest.max_batch_size)
        kv_cache_tokens = settings.kv_cache_tokens or batch * manifest.max_seq_len
        if settings.batching == "inflight" and kv_cache_tokens < manifest.max_input_len + 1:
            raise UserError(f"{setting('serve.kv_cache_tokens')} {kv_cache_tokens} cannot hold one request of the engine's "
                            f"max_input_len {manifest.max_input_len} plus one new token; use at least {manifest.max_input_len + 1}")
        parameters = {
            "model_dir": engine_dir / manifest.model_dir,
            "tokenizer_dir": engine_dir / manifest.tokenizer_dir,
            "max_input_len": manifest.max_input_len,
            "max_seq_len": manifest.max_seq_len,
            "threads": settings.threads or manifest.profile.get("cpu_threads") or max(1, (os.cpu_count() or 1) // settings.instances),
            "engine_max_batch_size": batch,
            "batching": settings.batching,
            "max_num_tokens": inflight_max_num_tokens(settings, manifest),
            "kv_cache_tokens": kv_cache_tokens,
        }
        copy_model_code("cpu_model.py", repository / model_name / "1")
        (repository / model_name / "config.pbtxt").write_text(model_config(model_name, "python", settings.max_batch_size, ENSEMBLE_INPUTS,
                                                                           ENSEMBLE_OUTPUTS, parameters, instances=settings.instances,
                                                                           decoupled=True))
        return [model_name]
