"""`minitron build`: turn a model into an engine directory, as an engine profile (toolchain/engine_profile.py) says.

What every engine shares lives here: the profile's limits fitted to the model, the checks before any
work, the plan (`--dry-run`), the atomic engine directory with the tokenizer and the manifest (written
last). What differs is the profile's backend's (toolchain/backends/): TensorRT-LLM profiles quantize,
export and validate a checkpoint and stop at the exact `trtllm-build` command where TensorRT-LLM
cannot run (every machine of this project, REFERENCE §3); CPU profiles build the onnxruntime-genai
engine here and check that it generates.

Engine directory (toolchain/manifest.py): manifest.json (written last), tokenizer/, engine/ (the
runnable engine), and what the backend keeps beside it (TensorRT-LLM: checkpoint/, build.sh,
build_config.json).
"""

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from toolchain.backends import EngineBackend, engine_backend
from toolchain.engine_profile import EngineProfile, load_profile
from toolchain.errors import UserError
from toolchain.manifest import ENGINE_DIR, TOKENIZER_DIR, write_manifest
from toolchain.models import model_fingerprint, read_config, resolve_model_dir, save_tokenizer
from toolchain.paths import atomic_output_dir, check_output_location
from toolchain.quantize import is_quantized_checkpoint, quantized_format
from toolchain.settings import DataConfig

log = logging.getLogger(__name__)


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


def fit_to_model(profile: EngineProfile, config: dict) -> tuple[EngineProfile, dict[str, int] | None]:
    """Lower max_seq_len to the model's max_position_embeddings, max_input_len keeping its share of it.

    Returns the profile to build and, when its limits were lowered, the profile's own values.
    """
    limit = config.get("max_position_embeddings")
    if limit is None or profile.max_seq_len <= limit:
        return profile, None
    own = {"max_seq_len": profile.max_seq_len, "max_input_len": profile.max_input_len}
    max_input_len = max(1, profile.max_input_len * limit // profile.max_seq_len)
    log.info("profile %s: max_seq_len %d -> %d (the model's max_position_embeddings) and max_input_len %d -> %d (same share)",
             profile.name, profile.max_seq_len, limit, profile.max_input_len, max_input_len)
    return profile.model_copy(update={"max_seq_len": limit, "max_input_len": max_input_len}), own


def check_build_inputs(profile: EngineProfile, backend: EngineBackend, model_dir: Path, config: dict) -> str:
    """Refuse a profile/model pair that cannot build, before any work; returns the model's quantization."""
    quantization = quantized_format(model_dir) if is_quantized_checkpoint(model_dir) else "none"
    backend.check_model(profile, model_dir, config, quantization)
    return quantization


def describe_plan(profile: EngineProfile, backend: EngineBackend, model_dir: Path, quantization: str, own_limits: dict | None) -> str:
    steps = backend.plan(profile, quantization)
    if own_limits:
        steps.insert(0, f"limits fitted to the model: max_seq_len {own_limits['max_seq_len']} -> {profile.max_seq_len}, "
                        f"max_input_len {own_limits['max_input_len']} -> {profile.max_input_len}")
    return f"profile {profile.name} ({profile.backend}, {profile.target}) on {model_dir}:\n" + "\n".join(f"  {i}. {step}" for i, step in enumerate(steps, 1))


def build(profile: EngineProfile, model: str, out: str | Path, data: DataConfig, dry_run: bool = False, overwrite: bool = False) -> BuildResult:
    """Build the engine `profile` describes (`load_profile`, with any overrides applied) from `model` into the engine directory `out`.

    `data` supplies the calibration split for ModelOpt quantization. `dry_run` checks the profile
    against the model and returns the plan without writing anything.
    """
    started = time.perf_counter()
    out = Path(out)
    check_output_location(out, "--out", overwrite=overwrite)
    model_dir = resolve_model_dir(model)
    config = read_config(model_dir)
    profile, own_limits = fit_to_model(profile, config)
    backend = engine_backend(profile.backend)
    quantization = check_build_inputs(profile, backend, model_dir, config)
    command = backend.build_command(profile)
    if dry_run:
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise UserError(f"output directory {out} exists and is not empty; choose another --out or pass --overwrite")
        plan = describe_plan(profile, backend, model_dir, quantization, own_limits)
        return BuildResult(profile=profile.name, backend=profile.backend, model=str(model), out=str(out), built=False, dry_run=True,
                           command=command, message="dry run, nothing written:\n" + plan, seconds=time.perf_counter() - started)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        outcome = backend.build(profile, model_dir, config, quantization, tmp, data)
        save_tokenizer(model_dir, tmp / TOKENIZER_DIR)
        seconds = time.perf_counter() - started
        write_manifest(tmp, backend=profile.backend, profile_name=profile.name, profile=profile.model_dump(mode="json"),
                       profile_limits=own_limits, source_model=str(model), source_fingerprint=model_fingerprint(model_dir),
                       model_dir=ENGINE_DIR, tokenizer_dir=TOKENIZER_DIR, built=outcome.built, max_batch_size=profile.max_batch_size,
                       max_input_len=profile.max_input_len, max_seq_len=profile.max_seq_len, smoke_text=outcome.smoke_text,
                       seconds=seconds, **outcome.manifest_fields)
    return BuildResult(profile=profile.name, backend=profile.backend, model=str(model), out=str(out), built=outcome.built, dry_run=False,
                       command=command, message=outcome.message, seconds=seconds, smoke_text=outcome.smoke_text)


def configure_parser(parser) -> None:
    from toolchain.cli_args import add_output_flags, add_recipe_source, add_section_flags
    from toolchain.engine_profile import EngineProfile

    parser.add_argument("--profile", required=True, help="engine profile: a name in engines/ (e.g. h100-fp8, cpu-fp32) or a YAML path")
    parser.add_argument("--model", required=True, help="model: a local Hugging Face directory, a built-in name, or a `minitron quantize` output")
    add_output_flags(parser, "engine directory to write")
    parser.add_argument("--dry-run", action="store_true", help="check the profile against the model and print the plan; write nothing")
    add_recipe_source(parser)
    add_section_flags(parser, "data")
    add_section_flags(parser, "profile", EngineProfile, title="profile fields (override the profile's values)", exclude=("name", "description"))


def command(args) -> int:
    from toolchain.cli_args import flat_flags, sections_from_args

    (data,) = sections_from_args(args, "data")
    profile = load_profile(args.profile, flat_flags(args, "profile"))
    result = build(profile, args.model, args.out, data, dry_run=args.dry_run, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif result.dry_run:
        print(result.message)
    else:
        print(f"{result.profile} ({result.backend}) -> {result.out} in {result.seconds:.0f} s: {result.message.replace('<out>', result.out)}")
        if result.command and not result.built:
            print(f"  build command (run in {result.out}): {result.command}")
    return 0
