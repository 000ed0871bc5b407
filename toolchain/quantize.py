"""`minitron quantize`: post-training quantization with NVIDIA ModelOpt, calibrated on the data's calibration split.

Formats (ModelOpt configs): fp8 (FP8_DEFAULT_CFG, per-tensor E4M3 weights and activations),
int8_sq (INT8_SMOOTHQUANT_CFG, per-channel int8 weights, per-tensor int8 activations after
SmoothQuant), int4_awq (INT4_AWQ_CFG, int4 weights in blocks of 128 input channels, AWQ-lite scales,
16-bit activations). Optionally the KV cache is quantized too (FP8_KV_CFG). On CPU ModelOpt simulates
the quantized numerics ("fake quantization"), so the perplexity reported after quantization is what
the real kernels compute up to rounding; the speed and memory gains need TensorRT-LLM on a GPU.

Output directory:
    config.json, model*.safetensors, hf_quant_config.json   ModelOpt/HF unified checkpoint (real fp8 / int8 /
                                                            packed int4 weights + scales; TensorRT-LLM's PyTorch
                                                            backend, vLLM and SGLang load it)
    tokenizer files                                         copied from the source model
    modelopt/                                               the fake-quantized model ModelOpt can restore
                                                            (modelopt_state.pth: quantizer config, no weights,
                                                            loaded with weights_only=True; model.safetensors:
                                                            weights + calibrated scales; config.json), which
                                                            `minitron export --format trtllm` and `minitron build` read
    quantization.json                                       format, calibration, perplexity before and after
"""

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from toolchain.data import check_seq_len, iterate_batches, prepare_data
from toolchain.errors import UserError, setting
from toolchain.evaluate import evaluate_model
from toolchain.modelopt_compat import modelopt
from toolchain.models import head_dim, load_model, load_tokenizer, model_fingerprint, read_config, resolve_dtype, resolve_model_dir, save_tokenizer
from toolchain.paths import atomic_output_dir, check_output_location, directory_bytes
from toolchain.progress import progress_bar
from toolchain.settings import ComputeConfig, DataConfig, EvalConfig, QuantizeConfig

log = logging.getLogger(__name__)

FORMATS = ("fp8", "int8_sq", "int4_awq")
KV_CACHE_FORMATS = ("none", "fp8")
AWQ_BLOCK_SIZE = 128
RESTORE_DIR = "modelopt"
REPORT_FILE = "quantization.json"
# quant_algo of ModelOpt's unified checkpoint for each format, for reading a quantized directory back.
QUANT_ALGOS = {"fp8": "FP8", "int8_sq": "W8A8_SQ_PER_CHANNEL", "int4_awq": "W4A16_AWQ"}


@dataclass
class QuantizeResult:
    model: str
    format: str
    kv_cache: str
    out: str
    calibration_samples: int
    eval_tokens: int
    perplexity_before: float | None
    perplexity_after: float | None
    checkpoint_bytes: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def check_format(format: str, kv_cache: str = "none") -> None:
    if format not in FORMATS:
        raise UserError(f"unknown quantization format {format!r}; use one of {', '.join(FORMATS)}")
    if kv_cache not in KV_CACHE_FORMATS:
        raise UserError(f"unknown KV-cache quantization {kv_cache!r}; use one of {', '.join(KV_CACHE_FORMATS)}")


def modelopt_config(format: str, kv_cache: str = "none") -> dict:
    """The ModelOpt quantization config of a format, with the FP8 KV-cache quantizers added if asked."""
    mtq = modelopt("quantization")
    check_format(format, kv_cache)
    base = {"fp8": mtq.FP8_DEFAULT_CFG, "int8_sq": mtq.INT8_SMOOTHQUANT_CFG, "int4_awq": mtq.INT4_AWQ_CFG}[format]
    config = copy.deepcopy(base)
    if kv_cache == "fp8":
        kv = copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
        # ModelOpt >= 0.4x lists quantizer rules; older releases (e.g. 0.37 in NVIDIA's TRT-LLM container) map patterns to rules.
        if isinstance(config["quant_cfg"], dict):
            config["quant_cfg"].update(kv)
        else:
            config["quant_cfg"] = list(config["quant_cfg"]) + list(kv)
    return config


