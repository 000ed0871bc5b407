"""Does distillation recover the pruned student? Distilled vs from-scratch vs pruned-before-distillation.

Three arms on the same architecture (the smollm2-135m width student: hidden 576→432, FFN 1536→768):
- pruned: `minitron prune` output, before any training;
- distilled: `minitron distill` of the pruned student from the teacher (logit KL) for --tokens;
- scratch: the same architecture, random init, trained with the LM loss (`minitron finetune`) on the same tokens
  with the same schedule.
Each training run keeps a checkpoint at --points evenly spaced steps; every checkpoint is evaluated on
the eval split (perplexity, KL(teacher || student), top-1 agreement). Teacher logits are recorded once and
replayed to every evaluation (evaluate_model's teacher argument), which saves a teacher forward per point.
Claims checked: distilled beats scratch at every point; distilled recovers most of the pruned→teacher gap.

    python benchmarks/bench_distill_quality.py --tokens 16384 [--points 3] [--eval-batches 2] [--pruned DIR] [--threads 2]
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from common import machine, pin_threads, write_results
from torch import nn

from toolchain.data import prepare_data
from toolchain.distill import distill
from toolchain.evaluate import evaluate_model
from toolchain.finetune import finetune
from toolchain.models import load_model, load_tokenizer
from toolchain.settings import ComputeConfig, DataConfig, DistillConfig, EvalConfig


class RecordedTeacher(nn.Module):
    """Stands in for the teacher in evaluate_model: replays logits recorded from the real teacher, by input."""

    def __init__(self, teacher: nn.Module, rows, batch_size: int, max_batches: int):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # evaluate_model reads the device from it
        self.logits = {}
        self.teacher = [teacher]  # a list keeps it out of this module's parameters
        evaluate_model(self, rows, EvalConfig(batch_size=batch_size, max_batches=max_batches), description="record teacher")

    def forward(self, input_ids, use_cache=False):
        key = input_ids.numpy().tobytes()
        if key not in self.logits:
            with torch.no_grad():
                self.logits[key] = self.teacher[0](input_ids=input_ids, use_cache=False).logits
        return SimpleNamespace(logits=self.logits[key])


def prune_student(teacher: str, data: str, out: Path, hidden_size: int, ffn_hidden_size: int, calibration_samples: int) -> Path:
    command = [sys.executable, "-m", "toolchain", "prune", "--model", teacher, "--data", data, "--out", str(out),
               "--hidden-size", str(hidden_size), "--ffn-hidden-size", str(ffn_hidden_size), "--calibration-samples", str(calibration_samples)]
    subprocess.run(command, check=True)
    return out


def random_copy(pruned: Path, out: Path, seed: int) -> Path:
    """The pruned architecture with fresh random weights (and the same tokenizer)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(pruned), dtype=torch.float32)
    model.save_pretrained(out)
    for file in pruned.iterdir():
        if file.name.startswith("tokenizer") or file.name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
            shutil.copy(file, out / file.name)
    return out


