"""Quality curves of a pruned student: online KD vs cached KD vs with the hidden-state loss vs from scratch.

On one pruned student (the main job's width or depth student), each arm trains for --tokens with the
main job's recipe settings (batch, lr, schedule) and keeps a checkpoint at --points evenly spaced steps:
- online: `minitron distill`, logit KL with the teacher running beside the student (the reference);
- cached: the same from a teacher-logit cache (top-k log-probs, the rest as one bin), built once before the arm and timed apart;
- cached-sampled: the same from a cache that also keeps --tail-samples tokens drawn from the teacher outside its top-k;
- intermediate: online logit KL plus the cosine hidden-state loss over pruning.json's layer map (depth);
- scratch: the same architecture, random init, LM loss only (`minitron finetune`), same tokens and schedule.
Every checkpoint is evaluated on the eval split (perplexity, KL(teacher || student), top-1 agreement); its
x-coordinate is the arm's training seconds up to that step (from train_log.jsonl), so the curves compare
quality per CPU-second. Claims checked where the arms exist: distilled over scratch perplexity at the end,
cached KD's tokens/s and KL against online KD's, and which of online / intermediate is better at each point.

    python benchmarks/bench_distill_quality.py --student width --pruned runs/mainjob-final/students/width/pruned \
        --arms online cached scratch --tokens 65536 --points 8 --work-dir runs/bench-distill-quality/width

Writes benchmarks/results/distill_quality_STUDENT[_TAG].{json,md,png}. A finished arm in --work-dir with the same
settings is reused (and so are its checkpoints' evaluations, kept in its points.json), one stopped part-way resumes;
one with other settings is an error. The checkpoints keep their students, not their optimizer states (about 0.3 GB
each for these students).
"""

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from common import RESULTS_DIR, machine, pin_threads, write_results
from torch import nn

from toolchain.data import prepare_data
from toolchain.distill import build_teacher_cache, distill
from toolchain.evaluate import evaluate_model
from toolchain.finetune import finetune
from toolchain.models import load_model, load_tokenizer
from toolchain.settings import ComputeConfig, DataConfig, DistillConfig, EvalConfig

ARMS = ("online", "cached", "cached-sampled", "intermediate", "scratch")
DISTILLED_ARMS = ("online", "cached", "cached-sampled", "intermediate")
CACHED_ARMS = ("cached", "cached-sampled")


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


def arm_settings(arm: str, base: DistillConfig, cache_dir: Path, tail_samples: int) -> DistillConfig:
    if arm == "cached":
        return base.model_copy(update={"teacher_cache": str(cache_dir)})
    if arm == "cached-sampled":
        return base.model_copy(update={"teacher_cache": f"{cache_dir}-tail{tail_samples}", "teacher_cache_tail_samples": tail_samples})
    if arm == "intermediate":
        return base.model_copy(update={"intermediate_loss": "cosine", "intermediate_loss_weight": 1.0})
    return base


def started_with(run: Path, settings: dict) -> bool:
    """True when `run` holds a training run (finished or stopped part-way) with `settings` (the identity fields run.json
    keeps); an error when it holds one with other settings."""
    if not (run / "run.json").is_file():
        return False
    recorded = json.loads((run / "run.json").read_text())["settings"]
    differing = sorted(key for key in recorded if recorded[key] != json.loads(json.dumps(settings)).get(key, recorded[key]))
    if differing:
        raise SystemExit(f"{run} was trained with other settings ({', '.join(differing)}); use another --work-dir or remove it")
    return True


def drop_optimizer_states(run: Path) -> None:
    """Only the checkpoints' students and step counts are evaluated: their optimizer states (2x the weights) go."""
    for path in run.glob("checkpoints/*/optimizer.pt"):
        path.unlink()


