"""`minitron run`: a whole recipe on a tiny teacher, resumable, refusing a different recipe in the same folder."""

import json

import pytest
import yaml

from toolchain.errors import UserError
from toolchain.pipeline import run_pipeline
from toolchain.recipe import load_recipe


@pytest.fixture
def tiny_recipe(tmp_path, make_tiny_model, corpus_jsonl):
    tiny_model = make_tiny_model("teacher", max_position_embeddings=2048)  # the cpu-fp32 profile serves up to 2048 tokens
    recipe = {
        "name": "tiny",
        "output_dir": str(tmp_path / "run"),
        "teacher": {"model": str(tiny_model), "device": "cpu"},
        "data": {"spec": str(corpus_jsonl), "seq_len": 32, "eval_fraction": 0.1, "calibration_fraction": 0.1},
        "eval": {"batch_size": 4, "max_batches": 2},
        "students": [
            {"name": "width", "prune": {"hidden_size": 32, "ffn_hidden_size": 64, "calibration_samples": 8}},
            {"name": "depth", "prune": {"num_layers": 2, "depth_method": "block_importance", "calibration_samples": 8}},
        ],
        "distill": {"steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1, "save_every": 1},
        "quantize": {"format": "fp8", "calibration_samples": 4},
        "export": {"format": "trtllm", "dtype": "bfloat16"},
        "engine": {"profile": "cpu-fp32"},
        "bench": {"input_len": 16, "output_len": 4, "concurrency": [1], "requests": 2},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_run_whole_pipeline_then_resume(tiny_recipe, tmp_path):
    summary = run_pipeline(load_recipe(str(tiny_recipe)))
    run_dir = tmp_path / "run"
    assert [s["name"] for s in summary["students"]] == ["width", "depth"]
    for student in summary["students"]:
        assert student["parameters"] < summary["teacher"]["parameters"]
        assert student["distilled"]["kl"] >= 0 and student["pruned"]["perplexity"] > 1
        student_dir = run_dir / "students" / student["name"]
        manifest = json.loads((student_dir / "engine" / "manifest.json").read_text())
        assert manifest["backend"] == "onnxruntime-genai" and manifest["source_model"] == str(student_dir / "distilled")
        assert student["quantized"]["format"] == "fp8" and student["quantized"]["perplexity_after"] > 1
        trtllm_config = json.loads((student_dir / "export-trtllm" / "config.json").read_text())
        assert trtllm_config["quantization"]["quant_algo"] == "FP8" and (student_dir / "export-trtllm" / "rank0.safetensors").is_file()
    bench = summary["bench"]
    assert [t["target"] for t in bench["targets"]] == [str(run_dir / "teacher-engine")] + [s["engine"] for s in summary["students"]]
    assert [t["label"] for t in bench["targets"]] == ["teacher", "width", "depth"]
    assert all(level["errors"] == 0 for t in bench["targets"] for level in t["levels"])
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert "| width (distilled) |" in (run_dir / "summary.md").read_text()
    # A rerun finds every stage done and returns the same summary without recomputing.
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.rglob("eval.json")}
    assert run_pipeline(load_recipe(str(tiny_recipe))) == summary
    assert stamps == {p: p.stat().st_mtime_ns for p in run_dir.rglob("eval.json")}


def test_different_recipe_in_same_folder_refused(tiny_recipe):
    run_pipeline(load_recipe(str(tiny_recipe), ["students=[]", "engine.profile=null"]))
    with pytest.raises(UserError, match="different recipe"):
        run_pipeline(load_recipe(str(tiny_recipe), ["students=[]", "engine.profile=null", "eval.max_batches=1"]))


def test_recipe_without_teacher_refused(cli):
    result = cli("run", "llama-3.1-8b-minitron-4b-width")
    assert result.returncode == 2 and "--teacher" in result.stderr
