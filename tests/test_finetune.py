"""LM-loss fine-tuning (teacher correction) through the shared training loop."""

import json
import math

import pytest
from conftest import cpu, data_settings
from transformers import AutoModelForCausalLM

from toolchain.cli import main as cli_main
from toolchain.finetune import finetune
from toolchain.settings import EvalConfig, TrainingConfig


def test_finetune_learns_the_corpus_and_writes_a_plain_checkpoint(tiny_model, corpus_jsonl, tmp_path):
    out = tmp_path / "corrected"
    config = TrainingConfig(steps=16, global_batch_size=8, micro_batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=2, save_every=8)
    summary = finetune(str(tiny_model), out, config, data_settings(corpus_jsonl, 64), cpu(), EvalConfig())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 16 and set(log[0]) >= {"loss", "lr", "grad_norm", "tokens_per_second"}
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]
    assert "logit_kl" not in log[0]
    saved = json.loads((out / "eval.json").read_text())
    assert saved["eval"]["perplexity"] == summary["eval"]["perplexity"] and "kl" not in saved["eval"]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    assert json.loads((out / "run.json").read_text())["stage"] == "finetune"


def test_finetune_bad_budget_is_exit_2(tiny_model, corpus_jsonl, tmp_path, capsys):
    code = cli_main(["finetune", "--model", str(tiny_model), "--data", str(corpus_jsonl), "--out", str(tmp_path / "out"), "--steps", "0"])
    assert code == 2 and "invalid --steps" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_schedules_warm_up_then_decay_to_min_lr(tiny_model, corpus_jsonl, tmp_path):
    """Warm-up defaults to a share of the run, so a short run reaches its peak; each schedule ends at min_lr."""
    lrs = {}
    for schedule in ("cosine", "linear", "constant"):
        config = TrainingConfig(steps=20, global_batch_size=4, micro_batch_size=4, lr=1e-3, min_lr=1e-4, warmup_fraction=0.2, schedule=schedule)
        finetune(str(tiny_model), tmp_path / schedule, config, data_settings(corpus_jsonl, 32), cpu(), EvalConfig(max_batches=0))
        lrs[schedule] = [json.loads(line)["lr"] for line in (tmp_path / schedule / "train_log.jsonl").read_text().splitlines()]
    for schedule, values in lrs.items():  # 4 warm-up steps (20% of 20), transformers' convention: the first at lr 0
        assert values[:5] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3]), schedule
    assert lrs["constant"][-1] == pytest.approx(1e-3)
    # the last step runs at progress 15/16 of the decay from 1e-3 to 1e-4
    assert lrs["linear"][-1] == pytest.approx(1e-4 + 9e-4 / 16)
    assert lrs["cosine"][-1] == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert lrs["cosine"][10] > lrs["linear"][10]  # cosine decays slowly at first
