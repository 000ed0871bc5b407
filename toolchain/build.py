"""`minitron build`: quantize -> export -> build an engine, as an engine profile (toolchain/engine_profile.py) says.

TensorRT-LLM profiles: ModelOpt quantization (calibrated on the data's calibration split) and a
TensorRT-LLM checkpoint for the profile's TP/PP, validated; then `build.sh` with the exact
`trtllm-build` command and `build_config.json` (build flags + runtime settings for Triton). When
`tensorrt_llm` imports and a GPU is present the command runs here and the engine folder is checked
(config.json with pretrained_config and build_config, rank{N}.engine). Elsewhere — every machine of
this project, see REFERENCE §3 — it stops after writing everything and the user runs build.sh inside
the docker/ image on a GPU machine.

CPU profiles: onnxruntime-genai's model builder (toolchain.cpu_engine) and a short greedy generation
as a smoke check.

Engine directory (toolchain/manifest.py): manifest.json (written last), tokenizer/, engine/ (the
runnable engine), and for TensorRT-LLM checkpoint/, build.sh, build_config.json.
"""

import importlib.util
import json
import logging
import shlex
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from toolchain.cli_args import add_data_arguments
from toolchain.data import check_seq_len, prepare_data
from toolchain.engine_profile import MODELOPT_QUANTIZATIONS, EngineProfile, load_profile
from toolchain.errors import UserError
from toolchain.export import check_trtllm_export, export_trtllm_checkpoint, load_for_export
from toolchain.manifest import write_manifest
from toolchain.models import load_tokenizer, model_fingerprint, read_config, resolve_model_dir
from toolchain.paths import atomic_output_dir
from toolchain.quantize import calibration_rows, is_quantized_checkpoint, quantize_model, quantized_format

log = logging.getLogger(__name__)

ENGINE_DIR = "engine"
CHECKPOINT_DIR = "checkpoint"
TOKENIZER_DIR = "tokenizer"
SMOKE_PROMPT = "The"
SMOKE_TOKENS = 8


@dataclass
class BuildResult:
    profile: str
    backend: str
    model: str
    out: str
    built: bool
    dry_run: bool
    command: str | None
    message: str
    seconds: float
    smoke_text: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


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


def trtllm_unavailable_reason() -> str | None:
    """Why `trtllm-build` cannot run here, or None when it can."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "tensorrt_llm is not installed here (its wheels come only from NVIDIA's package index)"
    if shutil.which("trtllm-build") is None:
        return "the trtllm-build command is not on PATH"
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
    from toolchain.manifest import read_manifest

    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    if manifest.backend != "tensorrt-llm":
        raise UserError(f"{engine_dir} holds a {manifest.backend} engine; only TensorRT-LLM engines are built by build.sh")
    check_engine_dir(engine_dir / manifest.model_dir, manifest.profile["tp"] * manifest.profile["pp"])
    fields = manifest.model_dump(mode="json")
    fields.update(built=True, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    fields.pop("libraries")  # re-read: the versions of the machine that built the engine
    fields.pop("platform")
    write_manifest(engine_dir, **fields)


def check_build_inputs(profile: EngineProfile, model_dir: Path, config: dict) -> str:
    """Refuse a profile/model pair that cannot build, before any work; returns the model's quantization."""
    limit = config.get("max_position_embeddings")
    if limit is not None and profile.max_seq_len > limit:
        raise UserError(f"profile {profile.name} has max_seq_len {profile.max_seq_len} but the model's max_position_embeddings is {limit}; "
                        f"lower max_seq_len in a copy of the profile")
    quantization = quantized_format(model_dir) if is_quantized_checkpoint(model_dir) else "none"
    if not profile.is_gpu:
        if quantization != "none":
            raise UserError(f"{model_dir} is ModelOpt-quantized ({quantization}); a CPU engine is built from the unquantized model")
        from toolchain.cpu_engine import check_builder_can_read

        check_builder_can_read(config, model_dir)
        return quantization
    if quantization != "none" and quantization != profile.quantization:
        raise UserError(f"{model_dir} is already quantized as {quantization} but profile {profile.name} wants {profile.quantization}; "
                        "pass the unquantized model")
    check_trtllm_export(config, profile.tp, profile.pp, profile.quantization, profile.dtype)
    return quantization


