"""The TensorRT-LLM backend: GPU engines built by `trtllm-build`, served by the tensorrtllm backend of NVIDIA's Triton.

Build: ModelOpt quantization (calibrated on the data's calibration split) unless the model already is,
a TensorRT-LLM checkpoint for the profile's TP/PP, validated; then `build.sh` with the exact
`trtllm-build` command and `build_config.json` (build flags + runtime settings for Triton). When
`tensorrt_llm` imports and a GPU is present the command runs here and the engine folder is checked
(config.json with pretrained_config and build_config, rank{N}.engine). Elsewhere — every machine of
this project, see REFERENCE §3 — it stops after writing everything and the user runs build.sh inside
the docker/ image on a GPU machine; `finish_trtllm_build` then checks the engine and marks it built.

Serve: the inflight-batching layout of NVIDIA's tensorrtllm backend — `preprocessing` (python,
tokenizer) -> `tensorrt_llm` (backend tensorrtllm, in-flight batching) -> `postprocessing` (python,
detokenizer), tied by the `ensemble` — with parameters taken from the engine manifest and its profile.
It is written for NVIDIA's Triton TRT-LLM container (docker/); the engine and tokenizer paths are
the engine directory's absolute paths, so mount it at the same path in the container. The optional
`tensorrt_llm_bls` model is not written: the ensemble covers streaming and non-streaming requests.
The Triton server bundled with nvidia-pytriton has no tensorrtllm backend, so it is never started here.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from toolchain.backends.base import BuildOutcome, EngineBackend
from toolchain.errors import UserError
from toolchain.manifest import ENGINE_DIR

if TYPE_CHECKING:
    from toolchain.engine_profile import EngineProfile
    from toolchain.manifest import EngineManifest
    from toolchain.settings import DataConfig, ServeConfig

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
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
MODELOPT_QUANTIZATIONS = ("fp8", "int8_sq", "int4_awq")
QUANTIZATIONS = ("none", *MODELOPT_QUANTIZATIONS)


def onoff(flag: bool) -> str:
    return "enable" if flag else "disable"


def trtllm_build_command(profile: EngineProfile, checkpoint_dir: str = CHECKPOINT_DIR, engine_dir: str = ENGINE_DIR) -> list[str]:
    """The `trtllm-build` command line of a profile (paths relative to the engine directory)."""
    plugins, kv = profile.plugins, profile.kv_cache
    return [
        "trtllm-build", "--checkpoint_dir", checkpoint_dir, "--output_dir", engine_dir,
        "--max_batch_size", str(profile.max_batch_size), "--max_input_len", str(profile.max_input_len),
        "--max_seq_len", str(profile.max_seq_len), "--max_num_tokens", str(profile.max_num_tokens), "--max_beam_width", "1",
        "--kv_cache_type", kv.type, "--tokens_per_block", str(kv.tokens_per_block),
        "--gemm_plugin", plugins.gemm_plugin, "--gpt_attention_plugin", plugins.gpt_attention_plugin,
        "--context_fmha", onoff(plugins.context_fmha), "--use_paged_context_fmha", onoff(plugins.use_paged_context_fmha),
        "--use_fp8_context_fmha", onoff(plugins.use_fp8_context_fmha), "--remove_input_padding", onoff(plugins.remove_input_padding),
        "--multiple_profiles", onoff(plugins.multiple_profiles), "--workers", str(profile.tp * profile.pp),
    ]


def runtime_settings(profile: EngineProfile) -> dict:
    """What the server needs that is not baked into the engine (Triton tensorrt_llm model parameters)."""
    return {
        "max_batch_size": profile.max_batch_size,
        "kv_cache_free_gpu_mem_fraction": profile.kv_cache.free_gpu_memory_fraction,
        "enable_kv_cache_reuse": profile.kv_cache.enable_block_reuse,
        "enable_chunked_context": profile.plugins.use_paged_context_fmha,
        "batching_strategy": "inflight_fused_batching" if profile.kv_cache.type == "paged" else "v1",
        "world_size": profile.tp * profile.pp,
    }


def build_script(command: list[str]) -> str:
    return ("#!/usr/bin/env bash\n"
            "# Builds the TensorRT-LLM engine of this directory; run inside the docker/ image on a GPU machine.\n"
            "set -euo pipefail\n"
            'cd "$(dirname "$0")"\n'
            f"{shlex.join(command)}\n")


def build_unavailable_reason() -> str | None:
    """Why `trtllm-build` cannot run here, or None when it can."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "tensorrt_llm is not installed here (its wheels come only from NVIDIA's package index)"
    if shutil.which("trtllm-build") is None:
        return "the trtllm-build command is not on PATH"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def check_engine_dir(engine_dir: Path, world_size: int) -> None:
    """A TensorRT-LLM engine folder holds config.json {pretrained_config, build_config} and rank{N}.engine per rank."""
    config_path = engine_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"trtllm-build left no config.json in {engine_dir}; see its output above")
    config = json.loads(config_path.read_text())
    missing = [key for key in ("pretrained_config", "build_config") if key not in config]
    if missing:
        raise UserError(f"{config_path} lacks {', '.join(missing)}; it is not a TensorRT-LLM engine config")
    absent = [f"rank{rank}.engine" for rank in range(world_size) if not (engine_dir / f"rank{rank}.engine").is_file()]
    if absent:
        raise UserError(f"engine folder {engine_dir} lacks {', '.join(absent)} (world size {world_size})")


