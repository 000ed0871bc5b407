"""`minitron search` on a tiny teacher: candidates within the budget, ranked by KL, resumable; bad budgets refused."""

import json

import pytest
from conftest import cpu, data_settings

import toolchain.search
from toolchain.search import search
from toolchain.settings import DistillConfig, EvalConfig, ImportanceConfig, SearchConfig


def run_search(teacher, corpus, out, **settings):
    config = SearchConfig(**{"budget": "non_embedding=50%", "hidden_multiple": 16, "ffn_multiple": 32, "max_candidates": 2, "tokens": 512,
                             **settings})
    return search(str(teacher), out, config, ImportanceConfig(calibration_samples=8, depth_calibration_samples=4),
                  DistillConfig(global_batch_size=4, micro_batch_size=2, lr=1e-3, min_lr=1e-4), data_settings(corpus), cpu(),
                  EvalConfig(max_batches=2, batch_size=4))


@pytest.mark.slow
def test_search_ranks_candidates_by_kl_and_resumes(make_tiny_model, corpus_jsonl, tmp_path, monkeypatch):
    teacher = make_tiny_model("teacher")
    report = run_search(teacher, corpus_jsonl, tmp_path / "search")
    candidates = report["candidates"]
    kinds = {candidate["kind"] for candidate in candidates}
    assert {"width-only", "depth-only"} <= kinds and len(candidates) <= 4
    assert [c["rank"] for c in candidates] == list(range(1, len(candidates) + 1))
    assert [c["kl"] for c in candidates] == sorted(c["kl"] for c in candidates)
    teacher_non_embedding = 4 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64
    assert all(c["parameters"]["non_embedding"] <= 0.505 * teacher_non_embedding for c in candidates)
    chosen = json.loads((tmp_path / "search" / "chosen" / "pruning.json").read_text())
    assert chosen["pruned"] == candidates[0]["shape"] and report["chosen"] == candidates[0]["id"]
    assert "| 1 |" in (tmp_path / "search" / "candidates.md").read_text()

    def no_work(*args, **kwargs):
        raise AssertionError("a finished candidate ran again")

    monkeypatch.setattr("toolchain.distill.distill", no_work)
    monkeypatch.setattr("toolchain.prune.prune", no_work)
    assert run_search(teacher, corpus_jsonl, tmp_path / "search") == report
    assert toolchain.search.RESULT_FILE == "result.json"


@pytest.mark.parametrize("args, message", [
    (["--budget", "params=10k"], "no candidate meets --budget params=10k"),
    (["--budget", "speedup=1.8x"], "a speedup budget needs an engine profile to measure against; pass --profile"),
    (["--budget", "flops=1T"], "unknown budget kind 'flops'"),
    ([], "name a budget: --budget"),
    (["--budget", "params=50%", "--min-fraction", "0"], "invalid --min-fraction"),
])
def test_bad_budgets_are_one_line_errors(cli, tiny_model, corpus_jsonl, tmp_path, args, message):
    result = cli("search", "--model", tiny_model, "--data", corpus_jsonl, "--seq-len", "32", "--out", tmp_path / "s", *args)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_llama_3_1_8b_at_4_5b_keeps_both_published_shapes_as_survivors():
    """Config only: at params=4.5B the published 4B-Width and 4B-Depth shapes are in the space and cannot grow within the budget."""
    from test_prune import llama_3_1_8b_config

    from toolchain.prune.shapes import ModelShape
    from toolchain.search import choose_candidates, survivors
    from toolchain.search_budget import parse_budget
    from toolchain.search_space import Architecture, enumerate_shapes, parameter_count

    config = llama_3_1_8b_config()
    original, architecture = ModelShape.from_config(config), Architecture.from_config(config)
    settings = SearchConfig(budget="params=4.5B", hidden_multiple=128, ffn_multiple=128)
    shapes = enumerate_shapes(original, 128, 128, 1, 0.5, True)
    kept = survivors(shapes, lambda shape: parameter_count(shape, architecture)["total"], parse_budget("params=4.5B"), 4.5e9, 0.01)
    assert ModelShape(3072, 9216, 32, 8, 128, 32) in kept and ModelShape(4096, 14336, 32, 8, 128, 16) in kept
    candidates, space = choose_candidates(original, architecture, settings)
    kinds = {candidate["kind"]: candidate["shape"] for candidate in candidates}
    assert space["within_budget"] == len(kept) and kinds["depth-only"]["num_layers"] == 16  # the best depth-only student is 4B-Depth
    assert kinds["width-only"]["num_layers"] == 32


@pytest.mark.slow
def test_a_speedup_budget_on_a_gpu_profile_is_projected(make_tiny_model, corpus_jsonl, tmp_path):
    teacher = make_tiny_model("teacher")
    report = run_search(teacher, corpus_jsonl, tmp_path / "search", budget="speedup=1.3x", profile="h100-fp8", max_candidates=1)
    assert report["space"]["measure"]["kind"] == "projected" and "h100-fp8" in report["space"]["measure"]["note"]
    for candidate in report["candidates"]:
        assert candidate["budget_value_kind"] == "projected" and candidate["speed"]["kind"] == "projected"
        assert candidate["budget_value"] >= 1.3 * 0.99 and candidate["meets_budget"]
    assert (tmp_path / "search" / "pareto.png").stat().st_size > 1000
    assert "(projected)" in (tmp_path / "search" / "candidates.md").read_text()


@pytest.mark.slow
def test_a_cpu_profile_measures_the_candidates_engines(make_tiny_model, corpus_jsonl, tmp_path):
    teacher = make_tiny_model("teacher", max_position_embeddings=2048)
    report = run_search(teacher, corpus_jsonl, tmp_path / "search", budget="non_embedding=50%", profile="cpu-fp32", workload="cpu-smoke",
                        max_candidates=1)
    speeds = json.loads((tmp_path / "search" / "speed.json").read_text())
    assert set(speeds) == {candidate["id"] for candidate in report["candidates"]}
    for candidate in report["candidates"]:
        assert candidate["speed"]["kind"] == "measured" and candidate["speed"]["speedup"] > 0 and candidate["speed"]["latency"] > 0
        assert (tmp_path / "search" / "engines" / candidate["id"] / "manifest.json").is_file()
