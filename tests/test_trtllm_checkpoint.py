"""TensorRT-LLM checkpoints written by `minitron export --format trtllm`, read back and checked on CPU."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from toolchain.errors import UserError
from toolchain.export import export
from toolchain.settings import ExportConfig
from toolchain.trtllm_checkpoint import read_hf_state_dict, validate_checkpoint


def hf_state_dict(model_dir):
    state = {}
    for path in model_dir.glob("*.safetensors"):
        state.update(load_file(path))
    if "lm_head.weight" not in state:  # tied embeddings are saved once
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def assert_readback_equals(model_dir, checkpoint, dtype=torch.float16):
    """Every HF tensor comes back exactly, as the export dtype."""
    expected = {name: tensor.to(dtype) for name, tensor in hf_state_dict(model_dir).items()}
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    actual = read_hf_state_dict(checkpoint, vocab_size=vocab)
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("tp, pp, heads, kv_heads, architecture", [
    (1, 1, 4, 2, "llama"),
    (2, 1, 4, 2, "llama"),
    (2, 1, 4, 1, "llama"),     # GQA with fewer kv heads than TP ranks: the kv head is replicated
    (4, 1, 4, 2, "mistral"),   # two ranks share each kv head
    (2, 2, 4, 2, "llama"),     # pipeline stages renumber their layers from 0
    (2, 1, 4, 2, "qwen2"),     # q/k/v biases split like the weights
])
def test_rank_files_read_back_equal_hf_weights(make_tiny_model, tmp_path, tp, pp, heads, kv_heads, architecture):
    model_dir = make_tiny_model(architecture=architecture, num_attention_heads=heads, num_key_value_heads=kv_heads)
    out = tmp_path / "ckpt"
    result = export(str(model_dir), out, ExportConfig(format="trtllm", dtype="float16", tp=tp, pp=pp))
    assert result.checkpoint["ranks"] == tp * pp
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == sorted(f"rank{r}.safetensors" for r in range(tp * pp))
    assert_readback_equals(model_dir, out)


def test_head_dim_not_hidden_over_heads_survives_export(make_tiny_model, tmp_path):
    model_dir = make_tiny_model(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32)  # 4 x 32 = 128 != 64
    out = tmp_path / "ckpt"
    export(str(model_dir), out, ExportConfig(format="trtllm", dtype="float16", tp=2))
    config = json.loads((out / "config.json").read_text())
    assert config["head_size"] == 32 and config["hidden_size"] == 64
    assert_readback_equals(model_dir, out)


def test_tied_embeddings_and_rope_base_are_exported(make_tiny_model, tmp_path):
    model_dir = make_tiny_model(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    out = tmp_path / "ckpt"
    export(str(model_dir), out, ExportConfig(format="trtllm", dtype="bfloat16"))
    config = json.loads((out / "config.json").read_text())
    assert config["rotary_base"] == 100000.0 and config["dtype"] == "bfloat16"
    state = read_hf_state_dict(out, vocab_size=384)
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    assert state["lm_head.weight"].dtype == torch.bfloat16


@pytest.fixture
def checkpoint(make_tiny_model, tmp_path):
    model_dir = make_tiny_model()
    out = tmp_path / "ckpt"
    export(str(model_dir), out, ExportConfig(format="trtllm", dtype="float16", tp=2))
    return model_dir, out


def test_validator_finds_wrong_shape_missing_rank_and_wrong_source(checkpoint):
    model_dir, out = checkpoint
    source = json.loads((model_dir / "config.json").read_text())
    assert validate_checkpoint(out, source).problems == []

    rank0 = load_file(out / "rank0.safetensors")
    rank0["transformer.layers.1.mlp.fc.weight"] = rank0["transformer.layers.1.mlp.fc.weight"][:-1].contiguous()
    save_file(rank0, out / "rank0.safetensors")
    problems = validate_checkpoint(out, raise_on_problems=False).problems
    assert problems == ["rank0.safetensors: transformer.layers.1.mlp.fc.weight is F16[63, 64], expected F16[64, 64]"]

    (out / "rank1.safetensors").unlink()
    assert "missing rank file rank1.safetensors (world_size 2)" in validate_checkpoint(out, raise_on_problems=False).problems
    with pytest.raises(UserError, match="invalid TensorRT-LLM checkpoint"):
        validate_checkpoint(out)

    other = dict(source, intermediate_size=256)
    assert any("intermediate_size" in p for p in validate_checkpoint(out, other, raise_on_problems=False).problems)


def test_validator_checks_config_keys_and_head_divisibility(checkpoint):
    _, out = checkpoint
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "head_size"}))
    assert validate_checkpoint(out, raise_on_problems=False).problems == ["config.json lacks required key 'head_size'"]
    (out / "config.json").write_text(json.dumps(dict(config, mapping={"world_size": 3, "tp_size": 3, "pp_size": 1})))
    assert any("tp=3 does not divide the 4 attention heads" in p for p in validate_checkpoint(out, raise_on_problems=False).problems)


def test_validate_checkpoint_cli(checkpoint, cli, tmp_path):
    model_dir, out = checkpoint
    ok = cli("validate-checkpoint", out, "--source", model_dir)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout and "tp=2 pp=1: 2 rank files" in ok.stdout
    not_a_checkpoint = cli("validate-checkpoint", tmp_path)
    assert not_a_checkpoint.returncode == 2
    assert not_a_checkpoint.stderr.strip().count("\n") == 0 and "has no config.json" in not_a_checkpoint.stderr
    hugging_face = cli("validate-checkpoint", model_dir)
    assert hugging_face.returncode == 2 and hugging_face.stderr.strip().count("\n") == 0
    assert "is a Hugging Face checkpoint" in hugging_face.stderr and f"minitron export {model_dir} --format trtllm" in hugging_face.stderr
    assert "lacks" not in hugging_face.stderr
    (tmp_path / "config.json").write_text("[1, 2]")
    a_list = cli("validate-checkpoint", tmp_path)
    assert a_list.returncode == 2 and "not an object of settings" in a_list.stderr and "Traceback" not in a_list.stderr
