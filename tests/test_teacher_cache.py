"""The teacher-logit cache: KD from it against online KD, interrupted and damaged builds, refused mismatches (tiny models, CPU)."""

import json
import logging

import numpy as np
import pytest
import torch
from conftest import TINY_VOCAB, cpu, data_settings
from test_distill import SEQ_LEN, distill_args, run_distill, small_config, tensors, train_log, with_flags

from toolchain import teacher_cache
from toolchain.cli import main as cli_main
from toolchain.data import prepare_data, tokenizer_fingerprint
from toolchain.models import load_model, load_tokenizer, model_fingerprint
from toolchain.settings import EvalConfig
from toolchain.teacher_cache import cache_fingerprint, fill_teacher_cache, open_teacher_cache


@pytest.fixture
def teacher(make_tiny_model):
    return make_tiny_model("teacher", seed=0)


@pytest.fixture
def student(make_tiny_model):
    return make_tiny_model("student", seed=1, num_hidden_layers=2)


def test_kd_from_a_full_vocabulary_cache_equals_online_kd(teacher, student, corpus_jsonl, tmp_path, caplog):
    config = small_config(steps=4, lm_loss_weight=0.5, temperature=2.0)
    online = run_distill(teacher, student, corpus_jsonl, tmp_path / "online", config)
    cached_config = config.model_copy(update={"teacher_cache": str(tmp_path / "cache"), "teacher_cache_top_k": TINY_VOCAB})
    with caplog.at_level(logging.INFO, logger="toolchain.distill"):
        cached = run_distill(teacher, student, corpus_jsonl, tmp_path / "cached", cached_config)
    assert "32 of the run's 32 rows computed now" in caplog.text  # 4 steps x 8 sequences
    for a, b in zip(train_log(tmp_path / "online"), train_log(tmp_path / "cached"), strict=True):
        for name in ("loss", "logit_kl", "lm_loss"):
            assert b[name] == pytest.approx(a[name], rel=1e-5), (name, a, b)
    weights_online, weights_cached = tensors(tmp_path / "online"), tensors(tmp_path / "cached")
    for name in weights_online:
        torch.testing.assert_close(weights_cached[name], weights_online[name], rtol=1e-4, atol=1e-5)
    assert cached["eval"]["kl"] == pytest.approx(online["eval"]["kl"], rel=1e-4)

    # a second, shorter run reads a subset of those rows: the cache has them all, the teacher computes nothing
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="toolchain.distill"):
        run_distill(teacher, student, corpus_jsonl, tmp_path / "again", cached_config.model_copy(update={"steps": 2}))
    assert "0 of the run's 16 rows computed now" in caplog.text


def test_a_top_k_cache_without_tail_samples_trains_close_to_online_and_stores_k_entries(teacher, student, corpus_jsonl, tmp_path):
    config = small_config(steps=4)
    run_distill(teacher, student, corpus_jsonl, tmp_path / "online", config)
    run_distill(teacher, student, corpus_jsonl, tmp_path / "cached",
                config.model_copy(update={"teacher_cache": str(tmp_path / "cache"), "teacher_cache_top_k": 8, "teacher_cache_tail_samples": 0}))
    assert np.load(tmp_path / "cache" / "indices.npy", mmap_mode="r").shape[-1] == 8
    online, cached = train_log(tmp_path / "online"), train_log(tmp_path / "cached")
    # the first step sees the same student: its top-8 KL is a lower bound of the full KL
    assert 0 < cached[0]["logit_kl"] <= online[0]["logit_kl"]
    assert cached[-1]["logit_kl"] < cached[0]["logit_kl"]


def test_tail_samples_are_drawn_from_the_teacher_outside_its_top_k_the_same_way_for_the_same_tokens(teacher, student, corpus_jsonl, tmp_path):
    model = load_model(teacher)
    cache, rows = open_cache(teacher, corpus_jsonl, tmp_path / "cache", top_k=8, tail_samples=24)
    fill_teacher_cache(cache, model, rows, np.arange(8), batch_size=4, device="cpu")
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=torch.from_numpy(np.asarray(rows[:8], dtype=np.int64))).logits.float(), -1)
    indices, log_probs = torch.from_numpy(cache.indices[:8]).long(), torch.from_numpy(cache.log_probs[:8])
    top, tail = indices[..., :8], indices[..., 8:]
    assert indices.shape[-1] == 32
    torch.testing.assert_close(top, log_p.topk(8, -1).indices)
    torch.testing.assert_close(log_probs, log_p.gather(-1, indices))
    assert not (tail[..., :, None] == top[..., None, :]).any()  # no tail sample is one of the top-k
    torch.testing.assert_close(torch.from_numpy(cache.rest[:8]), log_p.scatter(-1, top, float("-inf")).logsumexp(-1))
    # drawn by the tokens of the row, not by its place in the batch: the same rows in other batches give the same draws
    again, _ = open_cache(teacher, corpus_jsonl, tmp_path / "again", top_k=8, tail_samples=24)
    fill_teacher_cache(again, model, rows, np.arange(8)[::-1].copy(), batch_size=3, device="cpu")
    np.testing.assert_array_equal(again.indices[:8], cache.indices[:8])
    # and KD trains from such a cache
    run_distill(teacher, student, corpus_jsonl, tmp_path / "cached",
                small_config(steps=4).model_copy(update={"teacher_cache": str(tmp_path / "train-cache"), "teacher_cache_top_k": 8, "teacher_cache_tail_samples": 24}))
    log = train_log(tmp_path / "cached")
    assert log[-1]["logit_kl"] < log[0]["logit_kl"]


