"""`minitron eval`: perplexity of a model on a split of the data (the eval split by default), and how closely it follows a teacher.

Metrics, all per predicted token (position t predicts token t+1 inside each packed row):
- perplexity = exp(mean negative log-likelihood);
- kl = mean KL(teacher || model) = sum_v p_teacher(v) * (log p_teacher(v) - log p_model(v));
- top1_agreement = fraction of positions where both models' argmax agree.
Batches stream from the memory-mapped split, so memory does not grow with the eval set.
"""

import json
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from toolchain.data import check_seq_len, iterate_batches, prepare_data, tokenizer_fingerprint
from toolchain.errors import UserError, setting
from toolchain.losses import next_token_nll
from toolchain.models import load_frozen_model, load_model, load_tokenizer
from toolchain.progress import progress_bar
from toolchain.settings import ComputeConfig, DataConfig, EvalConfig


@dataclass
class EvalResult:
    model: str
    data: str
    split: str
    tokens: int
    sequences: int
    seq_len: int
    loss: float
    perplexity: float
    seconds: float
    tokens_per_second: float
    teacher: str | None = None
    kl: float | None = None
    top1_agreement: float | None = None
    teacher_perplexity: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def batch_metrics(logits: torch.Tensor, input_ids: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> dict:
    """Sums over one batch (not means), so batches of any size combine exactly."""
    sums = {"nll": next_token_nll(logits, input_ids, "sum").item(), "tokens": input_ids[:, 1:].numel()}
    if teacher_logits is not None:
        log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
        teacher_log_probs = F.log_softmax(teacher_logits[:, :-1].float().to(logits.device), dim=-1)
        sums["kl"] = (teacher_log_probs.exp() * (teacher_log_probs - log_probs)).sum().item()
        sums["agree"] = (teacher_log_probs.argmax(-1) == log_probs.argmax(-1)).sum().item()
        sums["teacher_nll"] = next_token_nll(teacher_logits, input_ids, "sum").item()
    return sums


@torch.no_grad()
def evaluate_model(model, rows, settings: EvalConfig, teacher=None, description: str = "eval") -> dict:
    """Stream `rows` through the model (and teacher) and return loss, perplexity and teacher metrics."""
    device = next(model.parameters()).device
    totals: dict[str, float] = {}
    sequences = 0
    started = time.perf_counter()
    total_batches = math.ceil(len(rows) / settings.batch_size)
    if settings.max_batches is not None:
        total_batches = min(total_batches, settings.max_batches)
    with progress_bar(description, total=total_batches) as bar:
        for input_ids in iterate_batches(rows, settings.batch_size, settings.max_batches):
            input_ids = input_ids.to(device)
            logits = model(input_ids=input_ids, use_cache=False).logits
            teacher_logits = None
            if teacher is not None:
                teacher_logits = teacher(input_ids=input_ids.to(next(teacher.parameters()).device), use_cache=False).logits
            for key, value in batch_metrics(logits, input_ids, teacher_logits).items():
                totals[key] = totals.get(key, 0.0) + value
            sequences += len(input_ids)
            bar.update(1)
    seconds = time.perf_counter() - started
    tokens = int(totals.get("tokens", 0))
    if tokens == 0:
        raise UserError(f"nothing was evaluated ({setting('eval.max_batches')} {settings.max_batches}); evaluate at least one batch")
    loss = totals["nll"] / tokens
    metrics = {
        "tokens": tokens,
        "sequences": sequences,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "seconds": seconds,
        "tokens_per_second": sequences * rows.shape[1] / seconds,
    }
    if teacher is not None:
        metrics["kl"] = totals["kl"] / tokens
        metrics["top1_agreement"] = totals["agree"] / tokens
        metrics["teacher_perplexity"] = math.exp(min(totals["teacher_nll"] / tokens, 700.0))
    return metrics


def evaluate(model: str, data: DataConfig, settings: EvalConfig, compute: ComputeConfig, teacher: str | None = None) -> EvalResult:
    """Evaluate `model` on a split of `data` (`settings.split`); with `teacher`, also KL and top-1 agreement."""
    tokenizer = load_tokenizer(model)
    if teacher is not None:
        check_same_vocabulary(tokenizer, load_tokenizer(teacher), model, teacher)
    student = load_model(model, dtype=compute.dtype, device=compute.device)
    check_seq_len(data.seq_len, student.config)
    teacher_model = None
    if teacher is not None:
        teacher_model = load_frozen_model(teacher, dtype=compute.dtype, device=compute.device)
        check_seq_len(data.seq_len, teacher_model.config)
    rows = prepare_data(data, tokenizer).split(settings.split)
    metrics = evaluate_model(student, rows, settings, teacher_model)
    return EvalResult(model=str(model), data=data.spec, split=settings.split, seq_len=data.seq_len,
                      teacher=None if teacher is None else str(teacher), **metrics)


def check_same_vocabulary(tokenizer, other_tokenizer, name: str, other_name: str) -> None:
    if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(other_tokenizer):
        raise UserError(f"{name} and {other_name} use different tokenizers; a teacher and its student must share one vocabulary")


def format_eval_result(result: EvalResult) -> str:
    rows = [
        ("model", result.model),
        ("data", f"{result.data} ({result.split} split, {result.sequences} x {result.seq_len} tokens)"),
        ("perplexity", f"{result.perplexity:.3f}"),
        ("loss (nats/token)", f"{result.loss:.4f}"),
    ]
    if result.teacher is not None:
        rows += [
            ("teacher", result.teacher),
            ("teacher perplexity", f"{result.teacher_perplexity:.3f}"),
            ("KL(teacher || model)", f"{result.kl:.4f}"),
            ("top-1 agreement", f"{result.top1_agreement:.2%}"),
        ]
    rows.append(("throughput", f"{result.tokens_per_second:,.0f} tokens/s ({result.seconds:.1f} s)"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def print_eval_result(result: EvalResult, as_json: bool) -> None:
    print(json.dumps(result.to_dict(), indent=2) if as_json else format_eval_result(result))


def configure_parser(parser) -> None:
    from toolchain.cli_args import add_recipe_source, add_section_flags

    parser.add_argument("model", help="model: a local Hugging Face directory or a built-in name")
    parser.add_argument("--teacher", help="teacher model, for KL(teacher || model) and top-1 agreement")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_recipe_source(parser)
    for section in ("data", "eval", "compute", "lm_eval"):
        add_section_flags(parser, section)


def command(args) -> int:
    from toolchain.cli_args import sections_from_args

    data, settings, compute, tasks = sections_from_args(args, "data", "eval", "compute", "lm_eval")
    if tasks.tasks:
        from toolchain.downstream import print_task_results, run_tasks

        print_task_results(run_tasks(args.model, tasks, compute), args.json)
        return 0
    print_eval_result(evaluate(args.model, data, settings, compute, teacher=args.teacher), args.json)
    return 0