def checkpoint_points(run: Path, tokens_per_step: int, eval_key: dict, measure) -> list[dict]:
    """One point per checkpoint a training run kept, in order: step, tokens, training seconds up to that step and
    `measure(model)`; kept in the run's points.json for `eval_key`, so a finished arm is not evaluated again."""
    from transformers import AutoModelForCausalLM

    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    step_seconds = {record["step"]: tokens_per_step / record["tokens_per_second"] for record in log}
    checkpoints = sorted((run / "checkpoints").iterdir())
    trainers = [torch.load(checkpoint / "trainer.pt", weights_only=True) for checkpoint in checkpoints]
    stored = json.loads((run / "points.json").read_text()) if (run / "points.json").is_file() else {}
    if stored.get("eval") == eval_key and [point["step"] for point in stored["points"]] == [trainer["step"] for trainer in trainers]:
        return stored["points"]
    points = []
    for checkpoint, trainer in zip(checkpoints, trainers):
        seconds = sum(value for step, value in step_seconds.items() if step <= trainer["step"])
        model = AutoModelForCausalLM.from_pretrained(checkpoint / "student", dtype=torch.float32).eval()
        points.append({"step": trainer["step"], "train_tokens": trainer["tokens"], "train_seconds": seconds, **measure(model)})
    (run / "points.json").write_text(json.dumps({"eval": eval_key, "points": points}, indent=1) + "\n")
    return points


def claims(results: dict, teacher_ppl: float) -> list[str]:
    """The comparisons the arms present allow, as Markdown bullet lines."""
    lines = []
    end = {arm: points[-1] for arm, points in results["arms"].items()}
    if "online" in end and "scratch" in end:
        lines.append(f"- distilled (online) vs from scratch at {end['online']['train_tokens']:,} tokens: perplexity "
                     f"{end['scratch']['perplexity'] / end['online']['perplexity']:.0f}x lower (issue 13's target: at least 20x)")
    for arm in (arm for arm in CACHED_ARMS if arm in end and "online" in end):
        speed = results["tokens_per_second"][arm] / results["tokens_per_second"]["online"]
        kl = end[arm]["kl"] / end["online"]["kl"] - 1
        built = (f"the cache took {results['seconds'][f'{arm} teacher_cache']:.0f} s to build" if f"{arm} teacher_cache" in results["seconds"]
                 else "the cache was built before this run (not timed here)")
        lines.append(f"- {arm} vs online KD: {speed:.2f}x the training tokens/s (target 1.4x), final KL {kl:+.1%} (target within 3%); "
                     f"{built}, once for every student and epoch")
    if "online" in end and "intermediate" in end:
        online_at = {point["train_tokens"]: point for point in results["arms"]["online"]}
        pairs = [(online_at[point["train_tokens"]], point) for point in results["arms"]["intermediate"] if point["train_tokens"] in online_at]
        wins = sum(intermediate["perplexity"] < online["perplexity"] for online, intermediate in pairs)
        lines.append(f"- with the hidden-state loss vs logit-only at equal tokens: lower perplexity at {wins} of "
                     f"{len(pairs)} points; at the end {end['intermediate']['perplexity'] / teacher_ppl:.2f}x vs "
                     f"{end['online']['perplexity'] / teacher_ppl:.2f}x the teacher's perplexity")
    return lines


