"""ModelOpt quantization on CPU: calibrated on the calibration split, exported, reloaded, validated."""

import json
import math

import pytest
from conftest import cpu, data_settings
from safetensors import safe_open

from toolchain.data import prepare_data
from toolchain.errors import UserError
from toolchain.evaluate import evaluate_model
from toolchain.export import export
from toolchain.models import load_tokenizer
from toolchain.quantize import check_quantizable, load_quantized_model, quantize
from toolchain.settings import EvalConfig, ExportConfig, QuantizeConfig

# Tiny shapes that INT4-AWQ accepts: every Linear's in_features is a multiple of 128.
AWQ_SHAPES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
SEQ_LEN = 64
# format -> (safetensors dtype and shape of q_proj.weight [out 128, in 128] in the unified checkpoint, quant_algo)
EXPECTED = {
    "fp8": ("F8_E4M3", [128, 128], "FP8"),
    "int8_sq": ("I8", [128, 128], "W8A8_SQ_PER_CHANNEL"),
    "int4_awq": ("U8", [64, 128], "W4A16_AWQ"),  # two int4 values per byte
}


@pytest.fixture
def awq_model(make_tiny_model):
    return make_tiny_model(**AWQ_SHAPES)


@pytest.mark.parametrize("format", ["fp8", "int8_sq", "int4_awq"])
def test_quantize_exports_reloads_and_validates(awq_model, corpus_jsonl, tmp_path, format):
    out = tmp_path / "quantized"
    result = quantize(str(awq_model), out, QuantizeConfig(format=format, calibration_samples=8), data_settings(corpus_jsonl, SEQ_LEN), cpu(),
                      EvalConfig(max_batches=2, batch_size=4))

    weight_dtype, weight_shape, quant_algo = EXPECTED[format]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        weight = f.get_slice("model.layers.0.self_attn.q_proj.weight")
        assert (weight.get_dtype(), weight.get_shape()) == (weight_dtype, weight_shape)
        assert "model.layers.0.self_attn.q_proj.weight_scale" in f.keys()
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == quant_algo
    assert (out / "tokenizer.json").is_file()

    # Perplexity before and after are real evaluations: quantization moves it, but only a little.
    assert result.calibration_samples == 8 and result.eval_tokens == 2 * 4 * (SEQ_LEN - 1)
    assert result.perplexity_after != result.perplexity_before
    assert abs(math.log(result.perplexity_after / result.perplexity_before)) < 0.05
    report = json.loads((out / "quantization.json").read_text())
    assert report["perplexity_after"] == result.perplexity_after and report["format"] == format

    # The restorable ModelOpt copy reloads to exactly the calibrated model: same eval perplexity.
    reloaded = load_quantized_model(out)
    rows = prepare_data(data_settings(corpus_jsonl, SEQ_LEN), load_tokenizer(awq_model)).split("eval")
    assert evaluate_model(reloaded, rows, EvalConfig(batch_size=4, max_batches=2))["perplexity"] == pytest.approx(result.perplexity_after, rel=1e-6)

    # ... and exports to a TensorRT-LLM checkpoint that the validator accepts.
    exported = export(str(out), tmp_path / "trtllm", ExportConfig(format="trtllm", dtype="float16"))
    assert exported.quantization == format and exported.checkpoint["quant_algo"] == quant_algo


def test_fp8_with_kv_cache_exports_tp2_with_replicated_kv_head(make_tiny_model, corpus_jsonl, tmp_path):
    model = make_tiny_model(**dict(AWQ_SHAPES, num_key_value_heads=1))
    quantize(str(model), tmp_path / "q", QuantizeConfig(format="fp8", calibration_samples=4, kv_cache="fp8"), data_settings(corpus_jsonl, SEQ_LEN),
             cpu(), EvalConfig(max_batches=0))
    result = export(str(tmp_path / "q"), tmp_path / "trtllm", ExportConfig(format="trtllm", dtype="bfloat16", tp=2))
    assert (result.checkpoint["quant_algo"], result.checkpoint["kv_cache_quant_algo"], result.checkpoint["ranks"]) == ("FP8", "FP8", 2)


def test_int4_awq_refuses_in_features_not_multiple_of_128(tiny_model, corpus_jsonl, tmp_path, cli):
    out = tmp_path / "awq"
    result = cli("quantize", tiny_model, "--format", "int4_awq", "--data", corpus_jsonl, "--out", out)
    assert result.returncode == 2
    message = result.stderr.strip()
    assert "\n" not in message
    assert "multiple of 128" in message and "model.layers.0.self_attn.q_proj" in message and "has 64" in message
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no output, no temporary directory left


def test_int4_awq_refuses_tp_splitting_a_block(awq_model):
    # o_proj/down_proj are split along in_features over TP ranks: 128 / tp 2 = 64 is not a whole AWQ block.
    config = json.loads((awq_model / "config.json").read_text())
    with pytest.raises(UserError, match=r"128 x tp 2 = 256.*model.layers.0.self_attn.o_proj .* has 128"):
        check_quantizable(config, "int4_awq", tp=2)
    check_quantizable(config, "int4_awq", tp=1)


@pytest.mark.parametrize("args, message", [
    (["--format", "nf4"], "argument --format: invalid choice: 'nf4'"),
    (["--format", "fp8", "--kv-cache", "int2"], "argument --kv-cache: invalid choice: 'int2'"),
    ([], "choose a quantization format: --format fp8"),
    (["--format", "fp8", "--calibration-samples", "0"], "invalid --calibration-samples: Input should be greater than 0"),
    (["--format", "fp8", "--eval-batches", "-1"], "invalid --eval-batches: Input should be greater than or equal to 0"),
])
def test_bad_arguments_are_one_line_errors(tiny_model, tmp_path, cli, args, message):
    result = cli("quantize", tiny_model, "--out", tmp_path / "q", *args)
    assert result.returncode == 2 and message in result.stderr and result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "q").exists()


def test_refuses_non_empty_out(tiny_model, tmp_path, cli):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("quantize", tiny_model, "--format", "fp8", "--out", out)
    assert result.returncode == 2 and "not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["model", "q"]