def build_trtllm(profile: EngineProfile, model_dir: Path, config: dict, quantization: str, tmp: Path, data: str, seq_len: int) -> tuple[bool, str]:
    """Quantize (unless already), export + validate the checkpoint, write build.sh; run it when TensorRT-LLM can."""
    model, _ = load_for_export(model_dir)
    if profile.quantization in MODELOPT_QUANTIZATIONS and quantization == "none":
        check_seq_len(seq_len, model.config)
        tokenizer = load_tokenizer(model_dir)
        rows = calibration_rows(prepare_data(data, tokenizer, seq_len), profile.calibration_samples)
        log.info("quantizing to %s (kv cache %s) on %d calibration sequences", profile.quantization, profile.kv_cache.dtype, len(rows))
        kv_cache = "fp8" if profile.kv_cache.dtype == "fp8" else "none"
        model = quantize_model(model, profile.quantization, rows, kv_cache)
    export_trtllm_checkpoint(model, tmp / CHECKPOINT_DIR, profile.dtype, profile.tp, profile.pp, config)
    del model
    command = trtllm_build_command(profile)
    (tmp / "build.sh").write_text(build_script(command))
    (tmp / "build.sh").chmod(0o755)
    (tmp / "build_config.json").write_text(json.dumps({"trtllm_build": command, "runtime": runtime_settings(profile)}, indent=2) + "\n")
    reason = trtllm_unavailable_reason()
    if reason is not None:
        return False, (f"checkpoint, build_config.json and build.sh written, engine NOT built: {reason}. On a GPU machine run "
                       f"`bash <out>/build.sh` inside the docker/ image (docs/engines.md)")
    result = subprocess.run(["bash", "build.sh"], cwd=tmp, capture_output=True, text=True)
    log.debug("trtllm-build output:\n%s%s", result.stdout, result.stderr)
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"trtllm-build failed ({last[0]}); rerun {shlex.join(command)} for its full output")
    check_engine_dir(tmp / ENGINE_DIR, profile.tp * profile.pp)
    return True, "engine built and checked"


def build_cpu(profile: EngineProfile, model_dir: Path, tmp: Path) -> str:
    """Build the onnxruntime-genai engine and generate a few greedy tokens from it; returns the generated text."""
    from toolchain.cpu_engine import CpuEngine, build_cpu_engine

    build_cpu_engine(model_dir, tmp / ENGINE_DIR, "int4" if profile.quantization == "int4_rtn" else "fp32")
    with CpuEngine(tmp / ENGINE_DIR, threads=profile.cpu_threads, max_batch_size=1) as engine:
        tokens = list(engine.generate(SMOKE_PROMPT, max_new_tokens=SMOKE_TOKENS))
        if not tokens:
            raise UserError(f"smoke check failed: the engine generated no token after {SMOKE_PROMPT!r} (it stopped at once)")
        if any(not 0 <= token < engine.limits.vocab_size for token in tokens):
            raise UserError(f"smoke check failed: the engine generated token ids outside its vocabulary: {tokens}")
        return engine.decode(tokens)


def describe_plan(profile: EngineProfile, model_dir: Path, quantization: str) -> str:
    steps = []
    if profile.is_gpu:
        if profile.quantization in MODELOPT_QUANTIZATIONS and quantization == "none":
            steps.append(f"quantize {profile.quantization} with ModelOpt ({profile.calibration_samples} calibration sequences, KV cache {profile.kv_cache.dtype})")
        steps.append(f"export a TensorRT-LLM checkpoint ({profile.dtype}, tp={profile.tp}, pp={profile.pp}) and validate it")
        steps.append(f"build: {shlex.join(trtllm_build_command(profile))}")
    else:
        precision = "int4" if profile.quantization == "int4_rtn" else "fp32"
        steps.append(f"build the onnxruntime-genai CPU engine ({precision}) and generate {SMOKE_TOKENS} tokens as a smoke check")
    return f"profile {profile.name} ({profile.backend}, {profile.target}) on {model_dir}:\n" + "\n".join(f"  {i}. {step}" for i, step in enumerate(steps, 1))


