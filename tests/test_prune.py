"""Minitron pruning on tiny random checkpoints: shapes, exactness, importance definitions, reuse, torchrun, bad input."""

import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from conftest import cpu, data_settings
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

import toolchain.prune
from toolchain.cli import main as cli_main
from toolchain.data import prepare_data
from toolchain.errors import UserError
from toolchain.models import load_tokenizer, parameter_counts
from toolchain.prune import prune
from toolchain.prune.importance import (
    ActivationRecorder,
    activation_importance,
    aggregate_batch,
    aggregate_sequence,
    layer_drop_losses,
    select_heads,
    top_indices,
)
from toolchain.prune.shapes import ModelShape, parse_layer_list, pruned_config, target_shape
from toolchain.settings import ImportanceConfig, PruneConfig

SEQ_LEN = 32


@contextmanager
def without_layers(model, dropped: set[int]):
    """The model with some decoder layers removed (the rest in order), as the definition of dropping them."""
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layer for i, layer in enumerate(layers) if i not in dropped])
    try:
        yield model
    finally:
        model.model.layers = layers


def run_prune(model_dir, corpus, out, importance: dict | None = None, importance_file=None, **targets):
    return prune(str(model_dir), out, PruneConfig(**targets), ImportanceConfig(**(importance or {})), data_settings(corpus, SEQ_LEN), cpu(),
                 importance_file=importance_file)


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def tokens(batch=2, length=24, seed=1):
    return torch.randint(3, 384, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, input_ids):
    return model(input_ids=input_ids, use_cache=False).logits


@pytest.mark.parametrize("architecture,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_identity_pruning_is_exact(make_tiny_model, corpus_jsonl, tmp_path, architecture, tied):
    model_dir = make_tiny_model(architecture=architecture, tie_word_embeddings=tied)
    report = run_prune(model_dir, corpus_jsonl, tmp_path / "out", hidden_size=64, num_layers=4)  # targets equal to the model's
    assert report["parameters"]["original"] == report["parameters"]["pruned"]
    x = tokens()
    assert torch.equal(logits(load(model_dir), x), logits(load(tmp_path / "out"), x))


@pytest.mark.parametrize("targets", [
    {"hidden_size": 48},
    {"ffn_hidden_size": 96},
    {"num_attention_heads": 2},
    {"num_key_value_heads": 1},
    {"num_layers": 2, "depth_method": "block_importance"},
    {"hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "num_layers": 3},
])
def test_each_axis_and_combined_give_the_target_shapes(make_tiny_model, corpus_jsonl, tmp_path, targets):
    model_dir = make_tiny_model()
    report = run_prune(model_dir, corpus_jsonl, tmp_path / "out", **targets)
    pruned = load(tmp_path / "out")
    config = pruned.config
    expected = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4}
    renamed = {"ffn_hidden_size": "intermediate_size", "num_layers": "num_hidden_layers"}
    expected.update({renamed.get(k, k): v for k, v in targets.items() if k != "depth_method"})
    if "num_key_value_heads" in targets and "num_attention_heads" not in targets:
        expected["num_attention_heads"] = 2  # a dropped group takes its query heads with it
    assert {key: getattr(config, key) for key in expected} == expected
    assert json.loads((tmp_path / "out" / "config.json").read_text())["head_dim"] == 16
    assert sum(p.numel() for p in pruned.parameters()) == report["parameters"]["pruned"]["total"]
    assert logits(pruned, tokens()).shape == (2, 24, 384)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "pruning.json", "importance.safetensors"):
        assert (tmp_path / "out" / name).is_file()
    assert load_tokenizer(tmp_path / "out").get_vocab() == load_tokenizer(model_dir).get_vocab()


