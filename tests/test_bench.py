"""`minitron bench`: a tiny teacher and student on the torch and CPU-engine backends and through real Triton servers; refusals (toolchain/bench/harness.py, runners.py)."""

import json
import socket
from pathlib import Path

import pytest
from conftest import data_settings, run_cli, save_tiny_model, write_engine_manifest

from toolchain.bench.bound import Device, ModelCost, load_point_bound, precision_of
from toolchain.bench.harness import bench, student_speedup
from toolchain.build import build
from toolchain.engine_profile import load_profile
from toolchain.errors import UserError
from toolchain.settings import BenchConfig, DataConfig, ServeConfig

SMOKE = {"input_len": 16, "output_len": 6, "requests": 3, "warmup": 1, "concurrency": [1, 2]}
LATENCIES = ("ttft_ms", "itl_ms", "e2e_ms")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("bench")
    return (save_tiny_model(root / "teacher", tokenizer_dir, num_hidden_layers=4, max_position_embeddings=2048),
            save_tiny_model(root / "student", tokenizer_dir, num_hidden_layers=2, seed=1, max_position_embeddings=2048))


@pytest.fixture(scope="module")
def engines(models):
    built = []
    for model in models:
        build(load_profile("cpu-fp32"), str(model), model.parent / f"{model.name}-engine", DataConfig())
        built.append(model.parent / f"{model.name}-engine")
    return built


def settings(backend: str, **workload) -> BenchConfig:
    return BenchConfig(backend=backend, workload="cpu-smoke", workload_overrides={**SMOKE, **workload}, profiles=["cpu-fp32", "h100-fp8"])


