"""Distillation and the shared training loop on tiny random models (CPU)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cpu, data_settings
from safetensors.torch import load_file

from toolchain.cli import main as cli_main
from toolchain.distill import distill, distillation_criterion, kept_teacher_layers, layer_mapping
from toolchain.losses import pass_hidden_states
from toolchain.modelopt_compat import modelopt
from toolchain.settings import DistillConfig, EvalConfig

SEQ_LEN = 64


def small_config(**overrides) -> DistillConfig:
    settings = dict(steps=8, global_batch_size=8, micro_batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=1, save_every=4)
    settings.update(overrides)
    return DistillConfig(**settings)


def run_distill(teacher, student, corpus, out, config: DistillConfig, **kwargs) -> dict:
    return distill(str(teacher), str(student), out, config, data_settings(corpus, SEQ_LEN), cpu(), EvalConfig(), **kwargs)


def train_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def drop_layers(model_dir: Path, out: Path, kept: list[int]) -> Path:
    """A depth-pruned copy of a tiny model (the kept layers' weights unchanged) with the pruning.json `minitron prune` writes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in kept)
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, out / name)
    (out / "pruning.json").write_text(json.dumps({"kept": {"kept_layers": kept}}))
    return out


@pytest.fixture
def teacher(make_tiny_model) -> Path:
    return make_tiny_model("teacher", seed=0)


@pytest.fixture
def student(make_tiny_model) -> Path:
    return make_tiny_model("student", seed=1, num_hidden_layers=2)


def distill_args(teacher: Path, student: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(data), "--out", str(out),
            "--seq-len", str(SEQ_LEN), "--global-batch-size", "8", "--micro-batch-size", "4", "--lr", "3e-3", "--min-lr", "3e-4",
            "--warmup-steps", "1", *extra]


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, tokenizer_dir, corpus_jsonl) -> Path:
    """A tiny teacher fine-tuned on the corpus, so it has a distribution worth distilling (random ones are near uniform)."""
    from conftest import save_tiny_model

    from toolchain.finetune import finetune
    from toolchain.settings import TrainingConfig

    base = tmp_path_factory.mktemp("trained-teacher")
    save_tiny_model(base / "random", tokenizer_dir, seed=0)
    config = TrainingConfig(steps=40, global_batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=2, save_every=40, keep_checkpoints=1)
    finetune(str(base / "random"), base / "teacher", config, data_settings(corpus_jsonl, SEQ_LEN), cpu(), EvalConfig(max_batches=2))
    return base / "teacher"