def zeroed_copy(model, report):
    """The original model with every pruned head's and neuron's contribution zeroed (hidden and layers intact)."""
    kept = report["kept"]
    head_dim = report["original"]["head_dim"]
    with torch.no_grad():
        for new_index, layer_index in enumerate(kept["kept_layers"]):
            layer = model.model.layers[layer_index]
            ffn_mask = torch.zeros(layer.mlp.down_proj.weight.shape[1], dtype=torch.bool)
            ffn_mask[kept["ffn"][new_index]] = True
            layer.mlp.down_proj.weight[:, ~ffn_mask] = 0
            for head in set(range(report["original"]["num_attention_heads"])) - set(kept["heads"][new_index]):
                layer.self_attn.o_proj.weight[:, head * head_dim:(head + 1) * head_dim] = 0
    return model


@pytest.mark.parametrize("architecture,targets", [
    ("llama", {"num_attention_heads": 2}),
    ("llama", {"num_key_value_heads": 1}),
    ("llama", {"ffn_hidden_size": 40}),
    ("qwen2", {"num_attention_heads": 2, "num_key_value_heads": 1, "ffn_hidden_size": 64}),
])
def test_pruning_heads_and_neurons_equals_zeroing_them(make_tiny_model, corpus_jsonl, tmp_path, architecture, targets):
    """q/k/v/o (with Qwen2 biases), GQA grouping and gate/up/down are cut consistently: same function as masking."""
    model_dir = make_tiny_model(architecture=architecture, num_attention_heads=4, num_key_value_heads=2)
    report = run_prune(model_dir, corpus_jsonl, tmp_path / "out", **targets)
    x = tokens()
    torch.testing.assert_close(logits(load(tmp_path / "out"), x), logits(zeroed_copy(load(model_dir), report), x), rtol=1e-5, atol=1e-5)


def test_gqa_heads_are_pruned_equally_in_every_group():
    scores = torch.tensor([0.9, 0.1, 0.2, 0.3, 0.8, 0.7, 0.0, 0.05, 0.5, 0.4, 0.6, 0.45])  # 3 groups of 4
    groups, heads = select_heads(scores, groups=3, keep_groups=2, keep_per_group=2)
    assert groups == [1, 2]  # group L2 norms: 0.975, 1.064, 0.986
    assert heads == [4, 5, 8, 10]  # the best two of each kept group
    assert top_indices(torch.tensor([1.0, 3.0, 2.0, 3.0]), 2) == [1, 3]


def test_depth_renumbers_layers_and_keeps_their_weights(make_tiny_model, corpus_jsonl, tmp_path):
    model_dir = make_tiny_model(architecture="qwen2", num_hidden_layers=5)
    report = run_prune(model_dir, corpus_jsonl, tmp_path / "out", drop_layers="1-2")
    assert report["dropped_layers"] == [1, 2] and report["kept"]["kept_layers"] == [0, 3, 4]
    original, pruned = load(model_dir), load(tmp_path / "out")
    assert pruned.config.num_hidden_layers == 3 and len(pruned.config.layer_types) == 3
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2]
    assert torch.equal(pruned.model.layers[1].self_attn.q_proj.bias, original.model.layers[3].self_attn.q_proj.bias)
    x = tokens()
    with without_layers(original, {1, 2}):
        torch.testing.assert_close(logits(pruned, x), logits(original, x))


def test_tied_embeddings_are_sliced_and_retied(make_tiny_model, corpus_jsonl, tmp_path):
    model_dir = make_tiny_model(tie_word_embeddings=True)
    report = run_prune(model_dir, corpus_jsonl, tmp_path / "out", hidden_size=48)
    original, pruned = load(model_dir), load(tmp_path / "out")
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()
    assert torch.equal(pruned.lm_head.weight, original.model.embed_tokens.weight[:, report["kept"]["hidden"]])
    assert report["parameters"]["pruned"]["total"] - report["parameters"]["pruned"]["non_embedding"] == 384 * 48


def test_untied_lm_head_is_sliced_on_the_hidden_axis(make_tiny_model, corpus_jsonl, tmp_path):
    model_dir = make_tiny_model()
    report = run_prune(model_dir, corpus_jsonl, tmp_path / "out", hidden_size=48)
    original, pruned = load(model_dir), load(tmp_path / "out")
    hidden = report["kept"]["hidden"]
    assert torch.equal(pruned.lm_head.weight, original.lm_head.weight[:, hidden])
    assert torch.equal(pruned.model.norm.weight, original.model.norm.weight[hidden])
    assert torch.equal(pruned.model.layers[0].mlp.down_proj.weight, original.model.layers[0].mlp.down_proj.weight[hidden])


