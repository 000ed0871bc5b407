"""`minitron export`: HF (cast to the asked dtype), TensorRT-LLM (see test_trtllm_checkpoint.py) and ONNX; bad input refused."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from toolchain.export import export, rope_settings
from toolchain.settings import ExportConfig


def test_hf_export_casts_to_the_asked_dtype_and_reloads(tiny_model, tmp_path):
    out = tmp_path / "hf"
    result = export(str(tiny_model), out, ExportConfig(format="hf", dtype="bfloat16"))
    assert result.quantization == "none" and result.bytes > 0
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    original = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for name, tensor in original.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor.to(torch.bfloat16)), name
    assert (out / "tokenizer.json").is_file()


@pytest.mark.slow
def test_onnx_export_is_a_cpu_engine_folder(tiny_model, tmp_path):
    out = tmp_path / "onnx"
    result = export(str(tiny_model), out, ExportConfig(format="onnx"))
    assert result.dtype == "float32"
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["vocab_size"] == 384 and any(out.glob("*.onnx"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "onnx"]


def test_rope_settings_from_transformers_5_and_4_configs():
    assert rope_settings({"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}) == {"rotary_base": 100000.0, "rotary_scaling": None}
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    assert rope_settings({"rope_parameters": llama3})["rotary_scaling"] == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert rope_settings({"rope_theta": 50000.0}) == {"rotary_base": 50000.0, "rotary_scaling": None}


@pytest.mark.parametrize("args, message", [
    (["--format", "gguf"], "argument --format: invalid choice: 'gguf'"),
    ([], "choose an export format: --format hf, trtllm or onnx"),
    (["--format", "hf", "--tp", "2"], "--tp/--pp split TensorRT-LLM checkpoints"),
    (["--format", "trtllm", "--tp", "3"], "tp=3 does not divide the 4 attention heads"),
    (["--format", "trtllm", "--pp", "3"], "pp=3 does not divide the 4 layers"),
    (["--format", "trtllm", "--dtype", "float32"], "exported as float16 or bfloat16"),
    (["--format", "onnx", "--dtype", "bfloat16"], "ONNX CPU engine is built from an unquantized model in float32"),
    (["--format", "hf", "--dtype", "int3"], "argument --dtype: invalid choice: 'int3'"),
])
def test_bad_exports_are_one_line_errors(tiny_model, tmp_path, cli, args, message):
    result = cli("export", tiny_model, "--out", tmp_path / "out", *args)
    assert result.returncode == 2 and message in result.stderr and result.stderr.strip().count("\n") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_int8_smoothquant_refuses_fewer_kv_heads_than_tp(make_tiny_model):
    from toolchain.errors import UserError
    from toolchain.export import check_trtllm_export

    config = json.loads((make_tiny_model(num_key_value_heads=1).joinpath("config.json")).read_text())
    with pytest.raises(UserError, match="INT8-SmoothQuant with 1 kv heads on tp=2"):
        check_trtllm_export(config, tp=2, pp=1, quantization="int8_sq", dtype="float16")
    check_trtllm_export(config, tp=2, pp=1, quantization="fp8", dtype="float16")


def test_refuses_non_empty_out(tiny_model, tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    result = cli("export", tiny_model, "--format", "trtllm", "--out", out)
    assert result.returncode == 2 and "not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep"]