def open_cache(teacher, corpus, directory, top_k=16, tail_samples=0):
    tokenizer = load_tokenizer(teacher)
    packed = prepare_data(data_settings(corpus, SEQ_LEN), tokenizer)
    fingerprint = cache_fingerprint(model_fingerprint(teacher), tokenizer_fingerprint(tokenizer), packed.directory.name, SEQ_LEN, TINY_VOCAB,
                                    top_k, tail_samples, 1.0, "float32")
    rows = packed.split("train")
    return open_teacher_cache(directory, fingerprint, rows, writable=True), rows


def cache_arrays(directory):
    return {name: np.load(directory / f"{name}.npy") for name in ("indices", "log_probs", "rest")}


def test_an_interrupted_build_resumes_and_a_truncated_array_is_rebuilt(teacher, corpus_jsonl, tmp_path, monkeypatch, caplog):
    model = load_model(teacher)
    needed = np.arange(40)
    reference, rows = open_cache(teacher, corpus_jsonl, tmp_path / "reference")
    assert fill_teacher_cache(reference, model, rows, needed, batch_size=4, device="cpu") == 40

    # a crash in the middle of the second shard (16 rows each): its first batch is written but the shard is not marked built
    real_entries, calls = teacher_cache.teacher_entries, []

    def crashing(*args):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_entries(*args)

    cache, _ = open_cache(teacher, corpus_jsonl, tmp_path / "cache")
    monkeypatch.setattr(teacher_cache, "teacher_entries", crashing)
    with pytest.raises(KeyboardInterrupt):
        fill_teacher_cache(cache, model, rows, needed, batch_size=4, device="cpu")
    monkeypatch.setattr(teacher_cache, "teacher_entries", real_entries)
    reopened, _ = open_cache(teacher, corpus_jsonl, tmp_path / "cache")
    assert reopened.built.sum() == 16  # only the finished shard counts
    assert fill_teacher_cache(reopened, model, rows, needed, batch_size=4, device="cpu") == 24
    expected = cache_arrays(tmp_path / "reference")
    for name, array in cache_arrays(tmp_path / "cache").items():
        np.testing.assert_array_equal(array[:40], expected[name][:40])

    # a file cut short (a crash of the file system, a partial copy) is never read: every row is rebuilt
    damaged = tmp_path / "cache" / "log_probs.npy"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 3])
    with caplog.at_level(logging.WARNING):
        rebuilt, _ = open_cache(teacher, corpus_jsonl, tmp_path / "cache")
    assert "rebuilding every row" in caplog.text and not rebuilt.built.any()
    assert fill_teacher_cache(rebuilt, model, rows, needed, batch_size=4, device="cpu") == 40
    for name, array in cache_arrays(tmp_path / "cache").items():
        np.testing.assert_array_equal(array[:40], expected[name][:40])


def test_a_cache_of_another_teacher_or_sequence_length_is_refused_in_one_line(teacher, student, make_tiny_model, corpus_jsonl, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert cli_main(distill_args(teacher, student, corpus_jsonl, tmp_path / "first", "--steps", "1", "--teacher-cache", str(cache))) == 0
    assert json.loads((cache / "cache.json").read_text())["teacher"] == model_fingerprint(teacher)
    capsys.readouterr()
    other_teacher = make_tiny_model("other-teacher", seed=5)
    cases = {
        "teacher": distill_args(other_teacher, student, corpus_jsonl, tmp_path / "a", "--steps", "1", "--teacher-cache", str(cache)),
        "data, seq_len": with_flags(distill_args(teacher, student, corpus_jsonl, tmp_path / "b", "--steps", "1", "--teacher-cache", str(cache)), {"--seq-len": 32}),
        "temperature": distill_args(teacher, student, corpus_jsonl, tmp_path / "c", "--steps", "1", "--teacher-cache", str(cache), "--temperature", "2"),
        "tail_samples": distill_args(teacher, student, corpus_jsonl, tmp_path / "f", "--steps", "1", "--teacher-cache", str(cache), "--teacher-cache-tail-samples", "4"),
    }
    for differing, args in cases.items():
        assert cli_main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"was built for another {differing}" in err, err
    assert cli_main(distill_args(teacher, student, corpus_jsonl, tmp_path / "d", "--steps", "1", "--teacher-cache", str(tmp_path / "first" / "eval.json"))) == 2
    assert "is a file" in capsys.readouterr().err
    assert cli_main(distill_args(teacher, student, corpus_jsonl, tmp_path / "e", "--steps", "1", "--teacher-cache", str(cache),
                                 "--intermediate-loss", "cosine", "--intermediate-loss-weight", "1")) == 2
    assert "holds logits only" in capsys.readouterr().err


def test_teacher_cache_runs_without_a_final_eval_never_load_the_teacher(teacher, student, corpus_jsonl, tmp_path, monkeypatch):
    config = small_config(steps=2).model_copy(update={"teacher_cache": str(tmp_path / "cache")})
    run_distill(teacher, student, corpus_jsonl, tmp_path / "build", config)

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded although the cache holds every row")

    from toolchain import distill as distill_module

    monkeypatch.setattr(distill_module, "load_frozen_model", no_teacher)
    from toolchain.distill import distill

    summary = distill(str(teacher), str(student), tmp_path / "reuse", config, data_settings(corpus_jsonl, SEQ_LEN), cpu(), EvalConfig(max_batches=0))
    assert summary["steps"] == 2 and summary["eval"] is None
