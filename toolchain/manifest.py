"""`manifest.json` of an engine directory: what was built, from what, how, and where its parts are.

`minitron build` writes it last (so its presence means the directory is complete); `minitron serve`
and the benchmarks read it instead of guessing. Layout of an engine directory:

    manifest.json      this file
    tokenizer/         Hugging Face tokenizer files of the source model
    engine/            the runnable engine (`model_dir`): an onnxruntime-genai folder (backend onnxruntime-genai)
                       or a TensorRT-LLM engine folder with config.json + rank{N}.engine (tensorrt-llm)
    ...                what the backend keeps beside it (tensorrt-llm: checkpoint/, build.sh, build_config.json)
"""

import json
import platform
import time
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from toolchain.errors import UserError, validation_message
from toolchain.paths import read_json_object

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT_VERSION = 1
ENGINE_DIR = "engine"
TOKENIZER_DIR = "tokenizer"
RECORDED_LIBRARIES = ("minitron-toolchain", "torch", "transformers", "nvidia-modelopt", "onnxruntime", "onnxruntime-genai", "tensorrt_llm", "nvidia-pytriton")


class EngineManifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    format_version: int = MANIFEST_FORMAT_VERSION
    backend: str = Field(description="Engine backend (toolchain/backends/): tensorrt-llm or onnxruntime-genai.")
    profile_name: str
    profile: dict = Field(description="The profile the engine was built with, its limits fitted to the model.")
    profile_limits: dict[str, int] | None = Field(
        None, description="The profile's own max_seq_len and max_input_len when the model's max_position_embeddings lowered them.")
    source_model: str
    source_fingerprint: str
    model_dir: str = Field(description="Runnable engine folder, relative to the engine directory.")
    tokenizer_dir: str = Field(TOKENIZER_DIR, description="Tokenizer folder, relative to the engine directory.")
    built: bool = Field(description="False when the TensorRT-LLM build is left to the printed command.")
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    smoke_text: str | None = Field(None, description="What the engine generated in the build's smoke check; None when none ran.")
    libraries: dict[str, str | None]
    platform: str
    seconds: float
    created: str


def library_versions(names: tuple[str, ...] = RECORDED_LIBRARIES) -> dict[str, str | None]:
    """Installed version of each distribution in `names`; None for those not installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_manifest(engine_dir: Path, **fields) -> EngineManifest:
    """Validate and write the manifest; libraries, platform and time stamp are filled in here."""
    fields.setdefault("libraries", library_versions())
    fields.setdefault("platform", f"{platform.system()} {platform.machine()} python {platform.python_version()}")
    fields.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    manifest = EngineManifest(**fields)
    (Path(engine_dir) / MANIFEST_FILE).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return manifest


def read_manifest(engine_dir: Path) -> EngineManifest:
    """The manifest of an engine directory, or a user error saying how to make one."""
    path = Path(engine_dir) / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{engine_dir} has no {MANIFEST_FILE}; it is not an engine directory: build one with `minitron build`")
    fix = "rebuild the engine with `minitron build`"
    try:
        manifest = EngineManifest.model_validate(read_json_object(path, fix))
    except ValidationError as exc:
        field, message = validation_message(exc)
        raise UserError(f"{path} is not a valid engine manifest ({field}: {message}); {fix}") from None
    for part in (manifest.model_dir, manifest.tokenizer_dir):
        if not (Path(engine_dir) / part).is_dir():
            raise UserError(f"engine directory {engine_dir} lacks {part}/ named by its manifest; rebuild it with `minitron build`")
    return manifest