def build(
    profile: str | Path | EngineProfile,
    model: str,
    out: str | Path,
    data: str = "builtin:python-docs",
    seq_len: int = 256,
    dry_run: bool = False,
    overwrite: bool = False,
) -> BuildResult:
    """Build the engine `profile` describes from `model` into the engine directory `out`.

    `data` supplies the calibration split for ModelOpt quantization. `dry_run` checks the profile
    against the model and returns the plan without writing anything.
    """
    started = time.perf_counter()
    profile = profile if isinstance(profile, EngineProfile) else load_profile(profile)
    model_dir = resolve_model_dir(model)
    config = read_config(model_dir)
    quantization = check_build_inputs(profile, model_dir, config)
    out = Path(out)
    plan = describe_plan(profile, model_dir, quantization)
    command = shlex.join(trtllm_build_command(profile)) if profile.is_gpu else None
    if dry_run:
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise UserError(f"output directory {out} exists and is not empty; choose another --out or pass --overwrite")
        return BuildResult(profile=profile.name, backend=profile.backend, model=str(model), out=str(out), built=False, dry_run=True,
                           command=command, message="dry run, nothing written:\n" + plan, seconds=time.perf_counter() - started)
    smoke_text = None
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        if profile.is_gpu:
            built, message = build_trtllm(profile, model_dir, config, quantization, tmp, data, seq_len)
        else:
            smoke_text = build_cpu(profile, model_dir, tmp)
            built, message = True, f"CPU engine built; smoke generation {SMOKE_PROMPT!r} -> {smoke_text!r}"
        load_tokenizer(model_dir).save_pretrained(tmp / TOKENIZER_DIR)
        seconds = time.perf_counter() - started
        extras = {"checkpoint_dir": CHECKPOINT_DIR, "build_command": command} if profile.is_gpu else {"smoke_text": smoke_text}
        write_manifest(tmp, backend=profile.backend, profile_name=profile.name, profile=profile.model_dump(mode="json"),
                       source_model=str(model), source_fingerprint=model_fingerprint(model_dir), model_dir=ENGINE_DIR,
                       tokenizer_dir=TOKENIZER_DIR, built=built, max_batch_size=profile.max_batch_size,
                       max_input_len=profile.max_input_len, max_seq_len=profile.max_seq_len, seconds=seconds, **extras)
    return BuildResult(profile=profile.name, backend=profile.backend, model=str(model), out=str(out), built=built, dry_run=False,
                       command=command, message=message, seconds=seconds, smoke_text=smoke_text)


def configure_parser(parser) -> None:
    parser.add_argument("--profile", required=True, help="engine profile: a name in engines/ (e.g. h100-fp8, cpu-fp32) or a YAML path")
    parser.add_argument("--model", required=True, help="model: a local Hugging Face directory, a built-in name, or a `minitron quantize` output")
    parser.add_argument("--out", required=True, help="engine directory to write (must not exist or be empty)")
    add_data_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="check the profile against the model and print the plan; write nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--json", action="store_true", help="print JSON")


def command(args) -> int:
    result = build(args.profile, args.model, args.out, data=args.data, seq_len=args.seq_len, dry_run=args.dry_run, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif result.dry_run:
        print(result.message)
    else:
        print(f"{result.profile} ({result.backend}) -> {result.out} in {result.seconds:.0f} s: {result.message.replace('<out>', result.out)}")
        if result.command and not result.built:
            print(f"  build command (run in {result.out}): {result.command}")
    return 0
