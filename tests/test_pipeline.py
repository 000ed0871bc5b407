"""`minitron run`: a whole recipe on a tiny teacher; stage records rerun exactly what changed; resume; refusals."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from toolchain.errors import UserError
from toolchain.pipeline import run_pipeline
from toolchain.recipe import load_recipe


def write_recipe(tmp_path, teacher, corpus, **changes) -> str:
    recipe = {
        "name": "tiny",
        "output_dir": str(tmp_path / "run"),
        "teacher": {"model": str(teacher)},
        "compute": {"dtype": "float32", "device": "cpu"},
        "data": {"spec": str(corpus), "seq_len": 32, "eval_fraction": 0.1, "calibration_fraction": 0.1},
        "eval": {"batch_size": 4, "max_batches": 2},
        "importance": {"calibration_samples": 8},
        "students": [
            {"name": "width", "prune": {"hidden_size": 32, "ffn_hidden_size": 64}},
            {"name": "depth", "prune": {"num_layers": 2, "depth_method": "block_importance"}},
        ],
        "distill": {"steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1, "save_every": 1},
        "engine": {"profile": None},
    }
    for key, value in changes.items():  # section__field=value, or section=value
        section, _, field = key.partition("__")
        recipe[section] = {**recipe[section], field: value} if field else value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.fixture
def teacher(make_tiny_model):
    return make_tiny_model("teacher", max_position_embeddings=2048)  # the cpu-fp32 profile serves up to 2048 tokens


@pytest.mark.slow
def test_run_whole_pipeline_then_rerun_and_change_the_bench(teacher, tmp_path, tokenizer_dir, isolated_cache):
    """Non-default split fractions and text field reach every stage that reads data, the bench included."""
    body = tmp_path / "body.jsonl"
    from conftest import corpus_documents

    body.write_text("".join(json.dumps({"body": doc}) + "\n" for doc in corpus_documents()))
    recipe = write_recipe(tmp_path, teacher, body, data__text_field="body", data__eval_fraction=0.15, data__calibration_fraction=0.12)
    overrides = ["quantize.format=fp8", "quantize.calibration_samples=4", "export.format=trtllm", "export.dtype=bfloat16",
                 "engine.profile=cpu-fp32", "bench.workload_overrides={input_len: 16, output_len: 4, concurrency: [1], requests: 2, prompts: data}"]
    summary = run_pipeline(load_recipe(recipe, overrides))
    run_dir = tmp_path / "run"
    assert [s["name"] for s in summary["students"]] == ["width", "depth"]
    teacher_tokens = summary["teacher"]["eval"]["tokens"]
    for student in summary["students"]:
        assert student["parameters"] < summary["teacher"]["parameters"]
        assert student["distilled"]["kl"] >= 0 and student["pruned"]["perplexity"] > 1
        assert student["pruned"]["tokens"] == student["distilled"]["tokens"] == teacher_tokens  # the same rows for every row of the report
        student_dir = run_dir / "students" / student["name"]
        manifest = json.loads((student_dir / "engine" / "manifest.json").read_text())
        assert manifest["source_model"] == str(student_dir / "distilled")
        assert student["quantized"]["format"] == "fp8" and student["quantized"]["perplexity_after"] > 1
        trtllm_config = json.loads((student_dir / "export-trtllm" / "config.json").read_text())
        assert trtllm_config["quantization"]["quant_algo"] == "FP8" and (student_dir / "export-trtllm" / "rank0.safetensors").is_file()
    bench = summary["bench"]
    assert [model["label"] for model in bench["models"]] == ["teacher", "width", "depth"]
    assert all(point["errors"] == 0 and point["bound"]["fraction"] > 0 for model in bench["models"] for point in model["load_points"])
    assert all(model["load_points"][0]["speedup"]["bound"] > 1 for model in bench["models"][1:])
    assert set(bench["projection"]["profiles"]) == {"cpu-fp32"}  # the recipe's target profile, on this CPU as measured
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    report = (run_dir / "summary.md").read_text()
    assert "| width (distilled) |" in report and "| depth | 1 client |" in report and "| cpu-fp32 | width |" in report
    assert "![speedup.png](bench/speedup.png)" in report and (run_dir / "bench" / "speedup.png").is_file()
    packed = [json.loads(meta.read_text()) for meta in (isolated_cache / "data").glob("*/meta.json")]
    packed = [meta for meta in packed if meta["spec"] == str(body)]
    assert {meta["seq_len"] for meta in packed} == {32, 16}  # the stages' sequences and the bench prompts
    assert all((meta["text_field"], meta["eval_fraction"], meta["calibration_fraction"]) == ("body", 0.15, 0.12) for meta in packed)

    again = run_pipeline(load_recipe(recipe, overrides))
    assert again["stages"]["ran"] == [] and {k: v for k, v in again.items() if k != "stages"} == {k: v for k, v in summary.items() if k != "stages"}
    changed = run_pipeline(load_recipe(recipe, overrides + ["bench.workload_overrides.requests=3"]))
    assert changed["stages"]["ran"] == ["bench"]


def ran_after(recipe: str, *overrides: str) -> list[str]:
    return run_pipeline(load_recipe(recipe, list(overrides)))["stages"]["ran"]


def test_a_changed_setting_reruns_its_stage_and_what_depends_on_it(teacher, corpus_jsonl, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    loaded = []
    from_pretrained = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda path, *a, **k: loaded.append(str(path)) or from_pretrained(path, *a, **k))
    recipe = write_recipe(tmp_path, teacher, corpus_jsonl)
    first = ran_after(recipe)
    assert loaded.count(str(teacher)) == 1  # eval, importance, pruning and distillation of both students share one teacher
    width = ["students/width/pruned", "students/width/pruned-eval", "students/width/distilled", "students/width/distilled-eval"]
    depth = [stage.replace("width", "depth") for stage in width]
    assert first == ["teacher-eval", "importance", *width, *depth]
    assert ran_after(recipe) == []
    assert ran_after(recipe, "students.width.prune.ffn_hidden_size=96") == width
    assert ran_after(recipe, "students.width.prune.ffn_hidden_size=96", "distill.lr=3e-4") == [width[2], width[3], depth[2], depth[3]]
    assert ran_after(recipe, "students.width.prune.ffn_hidden_size=96", "distill.lr=3e-4", "eval.max_batches=1") == [
        "teacher-eval", width[1], width[3], depth[1], depth[3]]
    assert ran_after(recipe, "students.width.prune.ffn_hidden_size=96", "distill.lr=3e-4", "eval.max_batches=1",
                     "importance.calibration_samples=6") == ["importance", *width, *depth]
    assert not list((tmp_path / "run").rglob(".*.*"))  # no work directory left behind


def test_a_folder_that_is_not_a_run_is_refused_and_left_alone(teacher, corpus_jsonl, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no run of this toolchain"):
        run_pipeline(load_recipe(write_recipe(tmp_path, teacher, corpus_jsonl)))
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]


def test_a_bad_recipe_is_refused_before_anything_is_written(teacher, corpus_jsonl, tmp_path, cli):
    result = cli("run", write_recipe(tmp_path, teacher, corpus_jsonl), "--set", "students.width.prune.hidden_size=4096")
    assert result.returncode == 2 and "students.width.prune.hidden_size 4096 is larger than the model's 64" in result.stderr
    assert not (tmp_path / "run").exists()


def test_recipe_without_teacher_refused(cli):
    result = cli("run", "llama-3.1-8b-minitron-4b-width")
    assert result.returncode == 2 and "--teacher" in result.stderr


@pytest.mark.slow
def test_an_interrupted_teacher_correction_resumes(teacher, corpus_jsonl, tmp_path):
    recipe = write_recipe(tmp_path, teacher, corpus_jsonl, students=[], distill__save_every=2)
    args = [sys.executable, "-m", "toolchain", "run", recipe, "--set", "teacher.correction.tokens=1536", "--set", "teacher.correction.lr=1e-3"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "run").glob(".teacher-corrected.*/checkpoints/step-00000002")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "rerun the same command to continue" in stderr
    assert not (tmp_path / "run" / "teacher-corrected").exists()
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    log = [json.loads(line) for line in (tmp_path / "run" / "teacher-corrected" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 13))  # 1536 tokens / (4 x 32) = 12 steps, none repeated


@pytest.mark.slow
def test_a_search_student_distills_the_shape_its_search_chose(teacher, corpus_jsonl, tmp_path, monkeypatch):
    search = {"budget": "non_embedding=50%", "hidden_multiple": 16, "ffn_multiple": 32, "max_candidates": 1, "tokens": 256}
    recipe = write_recipe(tmp_path, teacher, corpus_jsonl, students=[{"name": "found", "search": search}])
    summary = run_pipeline(load_recipe(recipe))
    student_dir = tmp_path / "run" / "students" / "found"
    candidates = json.loads((student_dir / "search" / "candidates.json").read_text())
    chosen = next(c for c in candidates["candidates"] if c["id"] == candidates["chosen"])
    assert summary["students"][0]["search"]["chosen"] == chosen["shape"] and chosen["rank"] == 1
    assert json.loads((student_dir / "distilled" / "config.json").read_text())["hidden_size"] == chosen["shape"]["hidden_size"]
    assert "Shapes chosen by search:" in (tmp_path / "run" / "summary.md").read_text()
    assert "importance" not in summary["stages"]["ran"]  # the search scores its own candidates
    assert ran_after(recipe) == []


def test_a_student_with_targets_and_a_search_is_refused(teacher, corpus_jsonl, tmp_path):
    both = {"name": "both", "prune": {"num_layers": 2}, "search": {"budget": "params=50%"}}
    with pytest.raises(UserError, match="both prune targets and a search"):
        load_recipe(write_recipe(tmp_path, teacher, corpus_jsonl, students=[both]))
    unreachable = {"name": "tiny", "search": {"budget": "params=1k", "hidden_multiple": 16, "ffn_multiple": 32}}
    with pytest.raises(UserError, match="no candidate meets students.tiny.search.budget params=1k"):
        run_pipeline(load_recipe(write_recipe(tmp_path, teacher, corpus_jsonl, students=[unreachable])))
    assert not (tmp_path / "run").exists()
