"""`minitron distill`: knowledge distillation of a student from a teacher with ModelOpt.

ModelOpt (`modelopt.torch.distill`) wraps the student and the frozen teacher into one model, captures
the layer outputs the losses compare, balances the losses and exports the plain student. This module
chooses those losses (forward KL on logits with temperature, as Minitron; optionally LM
cross-entropy and a hidden-state loss between mapped decoder layers), maps teacher layers onto a
depth-pruned student, and hands the result to the shared loop in `toolchain.training`.
It does not prune (`minitron prune`) and does not fine-tune the teacher (`minitron finetune`).
"""

import json
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from toolchain.cli_args import add_data_arguments, add_model_arguments
from toolchain.data import check_seq_len
from toolchain.distributed import distributed_context, prepare_data_on_ranks
from toolchain.errors import UserError
from toolchain.evaluate import check_same_vocabulary, evaluate_model
from toolchain.models import load_model, load_tokenizer, model_fingerprint, resolve_model_dir
from toolchain.recipe import DistillConfig
from toolchain.training import (
    TrainingTask,
    add_training_arguments,
    config_from_args,
    lm_loss,
    prepare_student,
    print_summary,
    run_identity,
    train,
    write_final_model,
)

log = logging.getLogger(__name__)

LOSS_FLAGS = ("temperature", "logit_loss_weight", "lm_loss_weight", "intermediate_loss", "intermediate_loss_weight")


def modelopt_distill():
    """`modelopt.torch.distill`, without its warning that transformers 5 is untested (KD runs with it: REFERENCE §2)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is not tested with current version of modelopt.*")
        import modelopt.torch.distill as mtd
    return mtd


class TokenKLLoss(_Loss):
    """ModelOpt's logit KL, computed in float32 and averaged per token (its own 'mean' also divides by the vocabulary)."""

    def __init__(self, temperature: float):
        super().__init__()
        self.kl = modelopt_distill().LogitsDistillationLoss(temperature=temperature, reduction="none")

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return self.kl(student_logits.float(), teacher_logits.float()).mean()


class HiddenStateLoss(_Loss):
    """Distance between a student and a teacher decoder-layer output, per token: 1 - cosine similarity, or MSE."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, student_hidden, teacher_hidden) -> torch.Tensor:
        student_hidden = (student_hidden[0] if isinstance(student_hidden, tuple) else student_hidden).float()
        teacher_hidden = (teacher_hidden[0] if isinstance(teacher_hidden, tuple) else teacher_hidden).float()
        if self.kind == "cosine":
            return (1 - F.cosine_similarity(student_hidden, teacher_hidden, dim=-1)).mean()
        return F.mse_loss(student_hidden, teacher_hidden)


def kept_teacher_layers(student_dir: Path, teacher_layers: int, student_layers: int) -> list[int]:
    """Which teacher layer each student layer came from: `pruning.json` of `minitron prune` if it fits, else spread evenly."""
    report_file = student_dir / "pruning.json"
    if report_file.is_file():
        try:
            kept = json.loads(report_file.read_text())["kept"]["kept_layers"]
        except (json.JSONDecodeError, KeyError, TypeError):
            kept = None
        if (isinstance(kept, list) and len(kept) == student_layers and all(isinstance(i, int) for i in kept)
                and kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < teacher_layers):
            return kept
        log.warning("%s does not list %d kept layers of a %d-layer teacher; spreading the layer mapping evenly", report_file, student_layers, teacher_layers)
    return [round(i * teacher_layers / student_layers) for i in range(student_layers)]


def layer_mapping(kept: list[int], teacher_layers: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs whose outputs the hidden-state loss compares.

    Student layer i stands for teacher layer kept[i]; its output feeds what stands for teacher layer
    kept[i+1], so it should match the teacher's hidden state right before that layer: the output of
    teacher layer kept[i+1] - 1 (the teacher's last layer for the student's last).
    """
    targets = [following - 1 for following in kept[1:]] + [teacher_layers - 1]
    return list(enumerate(targets))