def test_kd_loss_decreases_and_exported_student_reloads(trained_teacher, student, corpus_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    from toolchain.evaluate import evaluate

    out = tmp_path / "out"
    teacher = trained_teacher
    summary = run_distill(teacher, student, corpus_jsonl, out, small_config(steps=12, lm_loss_weight=0.5))
    log = train_log(out)
    assert [row["step"] for row in log] == list(range(1, 13))
    first, last = log[0], log[-1]
    assert last["logit_kl"] < 0.7 * first["logit_kl"] and last["lm_loss"] < 0.9 * first["lm_loss"]
    assert {"lr", "grad_norm", "tokens_per_second", "tokens"} <= last.keys() and last["tokens"] == 12 * 8 * SEQ_LEN

    # a plain HF checkpoint: no ModelOpt state, loads with from_pretrained, equals the final in-memory weights
    assert not list(out.glob("modelopt*"))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 2 and type(reloaded).__name__ == "LlamaForCausalLM"
    final_checkpoint = out / "checkpoints" / "step-00000012" / "student"
    assert_bitwise_equal({k: v for k, v in reloaded.state_dict().items()}, tensors(final_checkpoint))
    again = evaluate(str(out), data_settings(corpus_jsonl, SEQ_LEN), EvalConfig(), cpu(), teacher=str(teacher))
    eval_json = json.loads((out / "eval.json").read_text())
    assert again.perplexity == pytest.approx(eval_json["eval"]["perplexity"], rel=1e-5)
    assert again.kl == pytest.approx(summary["eval"]["kl"], rel=1e-5)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000008", "step-00000012"]  # keep 2


def test_student_equal_to_teacher_has_zero_logit_loss(teacher, corpus_jsonl, tmp_path):
    # one step at warm-up lr 0 leaves the copy unchanged, so the final eval must agree with the teacher too
    summary = run_distill(teacher, teacher, corpus_jsonl, tmp_path / "out", small_config(steps=1, warmup_steps=1))
    assert train_log(tmp_path / "out")[0]["logit_kl"] < 1e-6
    assert summary["eval"]["kl"] < 1e-6
    assert summary["eval"]["top1_agreement"] == 1.0


def test_layer_mapping_of_depth_pruned_students(teacher, tmp_path):
    assert layer_mapping(list(range(4)), 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert kept_teacher_layers(tmp_path, 4, 2) == [0, 2]  # no pruning.json: spread evenly
    assert layer_mapping([0, 2], 4) == [(0, 1), (1, 3)]
    assert layer_mapping(kept_teacher_layers(tmp_path, 30, 15), 30)[-2:] == [(13, 27), (14, 29)]
    pruned = drop_layers(teacher, tmp_path / "pruned", kept=[0, 1, 3])
    assert kept_teacher_layers(pruned, 4, 3) == [0, 1, 3]
    mapping = layer_mapping([0, 1, 3], 4)
    assert mapping == [(0, 0), (1, 2), (2, 3)]

    # the hooks compare the mapped outputs: the student's layer 0 is the teacher's layer 0 (loss 0), the others differ
    from transformers import AutoModelForCausalLM

    mtd = modelopt("distill")
    config = small_config(logit_loss_weight=1.0, intermediate_loss="cosine", intermediate_loss_weight=1.0)
    student_model = AutoModelForCausalLM.from_pretrained(pruned)
    criterion, balancer = distillation_criterion(config, mapping, pass_hidden_states(student_model))
    model = mtd.convert(student_model, mode=[("kd_loss", {
        "teacher_model": AutoModelForCausalLM.from_pretrained(teacher), "criterion": criterion, "loss_balancer": balancer})])
    model(input_ids=torch.randint(0, 384, (2, 16)), use_cache=False)
    losses = list(model.compute_kd_loss(skip_balancer=True).values())
    assert len(losses) == 4  # logits + three layer pairs
    assert losses[1].item() < 1e-6
    assert losses[2].item() > 1e-3 and losses[3].item() > 1e-3


def test_depth_pruned_student_learns_the_mapped_hidden_states(trained_teacher, make_tiny_model, corpus_jsonl, tmp_path):
    student = make_tiny_model("three-layers", seed=1, num_hidden_layers=3)
    (student / "pruning.json").write_text(json.dumps({"kept": {"kept_layers": [0, 1, 3]}}))
    summary = run_distill(trained_teacher, student, corpus_jsonl, tmp_path / "out",
                          small_config(steps=8, intermediate_loss="cosine", intermediate_loss_weight=1.0))
    assert summary["layer_mapping"] == [(0, 0), (1, 2), (2, 3)]
    log = train_log(tmp_path / "out")
    assert log[-1]["hidden_loss"] < 0.8 * log[0]["hidden_loss"]
    assert log[-1]["logit_kl"] < log[0]["logit_kl"]


def test_gradient_checkpointing_trains_the_same_student(teacher, student, corpus_jsonl, tmp_path):
    for name, checkpointing in (("plain", False), ("recomputed", True)):
        run_distill(teacher, student, corpus_jsonl, tmp_path / name, small_config(steps=3, gradient_checkpointing=checkpointing,
                    intermediate_loss="cosine", intermediate_loss_weight=0.5))
    plain, recomputed = tensors(tmp_path / "plain"), tensors(tmp_path / "recomputed")
    for name in plain:
        assert torch.allclose(plain[name], recomputed[name], atol=1e-6), name
    assert [row["loss"] for row in train_log(tmp_path / "plain")] == pytest.approx([row["loss"] for row in train_log(tmp_path / "recomputed")], rel=1e-6)


def test_hidden_state_loss_refuses_a_width_pruned_student(teacher, make_tiny_model, corpus_jsonl, tmp_path, capsys):
    narrow = make_tiny_model("narrow", hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    code = cli_main(distill_args(teacher, narrow, corpus_jsonl, tmp_path / "out", "--steps", "2",
                                 "--intermediate-loss", "cosine", "--intermediate-loss-weight", "1"))
    assert code == 2 and "equal hidden sizes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def run_minitron(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "toolchain", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"finished before {path.name} appeared: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_run_resumes_to_bitwise_equal_weights(teacher, student, corpus_jsonl, tmp_path, stop_signal):
    steps = ["--steps", "12", "--save-every", "3", "--keep-checkpoints", "2"]
    reference = tmp_path / "reference"
    assert cli_main(distill_args(teacher, student, corpus_jsonl, reference, *steps)) == 0

    out = tmp_path / "killed"
    process = run_minitron(*distill_args(teacher, student, corpus_jsonl, out, *steps))
    wait_for(out / "checkpoints" / "step-00000003", process)
    process.send_signal(stop_signal)
    _, stderr = process.communicate(timeout=120)
    if stop_signal == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:  # Ctrl-C: a checkpoint of the last finished step, a clean exit
        assert process.returncode == 130, stderr[-2000:]
        assert "Traceback" not in stderr and "--resume" in stderr
        stopped_at = max(row["step"] for row in train_log(out))
        assert (out / "checkpoints" / f"step-{stopped_at:08d}").is_dir()
    assert not (out / "model.safetensors").exists()
    assert cli_main(distill_args(teacher, student, corpus_jsonl, out, *steps, "--resume")) == 0

    assert_bitwise_equal(tensors(out), tensors(reference))
    assert [row["loss"] for row in train_log(out)] == [row["loss"] for row in train_log(reference)]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_reproduce_the_single_process_trajectory(teacher, student, corpus_jsonl, tmp_path, strategy):
    """Same global batch of 8 on 1 rank and on 2 gloo ranks (4 each): per-step losses agree to 1e-5 relative."""
    steps = ["--steps", "5", "--distributed", strategy]
    single = tmp_path / "single"
    assert cli_main(distill_args(teacher, student, corpus_jsonl, single, *steps)) == 0
    double = tmp_path / "double"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
               "-m", "toolchain", *distill_args(teacher, student, corpus_jsonl, double, *steps)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = train_log(single), train_log(double)
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
    assert json.loads((double / "run.json").read_text())["world_size"] == 2
    final_one, final_two = tensors(single), tensors(double)
    for name in final_one:
        assert torch.allclose(final_one[name], final_two[name], atol=1e-5), name


def test_bad_inputs_fail_in_one_line_without_touching_checkpoints(teacher, student, make_tiny_model, corpus_jsonl, tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "run"
    assert cli_main(distill_args(teacher, student, corpus_jsonl, out, "--steps", "2", "--save-every", "1")) == 0
    capsys.readouterr()
    before = tree_digest(out)
    (tmp_path / "a-file").write_text("user data")

    other_tokenizer = make_tiny_model("other-tok", seed=1, num_hidden_layers=2)
    tokenizer = json.loads((other_tokenizer / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[3:5]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other_tokenizer / "tokenizer.json").write_text(json.dumps(tokenizer))
    bigger_vocab = make_tiny_model("bigger-vocab", seed=1, num_hidden_layers=2, vocab_size=512)

    cases = {  # flags replacing or added to the base arguments (None: a switch), and the message expected
        "different tokenizers": ({"--student": other_tokenizer, "--steps": 2}, "different tokenizers"),
        "different vocabularies": ({"--student": bigger_vocab, "--steps": 2}, "vocabulary"),
        "data smaller than a batch": ({"--steps": 2, "--global-batch-size": 4096, "--micro-batch-size": 4096}, "fewer than one global batch"),
        "zero tokens": ({"--tokens": 0}, "--tokens"),
        "negative steps": ({"--steps": -3}, "--steps"),
        "no budget": ({}, "--tokens N or --steps N"),
        "zero lr": ({"--steps": 2, "--lr": 0}, "--lr"),
        "negative lr": ({"--steps": 2, "--lr": -1e-4}, "invalid --lr: Input should be greater than 0"),
        "negative eval batches": ({"--steps": 2, "--eval-batches": -1}, "invalid --eval-batches"),
        "resume and overwrite": ({"--steps": 2, "--resume": None, "--overwrite": None}, "contradict"),
        "out is a file": ({"--steps": 2, "--out": tmp_path / "a-file"}, "is a file"),
        "missing student": ({"--student": tmp_path / "nope", "--steps": 2}, "neither a directory"),
        "resume without a run": ({"--steps": 2, "--resume": None, "--out": tmp_path / "fresh"}, "no run to resume"),
        "same run without --resume": ({"--steps": 2, "--save-every": 1}, "--resume"),
        "different configuration": ({"--steps": 3}, "different configuration (steps differ)"),
        "different configuration on resume": ({"--steps": 3, "--resume": None}, "different configuration"),
    }
    for name, (flags, message) in cases.items():
        code = cli_main(with_flags(distill_args(teacher, student, corpus_jsonl, out), flags))
        err = capsys.readouterr().err.strip()
        assert code == 2, f"{name}: exit {code}, {err}"
        assert message in err and len(err.splitlines()) == 1, f"{name}: {err!r}"
        assert tree_digest(out) == before, f"{name} changed the run directory"
    assert not (tmp_path / "fresh").exists()

    no_checkpoint = tmp_path / "no-checkpoint"
    no_checkpoint.mkdir()
    (no_checkpoint / "run.json").write_text(json.dumps({"stage": "distill"}))
    assert cli_main(with_flags(distill_args(teacher, student, corpus_jsonl, no_checkpoint), {"--steps": 2, "--resume": None})) == 2


def with_flags(args: list[str], flags: dict) -> list[str]:
    """`args` with each flag's value replaced, or the flag appended (value None: a switch)."""
    args = list(args)
    for flag, value in flags.items():
        if value is None:
            args.append(flag)
        elif flag in args:
            args[args.index(flag) + 1] = str(value)
        else:
            args += [flag, str(value)]
    return args


def test_bad_input_from_the_command_line_is_one_line_exit_2(teacher, student, corpus_jsonl, tmp_path, cli):
    result = cli(*distill_args(teacher, student, corpus_jsonl, tmp_path / "out", "--tokens", "-5"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["minitron distill: error: invalid --tokens: Input should be greater than 0"]


@pytest.mark.slow
def test_overwrite_replaces_a_finished_run_only_once_the_new_one_is_complete(teacher, student, corpus_jsonl, tmp_path):
    out = tmp_path / "run"
    assert cli_main(distill_args(teacher, student, corpus_jsonl, out, "--steps", "2")) == 0
    before = tree_digest(out)
    process = run_minitron(*distill_args(teacher, student, corpus_jsonl, out, "--steps", "40", "--save-every", "2", "--overwrite"))
    wait_for(tmp_path / ".run.overwrite" / "checkpoints" / "step-00000002", process)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    assert process.returncode == 130 and tree_digest(out) == before  # the interrupted overwrite lost nothing
    assert cli_main(distill_args(teacher, student, corpus_jsonl, out, "--steps", "3", "--overwrite", "--eval-batches", "0")) == 0
    assert len(train_log(out)) == 3 and json.loads((out / "eval.json").read_text())["eval"] is None
    assert not (tmp_path / ".run.overwrite").exists() and not list(tmp_path.glob(".run.old-*"))


def test_a_damaged_latest_checkpoint_resumes_from_the_previous_one(teacher, student, corpus_jsonl, tmp_path, caplog):
    steps = ["--steps", "4", "--save-every", "2", "--keep-checkpoints", "3"]
    reference = tmp_path / "reference"
    assert cli_main(distill_args(teacher, student, corpus_jsonl, reference, *steps)) == 0
    damaged = reference / "checkpoints" / "step-00000004" / "student" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    final = tensors(reference)
    assert cli_main(distill_args(teacher, student, corpus_jsonl, reference, *steps, "--resume")) == 0
    assert "step-00000004 is damaged" in caplog.text
    assert_bitwise_equal(tensors(reference), final)  # steps 3-4 retrained from step 2 give the same weights
