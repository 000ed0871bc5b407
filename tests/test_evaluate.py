"""Eval numbers against a direct computation with transformers."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import cpu, data_settings

from toolchain.data import prepare_data
from toolchain.evaluate import evaluate, evaluate_model
from toolchain.models import load_model, load_tokenizer
from toolchain.settings import EvalConfig


def direct_metrics(model, teacher, rows):
    """Reference: HF's own loss, and KL/agreement from full-batch tensors."""
    input_ids = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    with torch.no_grad():
        out = model(input_ids, labels=input_ids)
        teacher_logits = teacher(input_ids).logits[:, :-1]
    student_log_probs = F.log_softmax(out.logits[:, :-1], -1).flatten(0, 1)
    teacher_log_probs = F.log_softmax(teacher_logits, -1).flatten(0, 1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean").item()
    agree = (student_log_probs.argmax(-1) == teacher_log_probs.argmax(-1)).float().mean().item()
    return out.loss.item(), kl, agree


def test_metrics_match_transformers(make_tiny_model, corpus_jsonl):
    student_dir, teacher_dir = make_tiny_model("student", seed=1), make_tiny_model("teacher", seed=2)
    student, teacher = load_model(student_dir), load_model(teacher_dir)
    rows = prepare_data(data_settings(corpus_jsonl), load_tokenizer(student_dir)).split("eval")
    metrics = evaluate_model(student, rows, EvalConfig(batch_size=3), teacher=teacher)  # uneven last batch on purpose
    loss, kl, agree = direct_metrics(student, teacher, rows)
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert metrics["kl"] == pytest.approx(kl, rel=1e-4)
    assert metrics["top1_agreement"] == pytest.approx(agree, abs=1e-6)
    assert metrics["tokens"] == rows.shape[0] * (rows.shape[1] - 1)


def test_model_against_itself_has_zero_kl(tiny_model, corpus_jsonl):
    result = evaluate(str(tiny_model), data_settings(corpus_jsonl), EvalConfig(), cpu(), teacher=str(tiny_model))
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.top1_agreement == 1.0
    assert result.teacher_perplexity == pytest.approx(result.perplexity)


def test_max_batches_limits_work(tiny_model, corpus_jsonl):
    result = evaluate(str(tiny_model), data_settings(corpus_jsonl), EvalConfig(batch_size=2, max_batches=3), cpu())
    assert result.sequences == 6


@pytest.mark.parametrize("split", ["calibration", "train", "all"])
def test_any_split_can_be_evaluated(tiny_model, corpus_jsonl, split):
    result = evaluate(str(tiny_model), data_settings(corpus_jsonl), EvalConfig(split=split, max_batches=1, batch_size=2), cpu())
    rows = prepare_data(data_settings(corpus_jsonl), load_tokenizer(tiny_model)).split(split)
    expected = evaluate_model(load_model(tiny_model), rows[:2], EvalConfig())
    assert result.split == split and result.loss == pytest.approx(expected["loss"], rel=1e-6)


def test_cli_eval_json_and_table(cli, make_tiny_model, corpus_jsonl):
    student, teacher = make_tiny_model("s", seed=1), make_tiny_model("t", seed=2)
    result = cli("eval", student, "--teacher", teacher, "--data", corpus_jsonl, "--seq-len", 32, "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["kl"] > 0 and 0 <= payload["top1_agreement"] <= 1 and payload["perplexity"] > 1
    table = cli("eval", student, "--data", corpus_jsonl, "--seq-len", 32)
    assert table.returncode == 0 and "perplexity" in table.stdout and f"{payload['perplexity']:.3f}" in table.stdout
    nothing = cli("eval", student, "--data", corpus_jsonl, "--seq-len", 32, "--eval-batches", 0)
    assert nothing.returncode == 2 and "nothing was evaluated (--eval-batches 0)" in nothing.stderr
    zero_batch = cli("eval", student, "--data", corpus_jsonl, "--eval-batch-size", 0)
    assert zero_batch.returncode == 2 and "invalid --eval-batch-size: Input should be greater than 0" in zero_batch.stderr


def test_teacher_with_other_tokenizer_refused(cli, make_tiny_model, corpus_jsonl):
    student, teacher = make_tiny_model("s"), make_tiny_model("t")
    config = json.loads((teacher / "tokenizer.json").read_text())
    config["model"]["vocab"]["zzzz"] = len(config["model"]["vocab"])
    (teacher / "tokenizer.json").write_text(json.dumps(config))
    result = cli("eval", student, "--teacher", teacher, "--data", corpus_jsonl, "--seq-len", 32)
    assert result.returncode == 2 and "different tokenizers" in result.stderr
