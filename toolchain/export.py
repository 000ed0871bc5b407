"""`minitron export`: a model (plain or `minitron quantize`d) as a HF unified, TensorRT-LLM or ONNX checkpoint.

- hf: ModelOpt's `export_hf_checkpoint` (a plain model becomes a normal HF folder in `dtype`; a
  quantized one the unified checkpoint with real fp8/int8/int4 weights and hf_quant_config.json).
- trtllm: ModelOpt's `export_tensorrt_llm_checkpoint` (config.json + rank{N}.safetensors per TP/PP
  rank), then checked by toolchain.trtllm_checkpoint before it is reported done.
- onnx: the onnxruntime-genai CPU engine folder (ONNX graph with a KV cache) from toolchain.cpu_engine.

What this module adds around ModelOpt's exporters (caveats seen with ModelOpt 0.47 + transformers 5):
the model is cast to `dtype` first (a float32 model exported "as bfloat16" otherwise stays float32),
`config.architectures` is set, TP/PP and quantization limits are refused up front with a one-line
error instead of a deep NotImplementedError, and `rotary_base`/`rotary_scaling` are written into the
TensorRT-LLM config from the HF `rope_parameters` (ModelOpt looks for the transformers-4 attribute
`rope_theta`, finds none, and leaves TensorRT-LLM to assume 10000 — wrong for SmolLM2's 100000).
"""

import contextlib
import io
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from toolchain.errors import UserError, setting
from toolchain.modelopt_compat import modelopt
from toolchain.models import load_model, read_config, resolve_dtype, resolve_model_dir, save_tokenizer
from toolchain.paths import atomic_output_dir, check_output_location, directory_bytes
from toolchain.quantize import check_quantizable, is_quantized_checkpoint, load_quantized_model, quantized_format
from toolchain.settings import ExportConfig
from toolchain.trtllm_checkpoint import check_parallelism, validate_checkpoint

log = logging.getLogger(__name__)