def test_sequence_and_batch_aggregations_follow_their_definitions():
    x = torch.randn(3, 5, 4)
    assert torch.allclose(aggregate_sequence(x, "mean"), x.abs().mean(1))
    assert torch.allclose(aggregate_sequence(x, "l2"), x.pow(2).sum(1).sqrt())
    assert torch.allclose(aggregate_sequence(x, "var"), x.var(1, unbiased=False))
    per_sequence = aggregate_sequence(x, "mean")
    total, squares = per_sequence.sum(0), per_sequence.pow(2).sum(0)
    assert torch.allclose(aggregate_batch(total, squares, 3, "mean"), per_sequence.mean(0))
    assert torch.allclose(aggregate_batch(total, squares, 3, "l2"), per_sequence.pow(2).mean(0).sqrt())
    assert torch.allclose(aggregate_batch(total, squares, 3, "var"), per_sequence.var(0, unbiased=False), atol=1e-6)


@pytest.fixture
def calibration_rows(tiny_model, corpus_jsonl):
    return prepare_data(data_settings(corpus_jsonl, SEQ_LEN), load_tokenizer(tiny_model)).split("calibration")[:12]


def test_activation_importance_matches_the_minitron_definition(tiny_model, calibration_rows):
    """MLP neurons: L2 over the batch of the mean |input of down_proj| over the sequence; independent of batch size."""
    model = load(tiny_model)
    captured, layer_io = [], []
    handles = [model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach())),
               model.model.layers[2].register_forward_hook(lambda m, args, out: layer_io.append((args[0], out)))]
    with torch.no_grad():
        model.model(input_ids=torch.tensor(calibration_rows, dtype=torch.long))
    for handle in handles:
        handle.remove()
    expected = captured[0].abs().mean(dim=1).pow(2).mean(dim=0).sqrt()
    expected_block = 1 - torch.nn.functional.cosine_similarity(*layer_io[0], dim=-1).mean()
    scores = activation_importance(model, calibration_rows, 5, "mean", "l2")
    torch.testing.assert_close(scores["ffn"][1], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores["block_importance"][2], expected_block, rtol=1e-4, atol=1e-6)
    again = activation_importance(model, calibration_rows, 12, "mean", "l2")
    for name in scores:
        torch.testing.assert_close(scores[name], again[name], rtol=1e-5, atol=1e-7)
    assert scores["hidden"].shape == (64,) and scores["heads"].shape == (4, 4) and scores["block_importance"].shape == (4,)
    assert (scores["block_importance"] > 0).all()


def test_recorder_memory_does_not_grow_with_data(tiny_model, calibration_rows):
    model = load(tiny_model)
    recorder = ActivationRecorder(model, "mean")
    sizes = {name: tensor.numel() for name, tensor in recorder.sums.items()}
    with recorder.hooks(), torch.no_grad():
        for _ in range(3):
            model.model(input_ids=torch.tensor(calibration_rows, dtype=torch.long))
    assert {name: tensor.numel() for name, tensor in recorder.sums.items()} == sizes


def test_layer_drop_loss_equals_the_loss_of_the_shorter_model(tiny_model, calibration_rows):
    model = load(tiny_model)
    base, (without_two, without_block) = layer_drop_losses(model, calibration_rows, 5, [[2], [0, 1]])
    input_ids = torch.tensor(calibration_rows, dtype=torch.long)
    with torch.no_grad():
        assert base == pytest.approx(model(input_ids=input_ids, labels=input_ids).loss.item(), rel=1e-5)
        with without_layers(model, {2}):
            assert without_two == pytest.approx(model(input_ids=input_ids, labels=input_ids).loss.item(), rel=1e-5)
        with without_layers(model, {0, 1}):
            assert without_block == pytest.approx(model(input_ids=input_ids, labels=input_ids).loss.item(), rel=1e-5)
    assert len(model.model.layers) == 4


