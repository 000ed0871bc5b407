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
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from toolchain.cli_args import add_data_arguments
from toolchain.data import check_seq_len, iterate_batches, prepare_data
from toolchain.errors import UserError
from toolchain.evaluate import evaluate_model
from toolchain.models import load_model, load_tokenizer, model_fingerprint, read_config, resolve_dtype, resolve_model_dir
from toolchain.paths import atomic_output_dir
from toolchain.progress import progress_bar

log = logging.getLogger(__name__)
# ModelOpt 0.47 warns on import that transformers 5.x is untested; quantization and export were checked here (REFERENCE §2).
warnings.filterwarnings("ignore", message=r"transformers .* is not tested with current version of modelopt", category=UserWarning)

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
    perplexity_before: float
    perplexity_after: float
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
    import modelopt.torch.quantization as mtq

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
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    hidden = config["hidden_size"]
    return {"self_attn.q_proj": hidden, "self_attn.k_proj": hidden, "self_attn.v_proj": hidden,
            "self_attn.o_proj": config["num_attention_heads"] * head_dim,
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
    import modelopt.torch.quantization as mtq

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
    import modelopt.torch.opt as mto
    from safetensors.torch import save_model

    directory.mkdir(parents=True)
    torch.save(mto.modelopt_state(model), directory / "modelopt_state.pth")
    save_model(model, str(directory / "model.safetensors"))
    model.config.save_pretrained(directory)


def load_quantized_model(model_dir: str | Path):
    """Rebuild the fake-quantized torch model from a `minitron quantize` directory (float32, CPU)."""
    import modelopt.torch.opt as mto
    from modelopt.torch.utils import safe_load
    from safetensors.torch import load_model as load_safetensors_into
    from transformers import AutoConfig, AutoModelForCausalLM

    restore = Path(model_dir) / RESTORE_DIR
    config = AutoConfig.from_pretrained(restore, trust_remote_code=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = mto.restore_from_modelopt_state(model, modelopt_state=safe_load(restore / "modelopt_state.pth", weights_only=True))
    load_safetensors_into(model, str(restore / "model.safetensors"))
    return model.eval()


def export_unified_checkpoint(model, out: Path, dtype: torch.dtype) -> None:
    """ModelOpt's HF unified export; the model is cast first because the exporter keeps float32 weights float32."""
    from modelopt.torch.export import export_hf_checkpoint

    export_hf_checkpoint(model.to(dtype), dtype=dtype, export_dir=out)


def checkpoint_bytes(directory: Path) -> int:
    """Bytes of the deployable checkpoint: the safetensors files at the top level (not the modelopt/ restore copy)."""
    return sum(path.stat().st_size for path in Path(directory).glob("*.safetensors"))


def quantize(
    model: str,
    format: str,
    out: str | Path,
    data: str = "builtin:python-docs",
    calibration_samples: int = 128,
    seq_len: int = 256,
    text_field: str = "text",
    kv_cache: str = "none",
    eval_batches: int | None = 8,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "cpu",
    overwrite: bool = False,
) -> QuantizeResult:
    """Quantize `model` with ModelOpt, calibrated on `data`'s calibration split; write a unified HF checkpoint to `out`.

    Reports eval perplexity (first `eval_batches` batches of the eval split) before and after.
    """
    started = time.perf_counter()
    check_format(format, kv_cache)
    export_dtype = resolve_dtype(dtype)
    if calibration_samples <= 0:
        raise UserError(f"calibration_samples must be positive, got {calibration_samples}")
    model_dir = resolve_model_dir(model)
    if is_quantized_checkpoint(model_dir):
        raise UserError(f"{model_dir} is already quantized ({quantized_format(model_dir)}); quantize the unquantized model instead")
    check_quantizable(read_config(model_dir), format)
    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
        tokenizer = load_tokenizer(model_dir)
        network = load_model(model_dir, dtype="float32", device=device)
        check_seq_len(seq_len, network.config)
        packed = prepare_data(data, tokenizer, seq_len, text_field=text_field)
        eval_rows = packed.split("eval")
        before = evaluate_model(network, eval_rows, batch_size, eval_batches, description="eval before")
        rows = calibration_rows(packed, calibration_samples)
        log.info("calibrating %s on %d sequences of %d tokens", format, len(rows), seq_len)
        network = quantize_model(network, format, rows, kv_cache)
        after = evaluate_model(network, eval_rows, batch_size, eval_batches, description="eval after")
        save_restorable(network, tmp / RESTORE_DIR)
        export_unified_checkpoint(network, tmp, export_dtype)
        tokenizer.save_pretrained(tmp)
        result = QuantizeResult(
            model=str(model), format=format, kv_cache=kv_cache, out=str(out), calibration_samples=len(rows),
            eval_tokens=after["tokens"], perplexity_before=before["perplexity"], perplexity_after=after["perplexity"],
            checkpoint_bytes=checkpoint_bytes(tmp), seconds=time.perf_counter() - started)
        report = dict(result.to_dict(), source_fingerprint=model_fingerprint(model_dir), data=data, seq_len=seq_len, dtype=dtype)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return result


def configure_parser(parser) -> None:
    parser.add_argument("model", help="model to quantize: a local Hugging Face directory or a built-in name")
    parser.add_argument("--format", required=True, help=f"quantization format: {', '.join(FORMATS)}")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    add_data_arguments(parser)
    parser.add_argument("--calibration-samples", type=int, default=128, help="calibration sequences (default 128)")
    parser.add_argument("--kv-cache", default="none", help="also quantize the KV cache: none (default) or fp8")
    parser.add_argument("--eval-batches", type=int, default=8, help="eval batches for the before/after perplexity (default 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="eval batch size (default 8)")
    parser.add_argument("--dtype", default="float32", help="dtype of the unquantized weights in the checkpoint: float32 (default), bfloat16, float16")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--json", action="store_true", help="print JSON")


def command(args) -> int:
    result = quantize(args.model, args.format, args.out, data=args.data, calibration_samples=args.calibration_samples,
                      seq_len=args.seq_len, text_field=args.text_field, kv_cache=args.kv_cache, eval_batches=args.eval_batches,
                      batch_size=args.batch_size, dtype=args.dtype, device=args.device, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    change = result.perplexity_after / result.perplexity_before - 1
    print(f"quantized {result.model} to {result.format} (kv cache {result.kv_cache}) -> {result.out}\n"
          f"  calibration: {result.calibration_samples} sequences\n"
          f"  eval perplexity: {result.perplexity_before:.3f} -> {result.perplexity_after:.3f} ({change:+.1%}, {result.eval_tokens} tokens)\n"
          f"  checkpoint: {result.checkpoint_bytes / 1e6:.1f} MB in {result.seconds:.0f} s")
    return 0