def plot(results: dict, teacher_ppl: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4))
    for arm, points in results["arms"].items():
        axis.plot([point["train_seconds"] / 60 for point in points], [point["perplexity"] / teacher_ppl for point in points], marker="o", label=arm)
    axis.set_yscale("log")
    axis.set_xlabel("training minutes (2 threads)")
    axis.set_ylabel("eval perplexity / teacher's")
    axis.set_title(title, fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="name of the student in the results (e.g. width, depth)")
    parser.add_argument("--pruned", type=Path, required=True, help="the pruned student (e.g. runs/mainjob-final/students/width/pruned)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=["online", "scratch"])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--data", default="builtin:python-docs")
    parser.add_argument("--tokens", type=int, required=True, help="training budget of each arm")
    parser.add_argument("--points", type=int, default=4, help="evaluation points along the budget")
    parser.add_argument("--global-batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-lr", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, help="default: the run's warmup_fraction, as in the main job")
    parser.add_argument("--eval-batches", type=int, default=8, help="eval batches of 8 sequences at each point (8: the main job's report rows)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teacher-cache", type=Path, help="the cached arm's cache (default: WORK_DIR/teacher-cache; cached-sampled's: "
                                                            "the same with -tailM); share it between students")
    parser.add_argument("--tail-samples", type=int, default=32, help="tail samples per token of the cached-sampled arm's cache")
    parser.add_argument("--tag", help="suffix of the results' file names (e.g. long: distill_quality_STUDENT_long.md), to keep another budget's curves apart")
    parser.add_argument("--work-dir", type=Path, help="where runs go (default: a temporary directory, removed at the end)")
    args = parser.parse_args()
    pin_threads(args.threads)
    started = time.perf_counter()
    work_context = tempfile.TemporaryDirectory(prefix="bench-distill-") if args.work_dir is None else None
    work = Path(work_context.name) if work_context else args.work_dir
    work.mkdir(parents=True, exist_ok=True)

    steps = math.ceil(args.tokens / (args.global_batch_size * args.seq_len))
    save_every = max(1, math.ceil(steps / args.points))
    base = DistillConfig(tokens=args.tokens, global_batch_size=args.global_batch_size, micro_batch_size=4, lr=args.lr, min_lr=args.min_lr,
                         warmup_steps=args.warmup_steps, save_every=save_every, keep_checkpoints=args.points + 1)
    data, compute, final_eval = DataConfig(spec=args.data, seq_len=args.seq_len), ComputeConfig(dtype="float32", device="cpu"), EvalConfig(max_batches=1)
    cache_dir = args.teacher_cache or work / "teacher-cache"
    seconds, trained_now = {}, []
    for arm in args.arms:
        settings = arm_settings(arm, base, cache_dir, args.tail_samples)
        run = work / arm
        resume = started_with(run, settings.training().model_dump(mode="json") if arm == "scratch" else settings.model_dump(mode="json"))
        if not (run / "eval.json").is_file():  # not finished: train, continuing from the last checkpoint of a run stopped part-way
            trained_now.append(arm)
            if arm in CACHED_ARMS:
                begun = time.perf_counter()
                build_teacher_cache(args.teacher, [settings], data, compute)
                seconds[f"{arm} teacher_cache"] = time.perf_counter() - begun
            if arm == "scratch":
                init = work / "scratch-init" if (work / "scratch-init" / "config.json").is_file() else random_copy(args.pruned, work / "scratch-init", seed=0)
                finetune(str(init), run, settings.training(), data, compute, final_eval, resume=resume)
            else:
                distill(args.teacher, str(args.pruned), run, settings, data, compute, final_eval, resume=resume)
        drop_optimizer_states(run)

    begun = time.perf_counter()
    rows = prepare_data(data, load_tokenizer(args.teacher)).split("eval")
    teacher = RecordedTeacher(load_model(args.teacher), rows, 8, args.eval_batches)

    def measure(model) -> dict:
        metrics = evaluate_model(model, rows, EvalConfig(max_batches=args.eval_batches), teacher=teacher)
        return {key: metrics[key] for key in ("loss", "perplexity", "kl", "top1_agreement", "teacher_perplexity")}

    pruned = measure(load_model(args.pruned))
    teacher_ppl = pruned["teacher_perplexity"]
    results = {"pruned": pruned, "arms": {}, "tokens_per_second": {}}
    eval_key = {"data": args.data, "seq_len": args.seq_len, "eval_batches": args.eval_batches, "teacher": args.teacher}
    for arm in args.arms:
        points = checkpoint_points(work / arm, args.global_batch_size * args.seq_len, eval_key, measure)
        for point in points if arm in DISTILLED_ARMS else []:
            point["gap_recovered"] = (pruned["loss"] - point["loss"]) / (pruned["loss"] - math.log(teacher_ppl))
        results["arms"][arm] = points
        results["tokens_per_second"][arm] = points[-1]["train_tokens"] / points[-1]["train_seconds"]
    seconds["eval"] = time.perf_counter() - begun
    seconds["total"] = time.perf_counter() - started
    results["seconds"] = seconds
    checked = claims(results, teacher_ppl)
    name = f"distill_quality_{args.student}" + (f"_{args.tag}" if args.tag else "")
    command = "python benchmarks/bench_distill_quality.py " + " ".join(
        [f"--student {args.student}", f"--pruned {args.pruned}", "--arms " + " ".join(args.arms), f"--tokens {args.tokens}", f"--points {args.points}"]
        + ([f"--teacher-cache {args.teacher_cache}"] if args.teacher_cache else []) + ([f"--work-dir {args.work_dir}"] if args.work_dir else [])
        + ([f"--tail-samples {args.tail_samples}"] if "cached-sampled" in args.arms else []) + ([f"--tag {args.tag}"] if args.tag else []))
    payload = {
        "benchmark": f"quality curves of the {args.student} student: " + ", ".join(args.arms), "command": command,
        "teacher": args.teacher, "data": args.data, "pruned_student": str(args.pruned), "budget_tokens": args.tokens, "steps": steps,
        "save_every": save_every, "training": base.model_dump(mode="json"),
        "eval": {"sequences": min(len(rows), 8 * args.eval_batches), "seq_len": args.seq_len},
        "teacher_perplexity": teacher_ppl, "trained_now": trained_now, "results": results, "claims": checked, "machine": machine(),
    }
    lines = [
        f"# Distillation quality curves: the {args.student} student ({args.pruned})", "",
        f"Command: `{command}`", "",
        f"Budget {args.tokens:,} tokens per arm ({steps} steps of {args.global_batch_size} x {args.seq_len}), lr {args.lr} → {args.min_lr} "
        f"(cosine, warm-up {base.warmup_for(steps)} steps), {args.data}; eval on {payload['eval']['sequences']} held-out sequences of "
        f"{args.seq_len} at every {save_every} steps; {machine()['torch_threads']} torch threads on {machine()['cpu_count']} cores, "
        f"one run; total {seconds['total'] / 60:.1f} min. Training seconds are the arm's own step times (train_log.jsonl), "
        "so the x-axis is CPU time on these 2 cores (the cached arms' teacher passes are listed apart). Trained in this invocation: "
        + (", ".join(trained_now) or "none") + "; any other arm was reused from --work-dir, trained earlier on the same machine under the same CPU lock."
        + (f" cached-sampled: top-{base.teacher_cache_top_k} plus {args.tail_samples} tail samples per token." if "cached-sampled" in args.arms else ""), "",
        f"Teacher perplexity {teacher_ppl:.2f}. Pruned student before training: perplexity {pruned['perplexity']:,.1f} "
        f"({pruned['perplexity'] / teacher_ppl:.1f}x), KL {pruned['kl']:.3f}, top-1 {pruned['top1_agreement']:.1%}.", "",
        f"![quality curves]({name}.png)", "",
        "| arm | tokens | training s | perplexity | x teacher | KL | top-1 | gap recovered |", "|---|---|---|---|---|---|---|---|",
    ]
    for arm, points in results["arms"].items():
        for point in points:
            recovered = f"{point['gap_recovered']:.1%}" if "gap_recovered" in point else "—"
            lines.append(f"| {arm} | {point['train_tokens']:,} | {point['train_seconds']:.0f} | {point['perplexity']:,.2f} | "
                         f"{point['perplexity'] / teacher_ppl:.2f} | {point['kl']:.3f} | {point['top1_agreement']:.1%} | {recovered} |")
    lines += ["", "Training tokens/s: " + ", ".join(f"{arm} {value:.0f}" for arm, value in results["tokens_per_second"].items()), "",
              "Gap recovered = (loss_pruned − loss) / (loss_pruned − loss_teacher), in nats/token.", "", "## Claims", "", *checked]
    write_results(name, payload, "\n".join(lines))
    plot(results, teacher_ppl, f"{args.student} student: eval perplexity over the teacher's", RESULTS_DIR / f"{name}.png")
    print("\n".join(lines))
    if work_context:
        work_context.cleanup()


if __name__ == "__main__":
    main()