@dataclass
class ExportResult:
    model: str
    format: str
    out: str
    dtype: str
    tp: int
    pp: int
    quantization: str
    bytes: int
    seconds: float
    checkpoint: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def check_trtllm_export(config: dict, tp: int, pp: int, quantization: str, dtype: str) -> None:
    """Refuse a TensorRT-LLM export ModelOpt or TensorRT-LLM cannot do, before any weights are loaded."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    check_parallelism(heads, kv_heads, config["num_hidden_layers"], tp, pp)
    if quantization == "int8_sq" and kv_heads < tp:
        raise UserError(f"INT8-SmoothQuant with {kv_heads} kv heads on tp={tp}: ModelOpt cannot replicate per-channel kv scales "
                        f"across ranks; use tp <= {kv_heads}, or fp8 / int4_awq")
    check_quantizable(config, quantization, tp)
    if dtype == "float32":
        raise UserError(f"TensorRT-LLM checkpoints are exported as float16 or bfloat16 (ModelOpt turns float32 into float16); set {setting('export.dtype')} bfloat16 or float16")


def load_for_export(model_dir: Path) -> tuple[torch.nn.Module, str]:
    """The model in float32 on CPU and its quantization ('none' for a plain HF folder)."""
    if is_quantized_checkpoint(model_dir):
        return load_quantized_model(model_dir), quantized_format(model_dir)
    return load_model(model_dir, dtype="float32"), "none"


def rope_settings(source_config: dict) -> dict:
    """TensorRT-LLM's rotary_base / rotary_scaling from a HF config (transformers 5 `rope_parameters` or 4.x keys)."""
    rope = dict(source_config.get("rope_parameters") or source_config.get("rope_scaling") or {})
    base = rope.pop("rope_theta", source_config.get("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    scaling = {"type": rope_type, **rope} if rope_type != "default" else None
    return {"rotary_base": float(base), "rotary_scaling": scaling}


def export_trtllm_checkpoint(model, out: Path, dtype: str, tp: int, pp: int, source_config: dict):
    """ModelOpt's TensorRT-LLM export into `out`, the config completed, then validated against the source config."""
    exporter = modelopt("export")
    if not model.config.architectures:
        model.config.architectures = [type(model).__name__]
    torch_dtype = resolve_dtype(dtype)
    model = model.to(torch_dtype)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), torch.inference_mode():
        exporter.export_tensorrt_llm_checkpoint(model, decoder_type=modelopt("export.model_utils").get_model_type(model), dtype=torch_dtype, export_dir=out,
                                       inference_tensor_parallel=tp, inference_pipeline_parallel=pp)
    log.debug("ModelOpt export output:\n%s", printed.getvalue())
    config_path = Path(out) / "config.json"
    config = json.loads(config_path.read_text())
    config.update(rope_settings(source_config))
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return validate_checkpoint(out, source_config)


def export_onnx(model_dir: Path, out: Path) -> None:
    """The onnxruntime-genai CPU engine folder; built beside `out` by cpu_engine, then moved into it."""
    from toolchain.cpu_engine import build_cpu_engine

    staging = out / ".onnx"
    build_cpu_engine(model_dir, staging, "fp32")
    for path in staging.iterdir():
        path.rename(out / path.name)
    staging.rmdir()


def export(model: str, out: str | Path, settings: ExportConfig, overwrite: bool = False) -> ExportResult:
    """Export `model` (a HF folder, built-in name or `minitron quantize` output) to `out` as `settings` say.

    tp/pp apply to trtllm only.
    """
    from toolchain.quantize import export_unified_checkpoint

    started = time.perf_counter()
    format, dtype, tp, pp = settings.format, settings.resolved_dtype(), settings.tp, settings.pp
    if format == "none":
        raise UserError(f"choose an export format: {setting('export.format')} hf, trtllm or onnx")
    if format != "trtllm" and (tp != 1 or pp != 1):
        raise UserError(f"{setting('export.tp')}/{setting('export.pp')} split TensorRT-LLM checkpoints; the {format} format has no ranks: "
                        f"leave them at 1 or export trtllm")
    check_output_location(Path(out), overwrite=overwrite)
    model_dir = resolve_model_dir(model)
    source_config = read_config(model_dir)
    quantization = quantized_format(model_dir) if is_quantized_checkpoint(model_dir) else "none"
    if format == "onnx" and (dtype != "float32" or quantization != "none"):
        raise UserError(f"the ONNX CPU engine is built from an unquantized model in float32; pass the unquantized model and "
                        f"{setting('export.dtype')} float32 (int4 CPU engines: `minitron build --profile cpu-int4`)")
    if format == "trtllm":
        check_trtllm_export(source_config, tp, pp, quantization, dtype)
    report = None
    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
        if format == "onnx":
            export_onnx(model_dir, tmp)
        else:
            network, _ = load_for_export(model_dir)
            if format == "hf":
                export_unified_checkpoint(network, tmp, resolve_dtype(dtype))
                save_tokenizer(model_dir, tmp)
            else:
                report = export_trtllm_checkpoint(network, tmp, dtype, tp, pp, source_config).to_dict()
        size = directory_bytes(tmp)
    return ExportResult(model=str(model), format=format, out=str(out), dtype=dtype, tp=tp, pp=pp, quantization=quantization,
                        bytes=size, seconds=time.perf_counter() - started, checkpoint=report)


def configure_parser(parser) -> None:
    from toolchain.cli_args import add_output_flags, add_recipe_source, add_section_flags

    parser.add_argument("model", help="model: a local Hugging Face directory, a built-in name, or a `minitron quantize` output")
    add_output_flags(parser, "output directory")
    add_recipe_source(parser)
    add_section_flags(parser, "export")


def command(args) -> int:
    from toolchain.cli_args import sections_from_args

    (settings,) = sections_from_args(args, "export")
    result = export(args.model, args.out, settings, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(f"exported {result.model} ({result.quantization}) as {result.format} {result.dtype} -> {result.out} "
          f"({result.bytes / 1e6:.1f} MB, {result.seconds:.0f} s)")
    if result.checkpoint:
        print(f"  TensorRT-LLM checkpoint valid: tp={result.tp} pp={result.pp}, {result.checkpoint['ranks']} rank files, "
              f"{result.checkpoint['tensors']} tensors, head_size {result.checkpoint['head_size']}")
    return 0
