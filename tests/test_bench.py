"""`minitron bench`: a teacher and a student CPU engine measured through real Triton servers."""

import json

import pytest

from toolchain.bench import bench, percentile
from toolchain.build import build
from toolchain.errors import UserError


def test_percentile_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 90), percentile(values, 99)) == (50.0, 90.0, 99.0)
    assert percentile([3.0], 99) == 3.0


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tokenizer_dir):
    from conftest import save_tiny_model

    root = tmp_path_factory.mktemp("bench")
    teacher = save_tiny_model(root / "teacher", tokenizer_dir, num_hidden_layers=4, max_position_embeddings=2048)
    student = save_tiny_model(root / "student", tokenizer_dir, num_hidden_layers=2, seed=1, max_position_embeddings=2048)
    for name, model in (("teacher-engine", teacher), ("student-engine", student)):
        build("cpu-fp32", str(model), root / name)
    return root / "teacher-engine", root / "student-engine"


@pytest.mark.slow
def test_bench_teacher_and_student_engines(engines, corpus_jsonl, tmp_path):
    teacher_engine, student_engine = engines
    results = bench([str(teacher_engine), str(student_engine)], data=str(corpus_jsonl), input_len=16, output_len=8,
                    concurrency=[1, 2], requests=3, threads=1, out=tmp_path / "out", labels=["teacher", "student"])
    assert [t["target"] for t in results["targets"]] == [str(teacher_engine), str(student_engine)]
    for target in results["targets"]:
        for level in target["levels"]:
            assert level["requests"] == 3 and level["errors"] == 0
            assert 0 < level["output_tokens_per_request"] <= 8 + 1  # one response per token, one more if the text ends mid-character
            for stats in (level["ttft_s"], level["latency_s"]):
                assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
            assert level["ttft_s"]["p50"] <= level["latency_s"]["p50"]
    assert all(level["vs_first"]["output_tokens_per_second"] == pytest.approx(1.0) for level in results["targets"][0]["levels"])
    assert json.loads((tmp_path / "out" / "bench.json").read_text()) == results
    assert "| student | 2 |" in (tmp_path / "out" / "bench.md").read_text()


def test_bench_bad_targets(tmp_path, tiny_model):
    with pytest.raises(UserError, match="neither an engine directory nor a HOST:PORT"):
        bench(["no-such-engine"])
    with pytest.raises(UserError, match="--tokenizer"):
        bench(["127.0.0.1:1"])
    with pytest.raises(UserError, match="no manifest.json"):
        bench([str(tiny_model)])
    with pytest.raises(UserError, match="must be positive"):
        bench([str(tiny_model)], requests=0)
    with pytest.raises(UserError, match="--labels names 2 targets but 1"):
        bench([str(tiny_model)], labels=["a", "b"])
