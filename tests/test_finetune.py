"""LM-loss fine-tuning (teacher correction) through the shared training loop."""

import json

from transformers import AutoModelForCausalLM

from toolchain.cli import main as cli_main
from toolchain.finetune import finetune
from toolchain.recipe import DistillConfig


def test_finetune_learns_the_corpus_and_writes_a_plain_checkpoint(tiny_model, corpus_jsonl, tmp_path):
    out = tmp_path / "corrected"
    # the pipeline passes the recipe's DistillConfig; its loss fields do not apply here
    config = DistillConfig(steps=16, global_batch_size=8, micro_batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=2, save_every=8)
    summary = finetune(str(tiny_model), str(corpus_jsonl), out, config, seq_len=64)
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
