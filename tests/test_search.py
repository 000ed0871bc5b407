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
