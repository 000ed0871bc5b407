"""`minitron validate-checkpoint`: the project's own check of a TensorRT-LLM checkpoint directory.

`trtllm-build` runs only on a GPU machine with TensorRT-LLM installed, so a bad checkpoint would be
found there, late. This module checks on CPU everything that can be checked without TensorRT-LLM:
config.json's required keys, head_size, TP/PP divisibility, and the name, shape and dtype of every
tensor of every rank file, computed from the config (and, given the source Hugging Face config,
that the checkpoint describes that model: head_size = head_dim, rotary_base = rope_theta, ...).

Layout (what ModelOpt's `export_tensorrt_llm_checkpoint` writes and `trtllm-build --checkpoint_dir`
reads): `config.json` + `rank{r}.safetensors` for r in [0, tp*pp), r = pp_rank * tp + tp_rank.
Pipeline stage p holds layers [p*L/pp, (p+1)*L/pp), numbered from 0 inside each rank file.

HF <-> TensorRT-LLM names (Llama, Mistral, Qwen2; i is the layer index inside the stage):
    model.embed_tokens.weight              transformer.vocab_embedding.weight   rows split over TP, first stage
    model.norm.weight                      transformer.ln_f.weight              last stage
    lm_head.weight                         lm_head.weight                       rows split over TP, last stage
    layers.i.input_layernorm.weight        transformer.layers.i.input_layernorm.weight
    layers.i.post_attention_layernorm      transformer.layers.i.post_layernorm.weight
    layers.i.self_attn.{q,k,v}_proj        transformer.layers.i.attention.qkv.{weight,bias}
                                           rows [q of this rank's heads; k; v of its kv heads]
    layers.i.self_attn.o_proj.weight       transformer.layers.i.attention.dense.weight   columns split
    layers.i.mlp.gate_proj.weight          transformer.layers.i.mlp.fc.weight            rows split
    layers.i.mlp.up_proj.weight            transformer.layers.i.mlp.gate.weight          rows split
    layers.i.mlp.down_proj.weight          transformer.layers.i.mlp.proj.weight          columns split
TP rank t holds query heads [t*H/tp, (t+1)*H/tp) and kv heads [t*K/tp, (t+1)*K/tp) when tp divides
K; when K < tp each kv head is replicated on tp/K consecutive ranks (rank t holds kv head t*K//tp).
Embedding and lm_head rows are zero-padded to a multiple of tp (ModelOpt also pads the vocabulary to
a multiple of 64 for INT4-AWQ, so config vocab_size may exceed the tokenizer's).

Quantized linears (quantization.quant_algo) carry, besides `weight`:
    FP8                   weight float8_e4m3 [out, in]; weights_scaling_factor, activation_scaling_factor [1] float32
    W8A8_SQ_PER_CHANNEL   weight int8 [out, in]; weights_scaling_factor [out] float32; activation_scaling_factor [1];
                          prequant_scaling_factor [in] in the checkpoint dtype
    W4A16_AWQ             weight int8 [out/2, in] (two int4 per byte); weights_scaling_factor [out, in/group_size]
                          float32; prequant_scaling_factor [in] in the checkpoint dtype
A quantized KV cache (kv_cache_quant_algo FP8 or INT8) adds attention.{k,v,kv}_cache_scaling_factor [1].
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from toolchain.errors import UserError
from toolchain.models import head_dim
from toolchain.paths import read_json_object

CONFIG_FILE = "config.json"
REQUIRED_CONFIG_KEYS = (
    "architecture", "dtype", "logits_dtype", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_size", "intermediate_size", "max_position_embeddings", "hidden_act", "norm_epsilon",
    "position_embedding_type", "rotary_base", "mapping", "quantization",
)
SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
QUANT_ALGOS = (None, "FP8", "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ")
KV_CACHE_QUANT_ALGOS = (None, "FP8", "INT8")
AWQ_BLOCK = 128
# TensorRT-LLM name -> HF name inside a decoder layer (the per-layer half of the table above).
LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_layernorm.weight": "post_attention_layernorm.weight",
    "attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.fc.weight": "mlp.gate_proj.weight",
    "mlp.gate.weight": "mlp.up_proj.weight",
    "mlp.proj.weight": "mlp.down_proj.weight",
}


@dataclass
class CheckpointReport:
    directory: str
    architecture: str
    dtype: str
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    tp: int
    pp: int
    head_size: int
    ranks: int
    tensors: int
    bytes: int
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def check_parallelism(num_heads: int, num_kv_heads: int, num_layers: int, tp: int, pp: int) -> None:
    """TP/PP rules of TensorRT-LLM's Llama: a UserError naming the rule when the split is impossible."""
    if tp < 1 or pp < 1:
        raise UserError(f"tp and pp must be at least 1, got tp={tp}, pp={pp}")
    if num_heads % tp:
        raise UserError(f"tp={tp} does not divide the {num_heads} attention heads; choose a tp that divides {num_heads}")
    if num_kv_heads % tp and tp % num_kv_heads:
        raise UserError(f"tp={tp} and the {num_kv_heads} kv heads do not divide one another; "
                        f"choose a tp that divides {num_kv_heads} or is a multiple of it")
    if num_layers % pp:
        raise UserError(f"pp={pp} does not divide the {num_layers} layers; choose a pp that divides {num_layers}")