def check_results(results: dict, out, labels=("teacher", "student")) -> None:
    """What every backend's results must hold: the issue's keys, bounds, speedups, projection, environment, and the files."""
    assert [model["label"] for model in results["models"]] == list(labels)
    for model in results["models"]:
        assert [point["load"] for point in model["load_points"]] == [{"concurrency": 1}, {"concurrency": 2}]
        for point in model["load_points"]:
            assert point["requests"] == 3 and point["errors"] == 0
            for key in LATENCIES:
                stats = point[key]
                assert set(stats) >= {"mean", "p50", "p90", "p95", "p99"} and 0 < stats["p50"] <= stats["p90"] <= stats["p95"] <= stats["p99"]
            assert point["ttft_ms"]["p50"] <= point["e2e_ms"]["p50"]
            assert point["requests_per_s"] > 0 and point["output_tokens_per_s"] > 0 and point["output_tokens_per_s_per_user"] > 0
            assert 0 < point["output_tokens_per_request"] <= 6
            assert point["bound"]["tokens_per_s"] > 0 and point["bound"]["fraction"] > 0 and point["bound"]["bytes_per_token"] > 0
            assert point["harness"]["seconds_per_token"] > 0
    teacher_points, student_points = (model["load_points"] for model in results["models"])
    assert teacher_points[0]["bound"]["batch"] == student_points[0]["bound"]["batch"] == 1  # one client: batch 1 for both
    for point in student_points:
        speedup = point["speedup"]
        assert speedup["output_tokens_per_s"] > 0 and speedup["fraction_of_bound"] == pytest.approx(speedup["output_tokens_per_s"] / speedup["bound"])
        assert speedup["bytes_ratio"] > 1.5  # 2 of 4 layers: about half the bytes (the lm_head is shared), at the student's batch
    assert "speedup" not in results["models"][0]["load_points"][0]
    assert results["bound_device"]["bandwidth_gb_s"] > 0 and "measured here" in results["bound_device"]["source"]
    assert results["environment"]["libraries"]["torch"] and results["environment"]["cpu"]
    projected = results["projection"]["profiles"]
    assert set(projected) == {"cpu-fp32", "h100-fp8"} and projected["h100-fp8"]["models"]["student"]["speedup"]["batch1_decode"] > 1
    assert json.loads((out / "results.json").read_text()) == results
    report = (out / "results.md").read_text()
    assert "| student | 2 clients |" in report and "Projected (projected" in report and "![speedup.png](speedup.png)" in report
    for name in results["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(results["plots"]) == 3


def test_bytes_ratio_compares_both_models_at_the_students_batch():
    """Teacher and student round their own measured batch (1.4 -> 1, 1.6 -> 2); the bytes ratio must not compare the two batches."""
    from transformers import AutoConfig

    configs = Path(__file__).resolve().parent.parent / "benchmarks" / "configs"
    teacher, student = (ModelCost.from_config(AutoConfig.from_pretrained(configs / name), precision_of("bfloat16"))
                        for name in ("llama-3.1-8b", "llama-3.1-minitron-4b-depth"))
    device = Device("cpu", bandwidth=20e9, peak_flops={"bfloat16": 100e9}, memory=None, source="test")
    point = {"itl_ms": {"mean": 100.0}, "input_tokens_per_request": 128, "output_tokens_per_request": 128,
             "output_tokens_per_s": 10.0, "ttft_ms": {"p50": 1.0}, "e2e_ms": {"p50": 1.0}}
    teacher_point = {**point, "mean_decoding": 1.4, "bound": load_point_bound(teacher, device, {**point, "mean_decoding": 1.4}, 8)}
    student_point = {**point, "mean_decoding": 1.6, "bound": load_point_bound(student, device, {**point, "mean_decoding": 1.6}, 8)}
    assert (teacher_point["bound"]["batch"], student_point["bound"]["batch"]) == (1, 2)
    ratio = student_speedup(student_point, teacher_point, teacher)["bytes_ratio"]
    at_batch_2 = teacher.decode_step(2, 192).bytes / student.decode_step(2, 192).bytes
    assert ratio == pytest.approx(at_batch_2) and 1.5 < ratio < 2  # half the layers, the same lm_head
    assert student_speedup(student_point, teacher_point, None)["bytes_ratio"] is None  # no teacher config: no ratio


def test_torch_backend_end_to_end(models, corpus_jsonl, tmp_path):
    results = bench(str(models[0]), [str(models[1])], settings("torch", prompts="data"), data_settings(corpus_jsonl), ServeConfig(),
                    out=tmp_path / "out", labels=["teacher", "student"])
    check_results(results, tmp_path / "out")
    assert results["models"][0]["cost"]["precision"] == "float32, KV float32"


@pytest.mark.slow
def test_cpu_engine_backend_end_to_end(engines, tmp_path):
    results = bench(str(engines[0]), [str(engines[1])], settings("cpu-engine"), DataConfig(), ServeConfig(), out=tmp_path / "out",
                    labels=["teacher", "student"])
    check_results(results, tmp_path / "out")


@pytest.fixture(scope="module")
def student_url(engines):
    """The student engine served as a running server is: bench gets its gRPC HOST:PORT."""
    from toolchain.serve import serving

    with serving(engines[1], ServeConfig(threads=1)) as running:
        yield running.endpoints.grpc


@pytest.mark.slow
def test_triton_backend_end_to_end(engines, tmp_path):
    results = bench(str(engines[0]), [str(engines[1])], settings("triton"), DataConfig(), ServeConfig(), out=tmp_path / "out",
                    labels=["teacher", "student"])
    check_results(results, tmp_path / "out")


@pytest.mark.slow
def test_todays_form_an_engine_and_a_running_server(engines, student_url, tmp_path):
    """`minitron bench ENGINE HOST:PORT` as before: the teacher's engine served here, the student at a URL (no bound: its machine is unknown)."""
    result = run_cli("bench", engines[0], student_url, "--labels", "teacher,student", "--input-len", "12", "--output-len", "4",
                     "--requests", "2", "--concurrency", "1", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["backend"] == "triton" and written["command"].startswith("minitron bench ")
    teacher, student = written["models"]
    assert teacher["load_points"][0]["bound"]["fraction"] > 0 and student["load_points"][0]["bound"] is None
    assert "running server" in student["no_bound_reason"] and written["projection"] is None
    assert student["load_points"][0]["speedup"]["output_tokens_per_s"] > 0 and "| student | 1 client |" in result.stdout


def test_refusals_before_any_work(models, engines_or_none, tmp_path, tokenizer_dir):
    teacher, student = map(str, models)
    run = lambda backend, *students, **kwargs: bench(teacher, list(students), settings(backend), DataConfig(), ServeConfig(), **kwargs)  # noqa: E731
    with pytest.raises(UserError, match="--backend trtllm cannot run here: tensorrt_llm is not importable here"):
        run("trtllm", student)
    with pytest.raises(UserError, match="is a Hugging Face model, not an engine directory: .* or benchmark the model itself with --backend torch"):
        run("cpu-engine", student)
    with pytest.raises(UserError, match="is an engine directory; --backend torch runs Hugging Face models"):
        bench(str(engines_or_none), [student], settings("torch"), DataConfig(), ServeConfig())
    with pytest.raises(UserError, match="--url names models on a running Triton server; measure them with --backend triton, not torch"):
        run("torch", student, url="127.0.0.1:8001")
    with pytest.raises(UserError, match="--labels names 3 models but 2 were given"):
        run("torch", student, labels=["a", "b", "c"])
    with pytest.raises(UserError, match="labels must differ"):
        run("torch", student, labels=["a", "a"])
    with pytest.raises(UserError, match="neither a directory nor a built-in model"):
        run("torch", "no-such-model")
    with pytest.raises(UserError, match="unknown engine profile 'gpu-x'"):
        bench(teacher, [student], settings("torch").model_copy(update={"profiles": ["gpu-x"]}), DataConfig(), ServeConfig())
    other = save_tiny_model(tmp_path / "other-vocabulary", tokenizer_dir, num_hidden_layers=2)
    swapped = json.loads((other / "tokenizer.json").read_text())
    vocabulary = swapped["model"]["vocab"]
    vocabulary["a"], vocabulary["b"] = vocabulary["b"], vocabulary["a"]  # same tokens, other ids: another tokenizer
    (other / "tokenizer.json").write_text(json.dumps(swapped))
    with pytest.raises(UserError, match="has another tokenizer than the teacher"):
        run("torch", str(other))
    with pytest.raises(UserError, match="needs up to 16 \\+ 4000 tokens per sequence but .*teacher holds at most 2048"):
        bench(teacher, [student], settings("torch", output_len=4000), DataConfig(), ServeConfig())
    (tmp_path / "file").write_text("keep")
    with pytest.raises(UserError, match="--out .*file is a file"):
        run("torch", student, out=tmp_path / "file")
    assert (tmp_path / "file").read_text() == "keep"


@pytest.fixture
def engines_or_none(tmp_path):
    """A directory with a manifest, as the torch backend must refuse it (no build needed)."""
    engine = tmp_path / "engine"
    for part in ("engine", "tokenizer"):
        (engine / part).mkdir(parents=True)
    write_engine_manifest(engine, "cpu-fp32", "onnxruntime-genai", "engine")
    return engine


def test_bad_command_lines_are_one_line_errors(cli, tiny_model, tmp_path):
    trtllm_engine = tmp_path / "trtllm-engine"
    for part in ("engine", "tokenizer"):
        (trtllm_engine / part).mkdir(parents=True)
    write_engine_manifest(trtllm_engine, "h100-fp8", "tensorrt-llm", "engine", built=False)
    for args, message in ((["--teacher", tiny_model, "--backend", "vllm"], "argument --backend: invalid choice: 'vllm'"),
                          (["--teacher", tiny_model, "--concurrency", "0"], "every concurrency must be positive"),
                          (["--teacher", tiny_model, "--concurrency", ""], "--concurrency: List should have at least 1 item"),
                          (["--teacher", tiny_model, "--requests", "0"], "requests must be positive"),
                          (["--teacher", tiny_model, "--max-error-rate", "1.5"], "invalid --max-error-rate"),
                          (["--teacher", tiny_model, "--workload", "gpu-nothing"], "unknown workload 'gpu-nothing'"),
                          ([], "name the teacher"),
                          ([tiny_model, "--teacher", tiny_model], "not both"),
                          (["no-such-engine"], "neither an engine directory nor a HOST:PORT URL"),
                          (["127.0.0.1:1"], "--tokenizer"),
                          ([trtllm_engine], "cannot be served here: TensorRT-LLM engines run on a GPU")):
        result = cli("bench", *args)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)


def test_failed_requests_fail_the_benchmark_unless_tolerated(tiny_model, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nothing = f"127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there
    workload = ["--tokenizer", tiny_model, "--input-len", "8", "--output-len", "2", "--requests", "3", "--warmup", "0", "--concurrency", "1,2",
                "--out", tmp_path / "out"]
    failed = run_cli("bench", nothing, *workload)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith(f"minitron bench: error: 6 of 6 requests to {nothing} failed") and "found no Triton gRPC endpoint" in error
    assert "--max-error-rate" in error and not (tmp_path / "out").exists()
    tolerated = run_cli("bench", nothing, *workload, "--max-error-rate", "1", "--json")
    assert tolerated.returncode == 0, tolerated.stderr
    printed = json.loads(tolerated.stdout)
    assert [point["errors"] for point in printed["models"][0]["load_points"]] == [3, 3]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["models"] == printed["models"]


@pytest.mark.slow
def test_gpu_check_runs_with_torch_and_transformers_alone(tmp_path):
    """benchmarks/gpu_check.py --tiny: the GPU script's logic on this CPU, with every package but torch and transformers made unimportable."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    blocked = ("pydantic", "onnxruntime_genai", "tritonclient", "matplotlib", "modelopt", "pytriton")
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({blocked!r})); sys.argv = ['gpu_check.py', '--tiny', '--out', {str(tmp_path)!r}]; "
            f"runpy.run_path({str(script)!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "gpu_check_tiny.json").read_text())
    assert [model["model"] for model in written["models"]] == ["8B", "4B-Width", "4B-Depth"] and written["skipped"] == []
    for model in written["models"]:
        assert [point["batch"] for point in model["load_points"]] == [1, 4]
        assert all(point["measured"]["errors"] == 0 and point["measured"]["output_tokens_per_request"] == 8 for point in model["load_points"])
    assert written["models"][1]["load_points"][0]["speedup"]["measured"] > 0
    assert written["distillation"]["step"]["seconds"] > 0 and written["distillation"]["step"]["loss"] >= 0