def linear_in_features(config: dict) -> dict[str, int]:
    """in_features of each Linear of a decoder layer of a Llama-family config (every layer has the same shapes)."""
    hidden = config["hidden_size"]
    return {"self_attn.q_proj": hidden, "self_attn.k_proj": hidden, "self_attn.v_proj": hidden,
            "self_attn.o_proj": config["num_attention_heads"] * head_dim(config),
            "mlp.gate_proj": hidden, "mlp.up_proj": hidden, "mlp.down_proj": config["intermediate_size"]}


def check_quantizable(config: dict, format: str, tp: int = 1) -> None:
    """Refuse shapes a format cannot take, naming the offending layer and the rule.

    INT4-AWQ quantizes weights in blocks of 128 input channels, so every quantized Linear (all but
    lm_head) needs in_features divisible by 128, and by 128 x tp for the row-parallel layers that
    TensorRT-LLM splits along in_features (o_proj, down_proj).
    """
    if format != "int4_awq":
        return
    for name, in_features in linear_in_features(config).items():
        split = tp if name in ("self_attn.o_proj", "mlp.down_proj") else 1
        if in_features % (AWQ_BLOCK_SIZE * split):
            rule = f"a multiple of {AWQ_BLOCK_SIZE}" if split == 1 else f"a multiple of {AWQ_BLOCK_SIZE} x tp {tp} = {AWQ_BLOCK_SIZE * tp}"
            raise UserError(f"INT4-AWQ needs every Linear's in_features to be {rule} (its block size); layer model.layers.0.{name} "
                            f"(and the same in every layer) has {in_features}; use fp8 or int8_sq, or a model whose widths are multiples of {AWQ_BLOCK_SIZE}")


def calibration_rows(packed, samples: int):
    rows = packed.split("calibration")
    if samples > len(rows):
        log.warning("asked for %d calibration samples; the calibration split holds %d, using all", samples, len(rows))
    return rows[: min(samples, len(rows))]


def quantize_model(model, format: str, rows, kv_cache: str = "none", batch_size: int = 4):
    """Insert ModelOpt quantizers into `model` and calibrate them on `rows` (int32 token rows), in place."""
    mtq = modelopt("quantization")
    device = next(model.parameters()).device

    def forward_loop(quantized):
        with torch.no_grad(), progress_bar(f"calibrate {format}", total=math.ceil(len(rows) / batch_size)) as bar:
            for input_ids in iterate_batches(rows, batch_size):
                quantized(input_ids=input_ids.to(device), use_cache=False)
                bar.update(1)

    return mtq.quantize(model, modelopt_config(format, kv_cache), forward_loop)


def is_quantized_checkpoint(model_dir: Path) -> bool:
    return (Path(model_dir) / RESTORE_DIR / "modelopt_state.pth").is_file()


def quantized_format(model_dir: Path) -> str:
    """The format recorded by `minitron quantize` in a quantized directory."""
    return json.loads((Path(model_dir) / REPORT_FILE).read_text())["format"]


def save_restorable(model, directory: Path) -> None:
    """Save what `load_quantized_model` needs: ModelOpt's state (configs) and the fake-quant weights + scales."""
    from safetensors.torch import save_model

    mto = modelopt("opt")
    directory.mkdir(parents=True)
    torch.save(mto.modelopt_state(model), directory / "modelopt_state.pth")
    save_model(model, str(directory / "model.safetensors"))
    model.config.save_pretrained(directory)