def read_checkpoint_config(directory: Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise UserError(f"{directory} is not a directory; pass a TensorRT-LLM checkpoint directory (config.json + rank*.safetensors)")
    if not path.is_file():
        raise UserError(f"{directory} has no {CONFIG_FILE}; it is not a TensorRT-LLM checkpoint (export one with `minitron export --format trtllm`)")
    config = read_json_object(path, "it is not a TensorRT-LLM checkpoint config (export one with `minitron export --format trtllm`)")
    if "architectures" in config and not any(Path(directory).glob("rank*.safetensors")):
        raise UserError(f"{directory} is a Hugging Face checkpoint (config.json with architectures, no rank*.safetensors), not a TensorRT-LLM one; "
                        f"`minitron export {directory} --format trtllm --out DIR` turns it into one")
    return config


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) per rank of each TensorRT-LLM linear of a decoder layer."""
    tp = config["mapping"]["tp_size"]
    heads, kv_heads, head_size = config["num_attention_heads"], config["num_key_value_heads"], config["head_size"]
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    kv_local = max(kv_heads // tp, 1)
    return {
        "attention.qkv": ((heads // tp + 2 * kv_local) * head_size, hidden),
        "attention.dense": (hidden, heads * head_size // tp),
        "mlp.fc": (ffn // tp, hidden),
        "mlp.gate": (ffn // tp, hidden),
        "mlp.proj": (hidden, ffn // tp),
    }


def quantized_linear_tensors(prefix: str, out_features: int, in_features: int, quant: dict, dtype: str) -> dict[str, tuple[tuple, str]]:
    algo = quant.get("quant_algo")
    if algo is None:
        return {f"{prefix}.weight": ((out_features, in_features), dtype)}
    if algo == "FP8":
        return {f"{prefix}.weight": ((out_features, in_features), "F8_E4M3"),
                f"{prefix}.weights_scaling_factor": ((1,), "F32"), f"{prefix}.activation_scaling_factor": ((1,), "F32")}
    if algo == "W8A8_SQ_PER_CHANNEL":
        return {f"{prefix}.weight": ((out_features, in_features), "I8"), f"{prefix}.weights_scaling_factor": ((out_features,), "F32"),
                f"{prefix}.activation_scaling_factor": ((1,), "F32"), f"{prefix}.prequant_scaling_factor": ((in_features,), dtype)}
    group = quant.get("group_size", AWQ_BLOCK)
    return {f"{prefix}.weight": ((out_features // 2, in_features), "I8"),
            f"{prefix}.weights_scaling_factor": ((out_features, in_features // group), "F32"),
            f"{prefix}.prequant_scaling_factor": ((in_features,), dtype)}


def expected_rank_tensors(config: dict, rank: int, qkv_bias: bool = False) -> dict[str, tuple[tuple, str]]:
    """Name -> (shape, safetensors dtype) of every tensor rank `rank` must hold."""
    tp, pp = config["mapping"]["tp_size"], config["mapping"]["pp_size"]
    tp_rank, pp_rank = rank % tp, rank // tp
    dtype = SAFETENSORS_DTYPES[config["dtype"]]
    hidden = config["hidden_size"]
    quant = config.get("quantization") or {}
    layers_per_stage = config["num_hidden_layers"] // pp
    vocab_rows = math.ceil(config["vocab_size"] / tp) if config.get("use_parallel_embedding", False) else config["vocab_size"]
    expected: dict[str, tuple[tuple, str]] = {}
    if pp_rank == 0:
        expected["transformer.vocab_embedding.weight"] = ((vocab_rows, hidden), dtype)
    if pp_rank == pp - 1:
        expected["transformer.ln_f.weight"] = ((hidden,), dtype)
        expected["lm_head.weight"] = ((math.ceil(config["vocab_size"] / tp), hidden), dtype)
    for layer in range(layers_per_stage):
        prefix = f"transformer.layers.{layer}"
        expected[f"{prefix}.input_layernorm.weight"] = ((hidden,), dtype)
        expected[f"{prefix}.post_layernorm.weight"] = ((hidden,), dtype)
        for name, (out_features, in_features) in linear_shapes(config).items():
            expected.update(quantized_linear_tensors(f"{prefix}.{name}", out_features, in_features, quant, dtype))
        if qkv_bias:
            expected[f"{prefix}.attention.qkv.bias"] = ((linear_shapes(config)["attention.qkv"][0],), dtype)
        if quant.get("kv_cache_quant_algo"):
            for scale in ("k_cache_scaling_factor", "v_cache_scaling_factor", "kv_cache_scaling_factor"):
                expected[f"{prefix}.attention.{scale}"] = ((1,), "F32")
    del tp_rank  # every TP rank holds the same names and shapes
    return expected


def config_problems(config: dict) -> list[str]:
    problems = [f"config.json lacks required key {key!r}" for key in REQUIRED_CONFIG_KEYS if key not in config]
    if problems:
        return problems
    mapping = config["mapping"]
    tp, pp = mapping.get("tp_size", 1), mapping.get("pp_size", 1)
    if mapping.get("world_size") != tp * pp:
        problems.append(f"mapping.world_size {mapping.get('world_size')} != tp_size {tp} x pp_size {pp}")
    try:
        check_parallelism(config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"], tp, pp)
    except UserError as exc:
        problems.append(str(exc))
    if config["dtype"] not in SAFETENSORS_DTYPES:
        problems.append(f"dtype {config['dtype']!r} is not one of {', '.join(SAFETENSORS_DTYPES)}")
    if config["position_embedding_type"] != "rope_gpt_neox":
        problems.append(f"position_embedding_type {config['position_embedding_type']!r}; Llama-family models use rope_gpt_neox")
    quant = config["quantization"] or {}
    if quant.get("quant_algo") not in QUANT_ALGOS:
        problems.append(f"quantization.quant_algo {quant.get('quant_algo')!r} is not one this toolchain writes ({', '.join(map(str, QUANT_ALGOS))})")
    if quant.get("kv_cache_quant_algo") not in KV_CACHE_QUANT_ALGOS:
        problems.append(f"quantization.kv_cache_quant_algo {quant.get('kv_cache_quant_algo')!r} is not one of {KV_CACHE_QUANT_ALGOS}")
    if quant.get("quant_algo") == "W4A16_AWQ":
        for name, (_, in_features) in linear_shapes(config).items():
            if in_features % quant.get("group_size", AWQ_BLOCK):
                problems.append(f"W4A16_AWQ {name} has {in_features} in_features per rank, not a multiple of group_size {quant.get('group_size', AWQ_BLOCK)}")
    return problems


def source_problems(config: dict, source: dict) -> list[str]:
    """Does the checkpoint describe the source Hugging Face model (its config.json as a dict)?"""
    heads = source["num_attention_heads"]
    rope = source.get("rope_parameters") or {}
    want = {
        "hidden_size": source["hidden_size"],
        "num_hidden_layers": source["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": source.get("num_key_value_heads") or heads,
        "head_size": head_dim(source),
        "intermediate_size": source["intermediate_size"],
        "rotary_base": rope.get("rope_theta", source.get("rope_theta", 10000.0)),
        "norm_epsilon": source.get("rms_norm_eps"),
    }
    problems = [f"{key} is {config.get(key)!r} but the source model has {value!r}" for key, value in want.items()
                if value is not None and config.get(key) is not None and not math.isclose(float(config[key]), float(value), rel_tol=1e-6)]
    if config.get("vocab_size", 0) < source["vocab_size"]:
        problems.append(f"vocab_size {config.get('vocab_size')} is smaller than the source model's {source['vocab_size']}")
    return problems


def tensor_problems(directory: Path, config: dict, qkv_bias: bool) -> tuple[list[str], int, int]:
    """Compare every rank file with the expected tensors; returns (problems, tensor count, bytes)."""
    from safetensors import safe_open

    problems, count, size = [], 0, 0
    world = config["mapping"]["tp_size"] * config["mapping"]["pp_size"]
    present = sorted(Path(directory).glob("rank*.safetensors"))
    extra_files = [path.name for path in present if path.name not in {f"rank{r}.safetensors" for r in range(world)}]
    if extra_files:
        problems.append(f"rank files beyond world_size {world}: {', '.join(extra_files)}")
    for rank in range(world):
        path = Path(directory) / f"rank{rank}.safetensors"
        if not path.is_file():
            problems.append(f"missing rank file {path.name} (world_size {world})")
            continue
        expected = expected_rank_tensors(config, rank, qkv_bias)
        size += path.stat().st_size
        try:
            with safe_open(str(path), "pt") as handle:
                names = set(handle.keys())
                count += len(names)
                for name in sorted(names - expected.keys()):
                    problems.append(f"{path.name}: unexpected tensor {name}")
                for name in sorted(expected.keys() - names):
                    problems.append(f"{path.name}: missing tensor {name}")
                for name in sorted(names & expected.keys()):
                    tensor = handle.get_slice(name)
                    shape, dtype = tuple(tensor.get_shape()), tensor.get_dtype()
                    want_shape, want_dtype = expected[name]
                    if shape != want_shape or dtype != want_dtype:
                        problems.append(f"{path.name}: {name} is {dtype}{list(shape)}, expected {want_dtype}{list(want_shape)}")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            problems.append(f"{path.name}: unreadable safetensors file ({exc})")
    return problems, count, size


def validate_checkpoint(directory: str | Path, source_config: dict | None = None, raise_on_problems: bool = True) -> CheckpointReport:
    """Check a TensorRT-LLM checkpoint; with `source_config` (HF config.json as a dict) also that it matches the model.

    Raises a UserError naming the first problems unless `raise_on_problems` is False.
    """
    directory = Path(directory)
    config = read_checkpoint_config(directory)
    problems = config_problems(config)
    if source_config is not None and not problems:
        problems += source_problems(config, source_config)
    count = size = 0
    if not problems:
        qkv_bias = config["architecture"].startswith("Qwen2") or bool(config.get("qkv_bias") or config.get("bias"))
        tensor_issues, count, size = tensor_problems(directory, config, qkv_bias)
        problems += tensor_issues
    mapping = config.get("mapping") or {}
    quant = config.get("quantization") or {}
    report = CheckpointReport(
        directory=str(directory), architecture=config.get("architecture", "?"), dtype=config.get("dtype", "?"),
        quant_algo=quant.get("quant_algo"), kv_cache_quant_algo=quant.get("kv_cache_quant_algo"),
        tp=mapping.get("tp_size", 1), pp=mapping.get("pp_size", 1), head_size=config.get("head_size", 0),
        ranks=mapping.get("world_size", 1), tensors=count, bytes=size, problems=problems)
    if problems and raise_on_problems:
        more = f" (and {len(problems) - 3} more; run `minitron validate-checkpoint {directory}` for all)" if len(problems) > 3 else ""
        raise UserError(f"invalid TensorRT-LLM checkpoint {directory}: {'; '.join(problems[:3])}{more}")
    return report


def read_hf_state_dict(directory: str | Path, vocab_size: int | None = None) -> dict:
    """Reassemble the HF-named, HF-shaped tensors of an unquantized checkpoint from all its rank files.

    Inverts the name mapping and the TP/PP split documented above (padding rows dropped, replicated
    kv heads taken once); `vocab_size` trims the embedding and lm_head rows to the tokenizer's.
    """
    import torch
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_checkpoint_config(directory)
    if (config.get("quantization") or {}).get("quant_algo"):
        raise ValueError("read_hf_state_dict reads unquantized checkpoints; quantized weights need their scales to dequantize")
    tp, pp = config["mapping"]["tp_size"], config["mapping"]["pp_size"]
    heads, kv_heads, head_size = config["num_attention_heads"], config["num_key_value_heads"], config["head_size"]
    layers_per_stage = config["num_hidden_layers"] // pp
    vocab = vocab_size or config["vocab_size"]
    ranks = [load_file(str(directory / f"rank{rank}.safetensors")) for rank in range(tp * pp)]

    def stage(pp_rank: int) -> list[dict]:
        return ranks[pp_rank * tp : (pp_rank + 1) * tp]

    state = {
        "model.embed_tokens.weight": torch.cat([r["transformer.vocab_embedding.weight"] for r in stage(0)])[:vocab],
        "model.norm.weight": stage(pp - 1)[0]["transformer.ln_f.weight"],
        "lm_head.weight": torch.cat([r["lm_head.weight"] for r in stage(pp - 1)])[:vocab],
    }
    q_local, kv_local = heads // tp * head_size, max(kv_heads // tp, 1) * head_size
    kv_owner = [t for t in range(tp) if t * kv_heads // tp != (t - 1) * kv_heads // tp or t == 0]  # first rank of each kv head group
    for pp_rank in range(pp):
        shards = stage(pp_rank)
        for local in range(layers_per_stage):
            hf = f"model.layers.{pp_rank * layers_per_stage + local}."
            trt = f"transformer.layers.{local}."
            for trt_name, hf_name in LAYER_NAMES.items():
                parts = [shard[trt + trt_name] for shard in shards]
                split_dim = 1 if trt_name in ("attention.dense.weight", "mlp.proj.weight") else 0
                state[hf + hf_name] = parts[0] if "layernorm" in trt_name else torch.cat(parts, dim=split_dim)
            for kind in ("weight", "bias"):
                if trt + f"attention.qkv.{kind}" not in shards[0]:
                    continue
                qkv = [shard[trt + f"attention.qkv.{kind}"] for shard in shards]
                state[hf + f"self_attn.q_proj.{kind}"] = torch.cat([part[:q_local] for part in qkv])
                state[hf + f"self_attn.k_proj.{kind}"] = torch.cat([qkv[t][q_local : q_local + kv_local] for t in kv_owner])
                state[hf + f"self_attn.v_proj.{kind}"] = torch.cat([qkv[t][q_local + kv_local :] for t in kv_owner])
    return state


def format_report(report: CheckpointReport) -> str:
    status = "OK" if not report.problems else f"{len(report.problems)} problem(s)"
    lines = [
        f"{report.directory}: {status}",
        f"  {report.architecture}, dtype {report.dtype}, quantization {report.quant_algo or 'none'}"
        f" (kv cache {report.kv_cache_quant_algo or 'model dtype'}), head_size {report.head_size}",
        f"  tp={report.tp} pp={report.pp}: {report.ranks} rank files, {report.tensors} tensors, {report.bytes / 1e6:.1f} MB",
    ]
    lines += [f"  - {problem}" for problem in report.problems]
    return "\n".join(lines)


def configure_parser(parser) -> None:
    parser.add_argument("directory", help="TensorRT-LLM checkpoint directory (config.json + rank*.safetensors)")
    parser.add_argument("--source", help="the Hugging Face model it was exported from: also check that the checkpoint describes it")
    parser.add_argument("--json", action="store_true", help="print JSON")


def command(args) -> int:
    source_config = None
    if args.source:
        from toolchain.models import read_config, resolve_model_dir

        source_config = read_config(resolve_model_dir(args.source))
    report = validate_checkpoint(args.directory, source_config, raise_on_problems=False)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 2 if report.problems else 0