def distillation_criterion(config: DistillConfig, mapping: list[tuple[int, int]]):
    """ModelOpt criterion and loss balancer; weights are normalised so they sum to 1 with the LM loss's share."""
    mtd = modelopt_distill()

    criterion = {}
    weights = []
    hidden_weight = config.intermediate_loss_weight if config.intermediate_loss != "none" else 0.0
    total = config.logit_loss_weight + config.lm_loss_weight + hidden_weight
    if config.logit_loss_weight > 0:
        criterion[("lm_head", "lm_head")] = TokenKLLoss(config.temperature)
        weights.append(config.logit_loss_weight / total)
    if hidden_weight > 0:
        for student_layer, teacher_layer in mapping:
            criterion[(f"model.layers.{student_layer}", f"model.layers.{teacher_layer}")] = HiddenStateLoss(config.intermediate_loss)
            weights.append(hidden_weight / total / len(mapping))
    # Rounding can push the sum a hair above 1, which StaticLossBalancer refuses; below 1 it warns unless an LM loss is passed.
    weights = [w * (1 - 1e-9) for w in weights]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*do not sum to 1.0.*")
        balancer = mtd.StaticLossBalancer(weights)
    return criterion, balancer


def build_distillation(teacher_model, student_model, config: DistillConfig, mapping: list[tuple[int, int]]):
    """ModelOpt's distillation model around the student (teacher frozen inside) and the loss function for the loop."""
    criterion, balancer = distillation_criterion(config, mapping)
    distill_model = modelopt_distill().convert(
        student_model, mode=[("kd_loss", {"teacher_model": teacher_model, "criterion": criterion, "loss_balancer": balancer})])
    return distill_model, kd_loss_function(distill_model, config, criterion)


def kd_loss_function(distill_model, config: DistillConfig, criterion: dict):
    """The loss of one micro-batch for the training loop: ModelOpt's balanced total, and its parts for the log
    (logit_kl, lm_loss, hidden_loss averaged over the mapped layers)."""
    # compute_kd_loss names each loss by its class and position in the criterion
    labels = {f"{loss.__class__.__name__}_{i}": "logit_kl" if isinstance(loss, TokenKLLoss) else "hidden_loss"
              for i, loss in enumerate(criterion.values())}
    hidden_pairs = max(1, sum(label == "hidden_loss" for label in labels.values()))

    def compute_loss(wrapped, input_ids):
        output = wrapped(input_ids=input_ids, use_cache=False)
        student_loss = lm_loss(output.logits, input_ids) if config.lm_loss_weight > 0 else None
        parts = distill_model.compute_kd_loss(student_loss=student_loss, skip_balancer=True)
        losses = {"loss": distill_model.loss_balancer(parts)}
        for key, value in parts.items():
            label = labels.get(key, "lm_loss")
            losses[label] = losses.get(label, 0) + value.detach() / (hidden_pairs if label == "hidden_loss" else 1)
        return losses

    return compute_loss


def check_pair(teacher_model, student_model, config: DistillConfig) -> None:
    if teacher_model.config.vocab_size != student_model.config.vocab_size:
        raise UserError(f"teacher vocabulary ({teacher_model.config.vocab_size}) and student vocabulary ({student_model.config.vocab_size}) differ; "
                        "distil into a student pruned from this teacher")
    if config.intermediate_loss != "none" and teacher_model.config.hidden_size != student_model.config.hidden_size:
        raise UserError(f"the hidden-state loss needs equal hidden sizes, but the teacher has {teacher_model.config.hidden_size} and the student "
                        f"{student_model.config.hidden_size}; use it for depth-pruned students, or pass --intermediate-loss none")


