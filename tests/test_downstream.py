"""`minitron eval MODEL --tasks`: lm-evaluation-harness on a local multiple-choice task (JSONL written here, no network)."""

import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="needs the lm-eval extra: pip install -e '.[lm-eval]'")

CHOICES = ["a", "b", "c", "d"]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Everything here is local: no hub access, and datasets' cache in the test's folder."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def write_task(tmp_path, questions: int = 20):
    """A 4-way multiple-choice task whose right answer is always "a", placed at position i % 4 (so ties, which lm-eval
    breaks towards the first choice, score exactly 1/4)."""
    rows = []
    for i in range(questions):
        choices = CHOICES[1:]
        choices = choices[: i % 4] + ["a"] + choices[i % 4:]
        rows.append({"question": f"Question {i}: which letter comes first?\n", "choices": choices, "answer": i % 4})
    data = tmp_path / "letters.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "letters.yaml").write_text(f"""task: toy_letters
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
""")
    return tasks


def letter_model(directory, tokenizer_dir, always: str | None):
    """A tiny Llama that predicts `always` whatever the context (layers silenced, every embedding along one direction,
    lm_head reading that direction into one token), or a uniform distribution when `always` is None."""
    from conftest import save_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_tiny_model(directory, tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight.zero_()
        if always is not None:
            (token,) = AutoTokenizer.from_pretrained(directory)(always, add_special_tokens=False)["input_ids"]
            model.lm_head.weight[token, 0] = 2.0
    model.save_pretrained(directory)
    return directory


def test_local_task_scores_a_right_model_100_and_a_uniform_one_at_chance(tmp_path, tokenizer_dir, cli):
    tasks = write_task(tmp_path)
    right = letter_model(tmp_path / "right", tokenizer_dir, always="a")
    uniform = letter_model(tmp_path / "uniform", tokenizer_dir, always=None)
    scores = {}
    for name, model in (("right", right), ("uniform", uniform)):
        result = cli("eval", model, "--tasks", "toy_letters", "--task-dir", tasks, "--device", "cpu", "--json")
        assert result.returncode == 0, result.stderr[-3000:]
        scores[name] = json.loads(result.stdout)["tasks"]["toy_letters"]["acc"]
    assert scores["right"] == 1.0
    assert scores["uniform"] == pytest.approx(0.25)


def test_an_unknown_task_is_one_line_exit_2(tiny_model, tmp_path, cli):
    result = cli("eval", tiny_model, "--tasks", "no_such_task_xyz", "--device", "cpu")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "lm-eval knows no task no_such_task_xyz" in result.stderr
    missing = cli("eval", tiny_model, "--tasks", "toy", "--task-dir", tmp_path / "nowhere", "--device", "cpu")
    assert missing.returncode == 2 and "is not a directory" in missing.stderr


@pytest.mark.slow
def test_a_recipe_with_tasks_reports_them_for_teacher_and_students(tmp_path, tokenizer_dir, corpus_jsonl, make_tiny_model):
    from test_pipeline import write_recipe

    from toolchain.pipeline import run_pipeline
    from toolchain.recipe import load_recipe

    tasks = write_task(tmp_path, questions=8)
    teacher = make_tiny_model("teacher", max_position_embeddings=2048)
    recipe = write_recipe(tmp_path, teacher, corpus_jsonl, lm_eval={"tasks": ["toy_letters"], "task_dir": str(tasks)})
    summary = run_pipeline(load_recipe(recipe))
    assert 0 <= summary["teacher"]["tasks"]["toy_letters"]["acc"] <= 1
    assert all("acc" in student["tasks"]["toy_letters"] for student in summary["students"])
    assert "| teacher | toy_letters | acc |" in (tmp_path / "run" / "summary.md").read_text()