@pytest.mark.parametrize("method", ["lm_loss", "lm_loss_contiguous", "block_importance", "random"])
def test_depth_methods_choose_the_lowest_scoring_layers(make_tiny_model, corpus_jsonl, tmp_path, method):
    model_dir = make_tiny_model(num_hidden_layers=6)
    report = run_prune(model_dir, corpus_jsonl, tmp_path / "out", num_layers=3, depth_method=method, importance={"depth_calibration_samples": 8})
    scores = load_file(tmp_path / "out" / "importance.safetensors")
    dropped = report["dropped_layers"]
    assert len(dropped) == 3 and report["depth_method"] == method
    if method == "lm_loss":
        assert dropped == sorted(torch.argsort(scores["lm_loss_without_layer"])[:3].tolist())
        assert report["importance"]["scores"]["lm_loss_without_layer"]["sequences"] == 8
    if method == "lm_loss_contiguous":
        start = int(scores["lm_loss_without_block3"].argmin())
        assert dropped == [start, start + 1, start + 2] and scores["lm_loss_without_block3"].shape == (4,)
    if method == "block_importance":
        assert dropped == sorted(torch.argsort(scores["block_importance"])[:3].tolist())


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_baseline_importance_methods(make_tiny_model, corpus_jsonl, tmp_path, method):
    model_dir = make_tiny_model()
    first = run_prune(model_dir, corpus_jsonl, tmp_path / "a", importance={"method": method}, ffn_hidden_size=64, hidden_size=48)
    second = run_prune(model_dir, corpus_jsonl, tmp_path / "b", importance={"method": method}, ffn_hidden_size=64, hidden_size=48)
    assert first["kept"] == second["kept"] and first["importance"]["method"] == method
    activation = run_prune(model_dir, corpus_jsonl, tmp_path / "c", ffn_hidden_size=64, hidden_size=48)
    assert first["kept"]["ffn"] != activation["kept"]["ffn"]
    if method == "magnitude":  # neurons with the largest gate/up/down weight norms survive
        mlp = load(model_dir).model.layers[0].mlp
        with torch.no_grad():
            norms = mlp.gate_proj.weight.pow(2).sum(1) + mlp.up_proj.weight.pow(2).sum(1) + mlp.down_proj.weight.pow(2).sum(0)
        assert first["kept"]["ffn"][0] == sorted(torch.argsort(norms, descending=True)[:64].tolist())


def test_importance_file_is_reused_and_gives_identical_output(make_tiny_model, corpus_jsonl, tmp_path, monkeypatch):
    model_dir = make_tiny_model()
    first = run_prune(model_dir, corpus_jsonl, tmp_path / "a", hidden_size=48, ffn_hidden_size=64)
    importance = tmp_path / "a" / "importance.safetensors"

    def no_calibration_pass(*args, **kwargs):
        raise AssertionError("the importance file holds every score; nothing should be computed")

    monkeypatch.setattr(toolchain.prune, "compute_scores", no_calibration_pass)
    reused = run_prune(model_dir, corpus_jsonl, tmp_path / "b", importance_file=importance, hidden_size=48, ffn_hidden_size=64)
    assert reused["importance"]["file"] == str(importance) and reused["importance"]["scores"] == first["importance"]["scores"]
    assert load_file(tmp_path / "a" / "model.safetensors").keys() == load_file(tmp_path / "b" / "model.safetensors").keys()
    for name, tensor in load_file(tmp_path / "a" / "model.safetensors").items():
        assert torch.equal(tensor, load_file(tmp_path / "b" / "model.safetensors")[name])
    other = run_prune(model_dir, corpus_jsonl, tmp_path / "c", importance_file=importance, ffn_hidden_size=32)
    assert other["pruned"]["ffn_hidden_size"] == 32 and other["importance"]["scores"]["ffn"]["sequences"] > 0


