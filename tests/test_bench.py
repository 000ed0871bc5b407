"""`minitron bench`: a teacher and a student CPU engine measured through real Triton servers; failures fail the benchmark."""

import json
import socket

import pytest
from conftest import data_settings, run_cli, write_engine_manifest

from toolchain.bench import bench, percentile
from toolchain.build import build
from toolchain.engine_profile import load_profile
from toolchain.errors import UserError
from toolchain.settings import BenchConfig, DataConfig, ServeConfig


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
        build(load_profile("cpu-fp32"), str(model), root / name, DataConfig())
    return root / "teacher-engine", root / "student-engine"


@pytest.fixture(scope="module")
def student_url(engines):
    """The student engine served as a running server is: bench gets its gRPC HOST:PORT."""
    from toolchain.serve import serving

    with serving(engines[1], ServeConfig(threads=1)) as running:
        yield running.endpoints.grpc


@pytest.mark.slow
def test_bench_teacher_engine_and_student_server(engines, student_url, corpus_jsonl, tmp_path):
    teacher_engine, _ = engines
    results = bench([str(teacher_engine), student_url], BenchConfig(input_len=16, output_len=8, concurrency=[1, 2], requests=3, threads=1),
                    data_settings(corpus_jsonl), ServeConfig(), out=tmp_path / "out", labels=["teacher", "student"])
    assert [t["target"] for t in results["targets"]] == [str(teacher_engine), student_url]
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


def run_bench(targets, **kwargs):
    return bench(targets, BenchConfig(), DataConfig(), ServeConfig(), **kwargs)


def test_bench_bad_targets(tmp_path, tiny_model, cli):
    with pytest.raises(UserError, match="neither an engine directory nor a HOST:PORT"):
        run_bench(["no-such-engine"])
    with pytest.raises(UserError, match="--tokenizer"):
        run_bench(["127.0.0.1:1"])
    with pytest.raises(UserError, match="no manifest.json"):
        run_bench([str(tiny_model)])
    with pytest.raises(UserError, match="--labels names 2 targets but 1"):
        run_bench([str(tiny_model)], labels=["a", "b"])
    for flags, message in ((["--requests", "0"], "invalid --requests"), (["--max-error-rate", "1.5"], "invalid --max-error-rate"),
                           (["--concurrency", "0"], "invalid --concurrency"), (["--concurrency", ""], "invalid --concurrency")):
        result = cli("bench", tiny_model, *flags)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_bench_checks_its_out_and_targets_before_measuring(tmp_path, tiny_model, tokenizer_dir):
    (tmp_path / "file").write_text("keep")
    with pytest.raises(UserError, match="--out .*file is a file"):
        run_bench(["127.0.0.1:1"], tokenizer=str(tiny_model), out=tmp_path / "file")
    with pytest.raises(UserError, match="--out .*lies below .*file, which is a file"):
        run_bench(["127.0.0.1:1"], tokenizer=str(tiny_model), out=tmp_path / "file" / "results")
    assert (tmp_path / "file").read_text() == "keep"
    trtllm_engine = tmp_path / "trtllm-engine"
    for part in ("engine", "tokenizer"):
        (trtllm_engine / part).mkdir(parents=True)
    write_engine_manifest(trtllm_engine, "h100-fp8", "tensorrt-llm", "engine", built=False)
    with pytest.raises(UserError, match="cannot be served here: TensorRT-LLM engines run on a GPU.*pass its gRPC HOST:PORT instead"):
        run_bench([str(trtllm_engine)])


def test_bench_fails_when_requests_fail_unless_told_to_tolerate_them(tiny_model, corpus_jsonl, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nothing = f"127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there
    workload = ["--tokenizer", tiny_model, "--data", corpus_jsonl, "--input-len", "8", "--output-len", "2", "--requests", "3",
                "--concurrency", "1,2", "--out", tmp_path / "out"]
    failed = run_cli("bench", nothing, *workload)
    error = failed.stderr.splitlines()[-1]  # after the data's log line
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    assert error.startswith(f"minitron bench: error: 6 of 6 requests to {nothing} failed") and "found no Triton gRPC endpoint" in error
    assert "--max-error-rate" in error and not (tmp_path / "out").exists()
    tolerated = run_cli("bench", nothing, *workload, "--max-error-rate", "1", "--json")
    assert tolerated.returncode == 0, tolerated.stderr
    assert [level["errors"] for level in json.loads(tolerated.stdout)["targets"][0]["levels"]] == [3, 3]
    assert json.loads((tmp_path / "out" / "bench.json").read_text()) == json.loads(tolerated.stdout)