def checkpoint_models(run: Path):
    """(tokens, model) for every checkpoint a training run kept, in order."""
    from transformers import AutoModelForCausalLM

    for checkpoint in sorted((run / "checkpoints").iterdir()):
        trainer = torch.load(checkpoint / "trainer.pt", weights_only=True)
        yield trainer["tokens"], AutoModelForCausalLM.from_pretrained(checkpoint / "student", dtype=torch.float32).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--data", default="builtin:python-docs")
    parser.add_argument("--tokens", type=int, required=True, help="training budget of each arm")
    parser.add_argument("--points", type=int, default=3, help="evaluation points along the budget")
    parser.add_argument("--pruned", type=Path, help="an existing pruned student (default: run `minitron prune`)")
    parser.add_argument("--hidden-size", type=int, default=432)
    parser.add_argument("--ffn-hidden-size", type=int, default=768)
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--min-lr", type=float, default=3e-5)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--eval-batches", type=int, default=2, help="eval batches of 8 sequences at each point")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, help="where runs go (default: a temporary directory, removed at the end)")
    args = parser.parse_args()
    pin_threads(args.threads)
    started = time.perf_counter()
    work_context = tempfile.TemporaryDirectory(prefix="bench-distill-") if args.work_dir is None else None
    work = Path(work_context.name) if work_context else args.work_dir
    work.mkdir(parents=True, exist_ok=True)

    seconds = {}
    begun = time.perf_counter()
    pruned = args.pruned or prune_student(args.teacher, args.data, work / "pruned", args.hidden_size, args.ffn_hidden_size, args.calibration_samples)
    seconds["prune"] = time.perf_counter() - begun
    scratch_init = work / "scratch-init" if (work / "scratch-init" / "config.json").is_file() else random_copy(pruned, work / "scratch-init", seed=0)
    steps = math.ceil(args.tokens / (args.global_batch_size * args.seq_len))
    save_every = max(1, math.ceil(steps / args.points))
    config = DistillConfig(tokens=args.tokens, global_batch_size=args.global_batch_size, micro_batch_size=4, lr=args.lr, min_lr=args.min_lr,
                           warmup_steps=args.warmup_steps, save_every=save_every, keep_checkpoints=args.points + 1)
    data, compute, final_eval = DataConfig(spec=args.data, seq_len=args.seq_len), ComputeConfig(dtype="float32", device="cpu"), EvalConfig(max_batches=1)
    for arm, train_arm in (("distilled", lambda out: distill(args.teacher, str(pruned), out, config, data, compute, final_eval)),
                           ("scratch", lambda out: finetune(str(scratch_init), out, config.training(), data, compute, final_eval))):
        finished = work / arm / "eval.json"  # a finished arm in --work-dir is reused: only the evaluation runs again
        summary = json.loads(finished.read_text()) if finished.is_file() else train_arm(work / arm)
        seconds[arm] = summary["train_seconds"]

    begun = time.perf_counter()
    teacher_model = load_model(args.teacher)
    rows = prepare_data(DataConfig(spec=args.data, seq_len=args.seq_len), load_tokenizer(args.teacher)).split("eval")
    teacher = RecordedTeacher(teacher_model, rows, 8, args.eval_batches)

    def measure(model) -> dict:
        metrics = evaluate_model(model, rows, EvalConfig(max_batches=args.eval_batches), teacher=teacher)
        return {key: metrics[key] for key in ("loss", "perplexity", "kl", "top1_agreement", "teacher_perplexity")}

    results = {"pruned": measure(load_model(pruned)), "scratch_init": measure(load_model(scratch_init)), "distilled": [], "scratch": []}
    for arm, run in (("distilled", work / "distilled"), ("scratch", work / "scratch")):
        for tokens, model in checkpoint_models(run):
            results[arm].append({"train_tokens": tokens, **measure(model)})
    seconds["eval"] = time.perf_counter() - begun
    teacher_ppl = results["pruned"]["teacher_perplexity"]
    teacher_loss = math.log(teacher_ppl)
    pruned_loss = results["pruned"]["loss"]
    for point in results["distilled"]:
        point["gap_recovered"] = (pruned_loss - point["loss"]) / (pruned_loss - teacher_loss)
    beats = all(d["perplexity"] < s["perplexity"] for d, s in zip(results["distilled"], results["scratch"]))
    final_recovery = results["distilled"][-1]["gap_recovered"]
    seconds["total"] = time.perf_counter() - started
    payload = {
        "benchmark": "distilled vs from-scratch vs pruned student, smollm2-135m width student",
        "teacher": args.teacher, "data": args.data, "budget_tokens": args.tokens, "steps": steps, "save_every": save_every,
        "training": config.model_dump(mode="json"), "eval": {"sequences": min(len(rows), 8 * args.eval_batches), "seq_len": args.seq_len},
        "pruned_student": str(pruned) if args.pruned else f"minitron prune --hidden-size {args.hidden_size} --ffn-hidden-size {args.ffn_hidden_size} --calibration-samples {args.calibration_samples}",
        "teacher_perplexity": teacher_ppl, "results": results,
        "distilled_beats_scratch_at_every_point": beats, "gap_recovered_at_end": final_recovery,
        "seconds": seconds, "machine": machine(),
    }
    lines = [
        "# Distillation quality: smollm2-135m width student (hidden 432, FFN 768)", "",
        f"Budget {args.tokens:,} tokens per arm ({steps} steps of {args.global_batch_size} x {args.seq_len}), lr {args.lr} → {args.min_lr} "
        f"(warm-up {args.warmup_steps}), {args.data}; eval on {payload['eval']['sequences']} held-out sequences of {args.seq_len}; "
        f"{machine()['torch_threads']} torch threads on {machine()['cpu_count']} cores; total {seconds['total'] / 60:.1f} min.", "",
        f"Teacher perplexity {teacher_ppl:.2f}. Pruned student before distillation: perplexity {results['pruned']['perplexity']:,.1f}, "
        f"KL {results['pruned']['kl']:.3f}, top-1 {results['pruned']['top1_agreement']:.1%}. "
        f"Random init: perplexity {results['scratch_init']['perplexity']:,.1f}.", "",
        "| tokens | distilled ppl | distilled KL | distilled top-1 | gap recovered | scratch ppl | scratch KL |", "|---|---|---|---|---|---|---|",
    ]
    for d, s in zip(results["distilled"], results["scratch"]):
        lines.append(f"| {d['train_tokens']:,} | {d['perplexity']:,.2f} | {d['kl']:.3f} | {d['top1_agreement']:.1%} | {d['gap_recovered']:.1%} | "
                     f"{s['perplexity']:,.1f} | {s['kl']:.3f} |")
    lines += ["", f"Distilled beats from-scratch at every point: **{'yes' if beats else 'no'}**. "
                  f"Share of the pruned→teacher loss gap recovered at the end: **{final_recovery:.1%}** "
                  "(gap recovered = (loss_pruned − loss_distilled) / (loss_pruned − loss_teacher), in nats/token).",
              "", "Seconds (training seconds of each arm as that run measured them): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())]
    write_results("distill_quality", payload, "\n".join(lines))
    print("\n".join(lines))
    print(json.dumps({"beats": beats, "gap_recovered": final_recovery}))
    if work_context:
        work_context.cleanup()


if __name__ == "__main__":
    main()