@pytest.mark.parametrize("asked,differs", [
    ({"calibration_samples": 16}, "calibration_samples 8 (asked: 16)"),
    ({"calibration_samples": 8, "batch_aggregation": "mean"}, "batch_aggregation 'l2' (asked: 'mean')"),
    ({"calibration_samples": 8, "method": "magnitude"}, "method 'activation' (asked: 'magnitude')"),
])
def test_importance_file_computed_with_other_settings_is_refused(make_tiny_model, corpus_jsonl, tmp_path, asked, differs):
    model_dir = make_tiny_model()
    run_prune(model_dir, corpus_jsonl, tmp_path / "a", importance={"calibration_samples": 8}, ffn_hidden_size=64)
    with pytest.raises(UserError, match=re.escape(differs)):
        run_prune(model_dir, corpus_jsonl, tmp_path / "b", importance=asked, importance_file=tmp_path / "a" / "importance.safetensors",
                  ffn_hidden_size=64)
    assert not (tmp_path / "b").exists()


def test_importance_file_of_another_model_is_refused(make_tiny_model, corpus_jsonl, tmp_path):
    run_prune(make_tiny_model("first"), corpus_jsonl, tmp_path / "a", ffn_hidden_size=64)
    with pytest.raises(UserError, match="another model"):
        run_prune(make_tiny_model("second", seed=1), corpus_jsonl, tmp_path / "b", importance_file=tmp_path / "a" / "importance.safetensors",
                  ffn_hidden_size=64)
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(make_tiny_model, corpus_jsonl, tmp_path):
    model_dir = make_tiny_model()
    args = ["prune", "--model", str(model_dir), "--data", str(corpus_jsonl), "--seq-len", str(SEQ_LEN), "--hidden-size", "48",
            "--ffn-hidden-size", "64", "--num-attention-heads", "2", "--num-layers", "3", "--depth-method", "lm_loss", "--batch-size", "3"]
    single = subprocess.run([sys.executable, "-m", "toolchain", *args, "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "toolchain", *args,
                             "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=env)
    assert double.returncode == 0, double.stderr
    one, two = (json.loads((tmp_path / name / "pruning.json").read_text()) for name in ("one", "two"))
    assert one["importance"]["scores"]["ffn"]["world_size"] == 1 and two["importance"]["scores"]["ffn"]["world_size"] == 2
    assert one["importance"]["scores"]["ffn"]["sequences"] == two["importance"]["scores"]["ffn"]["sequences"]
    assert one["kept"] == two["kept"] and one["dropped_layers"] == two["dropped_layers"]
    scores_one, scores_two = (load_file(tmp_path / name / "importance.safetensors") for name in ("one", "two"))
    assert scores_one.keys() == scores_two.keys()
    for name in scores_one:
        torch.testing.assert_close(scores_one[name], scores_two[name], rtol=1e-5, atol=1e-6)
    assert double.stdout.count("pruned ") == 1  # only rank 0 reports


def llama_3_1_8b_config():
    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    config.architectures = ["LlamaForCausalLM"]
    return config


def test_llama_3_1_8b_to_the_published_minitron_4b_shapes():
    """Meta device, no weights: 8.0B teacher; 4B-Width and 4B-Depth both 4.5B parameters as published (arXiv 2408.11796)."""
    config = llama_3_1_8b_config()
    original = ModelShape.from_config(config)
    assert parameter_counts(config) == {"total": 8_030_261_248, "non_embedding": 6_979_588_096}

    width, _ = target_shape(original, PruneConfig(hidden_size=3072, ffn_hidden_size=9216))
    width_config = pruned_config(config, width, list(range(32)))
    assert (width.num_attention_heads, width.num_key_value_heads, width.head_dim) == (32, 8, 128)
    assert width_config.head_dim == 128 and width_config.hidden_size != width_config.num_attention_heads * width_config.head_dim
    assert width_config.rope_parameters == config.rope_parameters
    width_counts = parameter_counts(width_config)
    assert width_counts == {"total": 4_512_746_496, "non_embedding": 3_724_741_632}
    assert round(width_counts["total"] / 1e9, 1) == 4.5 and round(width_counts["non_embedding"] / 1e9, 1) == 3.7

    depth, dropped = target_shape(original, PruneConfig(drop_layers="16-31"))
    assert dropped == list(range(16, 32)) and depth.num_layers == 16
    depth_counts = parameter_counts(pruned_config(config, depth, list(range(16))))
    assert depth_counts == {"total": 4_540_469_248, "non_embedding": 3_489_796_096}
    assert round(depth_counts["total"] / 1e9, 1) == 4.5


def test_shape_rules():
    shape = ModelShape(hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64, num_layers=30)
    kv_only, _ = target_shape(shape, PruneConfig(num_key_value_heads=1))
    assert (kv_only.num_attention_heads, kv_only.num_key_value_heads) == (3, 1)
    assert parse_layer_list("3,5,7-9", 30) == [3, 5, 7, 8, 9]
    with pytest.raises(UserError, match="432 or 441"):
        target_shape(shape, PruneConfig(hidden_size=438))
    with pytest.raises(UserError, match="query heads per group"):
        target_shape(shape, PruneConfig(num_attention_heads=8, num_key_value_heads=2))
    with pytest.raises(UserError, match="give one of them"):
        target_shape(shape, PruneConfig(num_layers=20, drop_layers="0-14"))
    with pytest.raises(UserError, match="no pruning target"):
        target_shape(shape, PruneConfig())


@pytest.mark.parametrize("flags,message", [
    (["--hidden-size", "128"], "larger than the model's 64"),
    (["--ffn-hidden-size", "0"], "--ffn-hidden-size"),
    (["--num-attention-heads", "3"], "not divisible by 2 key-value heads"),
    (["--hidden-size", "50"], "not a multiple of 4 attention heads, which transformers 5.x refuses; use --hidden-size 48 or 52"),
    (["--drop-layers", "2-7"], "out of range"),
    (["--num-layers", "-1"], "invalid --num-layers: Input should be greater than 0"),
    ([], "no pruning target: set at least one of --hidden-size"),
])
def test_bad_targets_fail_with_one_line_and_write_nothing(tiny_model, corpus_jsonl, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    code = cli_main(["prune", "--model", str(tiny_model), "--data", str(corpus_jsonl), "--out", str(out), *flags])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and len(error.splitlines()) == 1
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_cli_refuses_foreign_importance_and_unsupported_architecture(make_tiny_model, corpus_jsonl, tmp_path, cli):
    first = make_tiny_model("first")
    assert cli("prune", "--model", first, "--data", corpus_jsonl, "--seq-len", SEQ_LEN, "--ffn-hidden-size", "64", "--out", tmp_path / "a").returncode == 0
    result = cli("prune", "--model", make_tiny_model("second", seed=3), "--data", corpus_jsonl, "--seq-len", SEQ_LEN, "--ffn-hidden-size", "64",
                 "--importance", tmp_path / "a" / "importance.safetensors", "--out", tmp_path / "b")
    assert result.returncode == 2 and "another model" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
    gpt2 = make_tiny_model("gpt2")
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    result = cli("prune", "--model", gpt2, "--data", corpus_jsonl, "--out", tmp_path / "c")
    assert result.returncode == 2 and "unsupported architecture GPT2LMHeadModel" in result.stderr and not (tmp_path / "c").exists()


def test_cli_takes_targets_from_a_recipe_student(tiny_model, corpus_jsonl, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: tiny\nteacher: {{model: {tiny_model}}}\ndata: {{spec: {corpus_jsonl}, seq_len: {SEQ_LEN}}}\n"
                      "students:\n  - {name: narrow, prune: {ffn_hidden_size: 64, hidden_size: 48}}\n  - {name: shallow, prune: {num_layers: 2}}\n")
    code = cli_main(["prune", "--recipe", str(recipe), "--recipe-student", "narrow", "--hidden-size", "32", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert report["pruned"]["ffn_hidden_size"] == 64 and report["pruned"]["hidden_size"] == 32  # the flag overrides the recipe
    assert "total params" in capsys.readouterr().out
    assert cli_main(["prune", "--recipe", str(recipe), "--out", str(tmp_path / "x")]) == 2
    assert "choose one with --recipe-student" in capsys.readouterr().err