def distill(
    teacher: str,
    student: str,
    data: str,
    out: Path,
    config: DistillConfig,
    seq_len: int = 256,
    text_field: str = "text",
    dtype: str = "float32",
    device: str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    eval_batches: int | None = None,
) -> dict:
    """Distil `student` from `teacher` on the train split of `data` into `out`; returns the final metrics.

    `out` receives the plain HF student, `train_log.jsonl`, `eval.json` (eval split, against the
    teacher) and resumable checkpoints. Under torchrun every rank calls this with the same arguments.
    """
    out = Path(out)
    mtd = modelopt_distill()

    teacher_dir, student_dir = resolve_model_dir(teacher), resolve_model_dir(student)
    tokenizer = load_tokenizer(student_dir)
    check_same_vocabulary(tokenizer, load_tokenizer(teacher_dir), f"student {student}", f"teacher {teacher}")
    with distributed_context(device) as runtime:
        teacher_model = load_model(teacher_dir, dtype=dtype, device=str(runtime.device))
        student_model = load_model(student_dir, dtype=dtype, device=str(runtime.device))
        check_pair(teacher_model, student_model, config)
        check_seq_len(seq_len, teacher_model.config)
        check_seq_len(seq_len, student_model.config)
        packed = prepare_data_on_ranks(data, tokenizer, seq_len, text_field, runtime)

        teacher_layers, student_layers = teacher_model.config.num_hidden_layers, student_model.config.num_hidden_layers
        mapping = layer_mapping(kept_teacher_layers(student_dir, teacher_layers, student_layers), teacher_layers)
        student_config = student_model.config
        distill_model, compute_loss = build_distillation(teacher_model, prepare_student(student_model, config), config, mapping)

        identity = run_identity(config, runtime.world_size, stage="distill", teacher=model_fingerprint(teacher_dir),
                                student=model_fingerprint(student_dir), data=packed.directory.name, seq_len=seq_len)
        task = TrainingTask(distill_model, compute_loss, student_config, frozen=[teacher_model])
        result = train(task, packed.split("train"), config, out, identity, runtime, resume=resume, overwrite=overwrite, description="distill")

        plain_student = mtd.export(result.model).eval()
        metrics = evaluate_model(plain_student, packed.split("eval"), max_batches=eval_batches, teacher=teacher_model, description="eval vs teacher")
        summary = {"teacher": str(teacher), "student": str(student), "data": data, "out": str(out), "steps": result.steps,
                   "tokens": result.tokens, "train_seconds": result.seconds, "final_train": result.last, "eval": metrics,
                   "layer_mapping": mapping if config.intermediate_loss != "none" else None}
        write_final_model(out, plain_student, tokenizer, {"eval.json": json.dumps(summary, indent=2) + "\n"}, runtime)
    return summary


def configure_parser(parser) -> None:
    parser.add_argument("--teacher", required=True, help="teacher: a local Hugging Face directory or a built-in name")
    parser.add_argument("--student", required=True, help="student: a local Hugging Face directory with the teacher's tokenizer (e.g. from `minitron prune`)")
    parser.add_argument("--out", required=True, type=Path, help="run directory: the distilled student, train_log.jsonl, eval.json, checkpoints/")
    add_data_arguments(parser)
    add_model_arguments(parser)
    add_training_arguments(parser)
    losses = parser.add_argument_group("losses (weights are relative)")
    losses.add_argument("--temperature", type=float, help="softmax temperature of the logit KL (default 1.0)")
    losses.add_argument("--logit-loss-weight", type=float, help="weight of KL(teacher || student) on logits (default 1.0)")
    losses.add_argument("--lm-loss-weight", type=float, help="weight of the LM cross-entropy (default 0)")
    losses.add_argument("--intermediate-loss", choices=["none", "cosine", "mse"], help="hidden-state loss between mapped decoder layers (default none)")
    losses.add_argument("--intermediate-loss-weight", type=float, help="weight of the hidden-state loss (default 0; needs --intermediate-loss)")


def command(args) -> int:
    config = config_from_args(args, DistillConfig, LOSS_FLAGS)
    metrics = distill(args.teacher, args.student, args.data, args.out, config, seq_len=args.seq_len, text_field=args.text_field,
                      dtype=args.dtype, device=args.device, resume=args.resume, overwrite=args.overwrite, eval_batches=args.eval_batches)
    print_summary(metrics, args.json)
    return 0