def finish_trtllm_build(engine_dir: str | Path) -> None:
    """After build.sh ran on a GPU machine: check the engine folder and record `built: true` in the manifest."""
    from toolchain.manifest import read_manifest, write_manifest

    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    if manifest.backend != TensorRTLLM.name:
        raise UserError(f"{engine_dir} holds a {manifest.backend} engine; only TensorRT-LLM engines are built by build.sh")
    check_engine_dir(engine_dir / manifest.model_dir, manifest.profile["tp"] * manifest.profile["pp"])
    fields = manifest.model_dump(mode="json")
    fields.update(built=True, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    fields.pop("libraries")  # re-read: the versions of the machine that built the engine
    fields.pop("platform")
    write_manifest(engine_dir, **fields)


def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    maps = "".join(f'      input_map {{ key: "{key}" value: "{value}" }}\n' for key, value in inputs.items())
    maps += "".join(f'      output_map {{ key: "{key}" value: "{value}" }}\n' for key, value in outputs.items())
    return f'    {{\n      model_name: "{model}"\n      model_version: -1\n{maps}    }}'


def ensemble_scheduling() -> str:
    steps = [
        step("preprocessing", {"QUERY": "text_input", "REQUEST_OUTPUT_LEN": "max_tokens", "END_ID": "end_id"},
             {"INPUT_ID": "_INPUT_ID", "REQUEST_INPUT_LEN": "_REQUEST_INPUT_LEN", "REQUEST_OUTPUT_LEN": "_REQUEST_OUTPUT_LEN",
              "OUT_END_ID": "_END_ID", "OUT_PAD_ID": "_PAD_ID"}),
        step("tensorrt_llm", {"input_ids": "_INPUT_ID", "input_lengths": "_REQUEST_INPUT_LEN", "request_output_len": "_REQUEST_OUTPUT_LEN",
                              "end_id": "_END_ID", "pad_id": "_PAD_ID", "streaming": "stream", "temperature": "temperature",
                              "runtime_top_k": "top_k", "runtime_top_p": "top_p", "seed": "seed"},
             {"output_ids": "_TOKENS_BATCH", "sequence_length": "_SEQUENCE_LENGTH"}),
        step("postprocessing", {"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"}, {"OUTPUT": "text_output"}),
    ]
    return "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"


class TensorRTLLM(EngineBackend):
    name = "tensorrt-llm"

    def profile_problems(self, profile: EngineProfile) -> list[str]:
        if profile.target not in GPU_TARGETS:
            return [f"unknown GPU target {profile.target!r} for tensorrt-llm; use one of {', '.join(GPU_TARGETS)} (or a CPU backend with target cpu)"]
        problems = []
        gpu = GPU_TARGETS[profile.target]
        plugins, kv = profile.plugins, profile.kv_cache
        if profile.quantization not in QUANTIZATIONS:
            problems.append(f"quantization {profile.quantization} is not a TensorRT-LLM format; use one of {', '.join(QUANTIZATIONS)}")
        uses_fp8 = profile.quantization == "fp8" or kv.dtype == "fp8" or plugins.use_fp8_context_fmha or plugins.gemm_plugin == "fp8"
        if uses_fp8 and not gpu["fp8"]:
            problems.append(f"FP8 on {profile.target} (compute capability {gpu['compute_capability']}): it has no FP8 tensor cores; use bfloat16, int8_sq or int4_awq")
        if kv.dtype == "fp8" and profile.quantization not in MODELOPT_QUANTIZATIONS:
            problems.append("kv_cache.dtype fp8 is calibrated together with the weights: set quantization to fp8, int8_sq or int4_awq, or kv_cache.dtype: auto")
        if profile.dtype == "float32":
            problems.append("dtype float32 on tensorrt-llm: its checkpoints are exported in float16 or bfloat16 (and its quantized kernels take 16-bit activations)")
        if profile.max_num_tokens is None:
            problems.append("max_num_tokens is required for tensorrt-llm (tokens in one engine step); e.g. max_batch_size * 256 or max_input_len")
        elif profile.max_num_tokens < profile.max_input_len and not plugins.use_paged_context_fmha:
            problems.append(f"max_num_tokens {profile.max_num_tokens} < max_input_len {profile.max_input_len} without paged context FMHA: a full prompt cannot be split into chunks; raise max_num_tokens or enable plugins.use_paged_context_fmha")
        if kv.type == "paged" and plugins.gpt_attention_plugin == "disable":
            problems.append("a paged KV cache needs the gpt_attention_plugin; enable it or use kv_cache.type: continuous")
        if (plugins.context_fmha or plugins.use_paged_context_fmha) and plugins.gpt_attention_plugin == "disable":
            problems.append("context FMHA runs inside the gpt_attention_plugin; enable the plugin or disable context_fmha")
        if plugins.use_paged_context_fmha and (kv.type != "paged" or not plugins.context_fmha):
            problems.append("use_paged_context_fmha needs context_fmha and a paged KV cache")
        if plugins.use_fp8_context_fmha and not (profile.quantization == "fp8" and kv.dtype == "fp8"):
            problems.append("use_fp8_context_fmha needs quantization: fp8 and kv_cache.dtype: fp8")
        if kv.enable_block_reuse and not plugins.use_paged_context_fmha:
            problems.append("KV block reuse needs plugins.use_paged_context_fmha; enable it or set kv_cache.enable_block_reuse: false")
        if kv.tokens_per_block & (kv.tokens_per_block - 1):
            problems.append(f"kv_cache.tokens_per_block {kv.tokens_per_block} is not a power of two")
        if plugins.gemm_plugin == "fp8" and profile.quantization != "fp8":
            problems.append("gemm_plugin fp8 needs quantization: fp8")
        return problems

    def check_model(self, profile: EngineProfile, model_dir: Path, config: dict, quantization: str) -> None:
        from toolchain.export import check_trtllm_export

        if quantization != "none" and quantization != profile.quantization:
            raise UserError(f"{model_dir} is already quantized as {quantization} but profile {profile.name} wants {profile.quantization}; "
                            "pass the unquantized model")
        check_trtllm_export(config, profile.tp, profile.pp, profile.quantization, profile.dtype)

    def quantizes(self, profile: EngineProfile, quantization: str) -> bool:
        return profile.quantization in MODELOPT_QUANTIZATIONS and quantization == "none"

    def plan(self, profile: EngineProfile, quantization: str) -> list[str]:
        steps = []
        if self.quantizes(profile, quantization):
            steps.append(f"quantize {profile.quantization} with ModelOpt ({profile.calibration_samples} calibration sequences, KV cache {profile.kv_cache.dtype})")
        steps.append(f"export a TensorRT-LLM checkpoint ({profile.dtype}, tp={profile.tp}, pp={profile.pp}) and validate it")
        steps.append(f"build: {self.build_command(profile)}")
        return steps

    def build_command(self, profile: EngineProfile) -> str:
        return shlex.join(trtllm_build_command(profile))

    def build(self, profile: EngineProfile, model_dir: Path, config: dict, quantization: str, directory: Path, data: DataConfig) -> BuildOutcome:
        """Quantize (unless already), export + validate the checkpoint, write build.sh; run it when TensorRT-LLM can."""
        from toolchain.export import export_trtllm_checkpoint, load_for_export

        model, _ = load_for_export(model_dir)
        if self.quantizes(profile, quantization):
            from toolchain.data import check_seq_len, prepare_data
            from toolchain.models import load_tokenizer
            from toolchain.quantize import calibration_rows, quantize_model

            check_seq_len(data.seq_len, model.config)
            rows = calibration_rows(prepare_data(data, load_tokenizer(model_dir)), profile.calibration_samples)
            log.info("quantizing to %s (kv cache %s) on %d calibration sequences", profile.quantization, profile.kv_cache.dtype, len(rows))
            model = quantize_model(model, profile.quantization, rows, "fp8" if profile.kv_cache.dtype == "fp8" else "none")
        export_trtllm_checkpoint(model, directory / CHECKPOINT_DIR, profile.dtype, profile.tp, profile.pp, config)
        del model
        command = trtllm_build_command(profile)
        (directory / "build.sh").write_text(build_script(command))
        (directory / "build.sh").chmod(0o755)
        (directory / "build_config.json").write_text(json.dumps({"trtllm_build": command, "runtime": runtime_settings(profile)}, indent=2) + "\n")
        fields = {"checkpoint_dir": CHECKPOINT_DIR, "build_command": shlex.join(command)}
        reason = build_unavailable_reason()
        if reason is not None:
            return BuildOutcome(False, f"checkpoint, build_config.json and build.sh written, engine NOT built: {reason}. On a GPU machine run "
                                       f"`bash <out>/build.sh` inside the docker/ image (docs/engines.md)", fields)
        result = subprocess.run(["bash", "build.sh"], cwd=directory, capture_output=True, text=True)
        log.debug("trtllm-build output:\n%s%s", result.stdout, result.stderr)
        if result.returncode != 0:
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"trtllm-build failed ({last[0]}); rerun {shlex.join(command)} for its full output")
        check_engine_dir(directory / ENGINE_DIR, profile.tp * profile.pp)
        return BuildOutcome(True, "engine built and checked", fields)

    def unavailable_reason(self) -> str | None:
        return ("TensorRT-LLM engines run on a GPU in the tensorrtllm backend of NVIDIA's Triton container, "
                "and the Triton server bundled with nvidia-pytriton has no such backend")

    def write_repository(self, engine_dir: Path, manifest: EngineManifest, repository: Path, model_name: str,
                         settings: ServeConfig) -> list[str]:
        """preprocessing -> tensorrt_llm -> postprocessing, and the ensemble that chains them (tensorrtllm backend layout)."""
        from toolchain.engine_profile import EngineProfile
        from toolchain.serve.repository import ENSEMBLE, ENSEMBLE_INPUTS, ENSEMBLE_OUTPUTS, TensorSpec, copy_model_code, model_config

        if model_name != ENSEMBLE:
            raise UserError(f"a TensorRT-LLM engine is served as model '{ENSEMBLE}' beside its preprocessing, tensorrt_llm and "
                            f"postprocessing models, one engine per repository; {model_name!r} is not possible")
        profile = EngineProfile.model_validate(manifest.profile)
        engine_dir = Path(engine_dir).resolve()
        batch, instances = min(settings.max_batch_size, manifest.max_batch_size), settings.instances
        tokenizer = {"tokenizer_dir": engine_dir / manifest.tokenizer_dir, "max_input_len": manifest.max_input_len,
                     "max_seq_len": manifest.max_seq_len}
        int_scalar = lambda name: TensorSpec(name, "TYPE_INT32")  # noqa: E731
        scalar_input = lambda name, data_type: TensorSpec(name, data_type, "[ 1 ]\n    reshape: { shape: [ ] }", optional=True)  # noqa: E731
        preprocessing_outputs = (TensorSpec("INPUT_ID", "TYPE_INT32", "[ -1 ]"), int_scalar("REQUEST_INPUT_LEN"),
                                 int_scalar("REQUEST_OUTPUT_LEN"), int_scalar("OUT_END_ID"), int_scalar("OUT_PAD_ID"))
        models = {
            "preprocessing": model_config("preprocessing", "python", batch, (
                TensorSpec("QUERY", "TYPE_STRING"), int_scalar("REQUEST_OUTPUT_LEN"),
                TensorSpec("END_ID", "TYPE_INT32", optional=True), TensorSpec("PAD_ID", "TYPE_INT32", optional=True),
            ), preprocessing_outputs, tokenizer, instances=instances),
            "tensorrt_llm": model_config("tensorrt_llm", "tensorrtllm", batch, (
                TensorSpec("input_ids", "TYPE_INT32", "[ -1 ]\n    allow_ragged_batch: true"),
                TensorSpec("input_lengths", "TYPE_INT32", "[ 1 ]\n    reshape: { shape: [ ] }"),
                TensorSpec("request_output_len", "TYPE_INT32", "[ 1 ]\n    reshape: { shape: [ ] }"),
                scalar_input("end_id", "TYPE_INT32"), scalar_input("pad_id", "TYPE_INT32"),
                TensorSpec("streaming", "TYPE_BOOL", "[ 1 ]", optional=True),
                scalar_input("temperature", "TYPE_FP32"), scalar_input("runtime_top_k", "TYPE_INT32"),
                scalar_input("runtime_top_p", "TYPE_FP32"), scalar_input("seed", "TYPE_UINT64"),
            ), (TensorSpec("output_ids", "TYPE_INT32", "[ -1, -1 ]"), TensorSpec("sequence_length", "TYPE_INT32", "[ -1 ]")), {
                "gpt_model_type": "inflight_fused_batching",
                "gpt_model_path": engine_dir / manifest.model_dir,
                "max_beam_width": 1,
                "batch_scheduler_policy": "guaranteed_no_evict",
                "kv_cache_free_gpu_mem_fraction": profile.kv_cache.free_gpu_memory_fraction,
                "enable_kv_cache_reuse": str(profile.kv_cache.enable_block_reuse).lower(),
                "enable_chunked_context": str(profile.plugins.use_paged_context_fmha).lower(),
                "exclude_input_in_output": "true",
                "decoding_mode": "top_k_top_p",
            }, instances=1, decoupled=True),
            "postprocessing": model_config("postprocessing", "python", batch, (
                TensorSpec("TOKENS_BATCH", "TYPE_INT32", "[ -1, -1 ]"), TensorSpec("SEQUENCE_LENGTH", "TYPE_INT32", "[ -1 ]"),
            ), (TensorSpec("OUTPUT", "TYPE_STRING", "[ -1 ]"),), tokenizer, instances=instances),
            ENSEMBLE: model_config(ENSEMBLE, "ensemble", batch, ENSEMBLE_INPUTS, ENSEMBLE_OUTPUTS, {}, dynamic_batching=False)
            + ensemble_scheduling(),
        }
        for name, config in models.items():
            (repository / name / "1").mkdir(parents=True, exist_ok=True)
            (repository / name / "config.pbtxt").write_text(config)
        copy_model_code("trtllm_preprocessing.py", repository / "preprocessing" / "1")
        copy_model_code("trtllm_postprocessing.py", repository / "postprocessing" / "1")
        return sorted(models)

    def repository_notes(self, engine_dir: Path, manifest: EngineManifest, repository: Path) -> list[str]:
        notes = [f"start it in NVIDIA's Triton TRT-LLM container with the engine directory mounted at {Path(engine_dir).resolve()}: "
                 f"tritonserver --model-repository={Path(repository).resolve()}"]
        if not manifest.built:
            notes.append("note: this engine directory holds the checkpoint and the trtllm-build command only; build the engine first")
        return notes