def load_quantized_model(model_dir: str | Path):
    """Rebuild the fake-quantized torch model from a `minitron quantize` directory (float32, CPU)."""
    from safetensors.torch import load_model as load_safetensors_into
    from transformers import AutoConfig, AutoModelForCausalLM

    mto = modelopt("opt")
    restore = Path(model_dir) / RESTORE_DIR
    config = AutoConfig.from_pretrained(restore, trust_remote_code=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = mto.restore_from_modelopt_state(model, modelopt_state=modelopt("utils").safe_load(restore / "modelopt_state.pth", weights_only=True))
    load_safetensors_into(model, str(restore / "model.safetensors"))
    return model.eval()


def export_unified_checkpoint(model, out: Path, dtype: torch.dtype) -> None:
    """ModelOpt's HF unified export; the model is cast first because the exporter keeps float32 weights float32."""
    modelopt("export").export_hf_checkpoint(model.to(dtype), dtype=dtype, export_dir=out)


def quantize(model: str, out: str | Path, settings: QuantizeConfig, data: DataConfig, compute: ComputeConfig, evaluation: EvalConfig,
             overwrite: bool = False) -> QuantizeResult:
    """Quantize `model` with ModelOpt, calibrated on `data`'s calibration split; write a unified HF checkpoint to `out`.

    Reports eval perplexity before and after on `evaluation`'s batches of the eval split (none with max_batches 0).
    Quantization runs in float32 (the simulated numerics); `compute.device` says where.
    """
    started = time.perf_counter()
    if settings.format == "none":
        raise UserError(f"choose a quantization format: {setting('quantize.format')} fp8, int8_sq or int4_awq")
    check_format(settings.format, settings.kv_cache)
    check_output_location(Path(out), overwrite=overwrite)
    model_dir = resolve_model_dir(model)
    if is_quantized_checkpoint(model_dir):
        raise UserError(f"{model_dir} is already quantized ({quantized_format(model_dir)}); quantize the unquantized model instead")
    check_quantizable(read_config(model_dir), settings.format)
    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
        tokenizer = load_tokenizer(model_dir)
        network = load_model(model_dir, dtype="float32", device=compute.device)
        check_seq_len(data.seq_len, network.config)
        packed = prepare_data(data, tokenizer)
        evaluating = evaluation.max_batches != 0
        before = evaluate_model(network, packed.split("eval"), evaluation, description="eval before") if evaluating else None
        rows = calibration_rows(packed, settings.calibration_samples)
        log.info("calibrating %s on %d sequences of %d tokens", settings.format, len(rows), data.seq_len)
        network = quantize_model(network, settings.format, rows, settings.kv_cache)
        after = evaluate_model(network, packed.split("eval"), evaluation, description="eval after") if evaluating else None
        save_restorable(network, tmp / RESTORE_DIR)
        export_unified_checkpoint(network, tmp, resolve_dtype(settings.checkpoint_dtype))
        save_tokenizer(model_dir, tmp)
        result = QuantizeResult(
            model=str(model), format=settings.format, kv_cache=settings.kv_cache, out=str(out), calibration_samples=len(rows),
            eval_tokens=after["tokens"] if after else 0, perplexity_before=before["perplexity"] if before else None,
            perplexity_after=after["perplexity"] if after else None, checkpoint_bytes=directory_bytes(tmp, "*.safetensors"),
            seconds=time.perf_counter() - started)
        report = dict(result.to_dict(), source_fingerprint=model_fingerprint(model_dir), data=data.spec, seq_len=data.seq_len,
                      dtype=settings.checkpoint_dtype)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return result


def configure_parser(parser) -> None:
    from toolchain.cli_args import add_output_flags, add_recipe_source, add_section_flags

    parser.add_argument("model", help="model to quantize: a local Hugging Face directory or a built-in name")
    add_output_flags(parser, "output directory: the quantized checkpoint")
    add_recipe_source(parser)
    for section in ("quantize", "data", "compute", "eval"):
        add_section_flags(parser, section)


def command(args) -> int:
    from toolchain.cli_args import sections_from_args

    settings, data, compute, evaluation = sections_from_args(args, "quantize", "data", "compute", "eval")
    result = quantize(args.model, args.out, settings, data, compute, evaluation, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    lines = [f"quantized {result.model} to {result.format} (kv cache {result.kv_cache}) -> {result.out}",
             f"  calibration: {result.calibration_samples} sequences"]
    if result.perplexity_before is not None:
        change = result.perplexity_after / result.perplexity_before - 1
        lines.append(f"  eval perplexity: {result.perplexity_before:.3f} -> {result.perplexity_after:.3f} ({change:+.1%}, {result.eval_tokens} tokens)")
    lines.append(f"  checkpoint: {result.checkpoint_bytes / 1e6:.1f} MB in {result.seconds:.0f} s")
    print("\n".join(lines))
    return 0
