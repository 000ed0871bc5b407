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
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from toolchain.data import check_seq_len, prepare_data, tokenizer_fingerprint
from toolchain.distributed import distributed_context, prepare_data_on_ranks
from toolchain.errors import UserError, setting
from toolchain.evaluate import check_same_vocabulary, evaluate_model
from toolchain.finetune import add_run_flags, print_training_summary
from toolchain.losses import HiddenStatesHead, chunked_next_token_nll, chunked_token_mean, head_weight, pass_hidden_states, restore_lm_head, top_k_kl
from toolchain.modelopt_compat import expected_modelopt_warnings, modelopt
from toolchain.models import load_config, load_frozen_model, load_model, load_tokenizer, model_fingerprint, resolve_dtype, resolve_model_dir
from toolchain.paths import check_output_location
from toolchain.settings import ComputeConfig, DataConfig, DistillConfig, EvalConfig
from toolchain.teacher_cache import TeacherCache, build_lock, cache_fingerprint, fill_teacher_cache, open_teacher_cache
from toolchain.training import TrainingTask, prepare_student, publish_run_dir, rows_of_run, run_identity, train, working_dir, write_final_model

log = logging.getLogger(__name__)


class TokenKLLoss(_Loss):
    """ModelOpt's logit KL in float32, averaged per token (its own 'mean' also divides by the vocabulary), in chunks of tokens.

    It receives the student's and the teacher's final hidden states (both lm_heads are `HiddenStatesHead`s
    during KD) and forms both sides' logits `chunk_tokens` at a time from the heads' weights, so no
    [batch, seq, vocab] copy of either side exists (see `toolchain.losses`). A head given as None means
    that side's input is its logits already (FSDP shards the heads' weights).
    """

    def __init__(self, temperature: float, chunk_tokens: int, student_head: HiddenStatesHead | None, teacher_head: HiddenStatesHead | None = None):
        super().__init__()
        self.kl = modelopt("distill").LogitsDistillationLoss(temperature=temperature, reduction="none")
        self.chunk_tokens = chunk_tokens
        self.heads = (student_head, teacher_head)  # a tuple, so the criterion does not register the models' weights as its own

    def forward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
        teacher_weight = head_weight(self.heads[1])

        def token_kl(student_logits, teacher_chunk):
            with torch.no_grad():
                teacher_logits = (teacher_chunk @ teacher_weight.T if teacher_weight is not None else teacher_chunk).float()
            return self.kl(student_logits, teacher_logits)

        return chunked_token_mean(student_hidden, head_weight(self.heads[0]), token_kl, teacher_hidden.detach(), chunk_tokens=self.chunk_tokens)


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


def distillation_criterion(config: DistillConfig, mapping: list[tuple[int, int]], student_head: HiddenStatesHead | None,
                           teacher_head: HiddenStatesHead | None = None):
    """ModelOpt criterion and loss balancer; weights are normalised so they sum to 1 with the LM loss's share."""
    mtd = modelopt("distill")

    criterion = {}
    weights = []
    hidden_weight = config.intermediate_loss_weight if config.intermediate_loss != "none" else 0.0
    total = config.logit_loss_weight + config.lm_loss_weight + hidden_weight
    if config.logit_loss_weight > 0:
        criterion[("lm_head", "lm_head")] = TokenKLLoss(config.temperature, config.loss_chunk_tokens, student_head, teacher_head)
        weights.append(config.logit_loss_weight / total)
    if hidden_weight > 0:
        for student_layer, teacher_layer in mapping:
            criterion[(f"model.layers.{student_layer}", f"model.layers.{teacher_layer}")] = HiddenStateLoss(config.intermediate_loss)
            weights.append(hidden_weight / total / len(mapping))
    # Rounding can push the sum a hair above 1, which StaticLossBalancer refuses; below 1 it warns unless an LM loss is passed.
    weights = [w * (1 - 1e-9) for w in weights]
    with expected_modelopt_warnings():
        balancer = mtd.StaticLossBalancer(weights)
    return criterion, balancer


def build_distillation(teacher_model, student_model, config: DistillConfig, mapping: list[tuple[int, int]], fuse_head: bool = True):
    """ModelOpt's distillation model around the student (teacher frozen inside) and the loss function for the loop.

    With `fuse_head` the student's and the teacher's lm_heads become `HiddenStatesHead`s (the KL forms both sides'
    logits in chunks); `restore_lm_head` puts the plain heads back (on the exported student, and on the teacher before
    it is used alone again). Without (FSDP shards those weights), both output their logits and the losses chunk those.
    """
    head = pass_hidden_states(student_model, fuse_head)
    criterion, balancer = distillation_criterion(config, mapping, head, pass_hidden_states(teacher_model, fuse_head))
    distill_model = modelopt("distill").convert(
        student_model, mode=[("kd_loss", {"teacher_model": teacher_model, "criterion": criterion, "loss_balancer": balancer})])
    return distill_model, kd_loss_function(distill_model, config, criterion, head)


def kd_loss_function(distill_model, config: DistillConfig, criterion: dict, head: HiddenStatesHead | None):
    """The loss of one micro-batch for the training loop: ModelOpt's balanced total, and its parts for the log
    (logit_kl, lm_loss, hidden_loss averaged over the mapped layers)."""
    # compute_kd_loss names each loss by its class and position in the criterion
    labels = {f"{loss.__class__.__name__}_{i}": "logit_kl" if isinstance(loss, TokenKLLoss) else "hidden_loss"
              for i, loss in enumerate(criterion.values())}
    hidden_pairs = max(1, sum(label == "hidden_loss" for label in labels.values()))

    def compute_loss(wrapped, input_ids):
        output = wrapped(input_ids=input_ids, use_cache=False)
        student_loss = chunked_next_token_nll(output.logits, head_weight(head), input_ids, config.loss_chunk_tokens) if config.lm_loss_weight > 0 else None
        parts = distill_model.compute_kd_loss(student_loss=student_loss, skip_balancer=True)
        losses = {"loss": distill_model.loss_balancer(parts)}
        for key, value in parts.items():
            label = labels.get(key, "lm_loss")
            losses[label] = losses.get(label, 0) + value.detach() / (hidden_pairs if label == "hidden_loss" else 1)
        return losses

    return compute_loss


def check_pair(teacher_config, student_config, config: DistillConfig) -> None:
    if teacher_config.vocab_size != student_config.vocab_size:
        raise UserError(f"teacher vocabulary ({teacher_config.vocab_size}) and student vocabulary ({student_config.vocab_size}) differ; "
                        "distil into a student pruned from this teacher")
    if config.intermediate_loss != "none" and teacher_config.hidden_size != student_config.hidden_size:
        raise UserError(f"the hidden-state loss needs equal hidden sizes, but the teacher has {teacher_config.hidden_size} and the student "
                        f"{student_config.hidden_size}; use it for depth-pruned students, or set {setting('distill.intermediate_loss')} none")


def cached_kd_loss_function(cache: TeacherCache, config: DistillConfig, head: HiddenStatesHead | None):
    """The loss of one micro-batch against the teacher cache: the top-k KL (and the LM loss), weighted as ModelOpt's
    balancer weighs them online; the student's lm_head is a `HiddenStatesHead`, its logits formed in chunks."""
    total = config.logit_loss_weight + config.lm_loss_weight
    token_kl = partial(top_k_kl, temperature=config.temperature, tail_samples=cache.fingerprint["tail_samples"])

    def compute_loss(wrapped, input_ids):
        hidden = wrapped(input_ids=input_ids, use_cache=False).logits
        kl = chunked_token_mean(hidden, head_weight(head), token_kl, *cache.targets(input_ids), chunk_tokens=config.loss_chunk_tokens)
        losses = {"loss": kl * (config.logit_loss_weight / total), "logit_kl": kl.detach()}
        if config.lm_loss_weight > 0:
            lm_loss = chunked_next_token_nll(hidden, head_weight(head), input_ids, config.loss_chunk_tokens)
            losses["loss"] = losses["loss"] + lm_loss * (config.lm_loss_weight / total)
            losses["lm_loss"] = lm_loss.detach()
        return losses

    return compute_loss


def teacher_cache_for(teacher_dir: Path, tokenizer, packed, settings: DistillConfig, compute: ComputeConfig, runtime, needed: np.ndarray,
                      vocab_size: int, teacher_loader) -> tuple[TeacherCache, int]:
    """Open the run's teacher cache and compute the rows of `needed` it lacks (rank 0, the teacher loaded only then); returns it and the rows computed."""
    fingerprint = cache_fingerprint(model_fingerprint(teacher_dir), tokenizer_fingerprint(tokenizer), packed.directory.name, packed.seq_len,
                                    vocab_size, settings.teacher_cache_top_k, settings.teacher_cache_tail_samples, settings.temperature,
                                    str(resolve_dtype(compute.dtype, runtime.device)))
    rows = packed.split("train")
    directory = Path(settings.teacher_cache)
    computed = 0
    if runtime.is_main:
        with build_lock(directory):
            cache = open_teacher_cache(directory, fingerprint, rows, writable=True)
            if not cache.built[np.unique(cache.slots(rows[needed]))].all():
                computed = fill_teacher_cache(cache, teacher_loader(), rows, needed, settings.micro_batch_size, str(runtime.device))
    runtime.barrier()
    if not runtime.is_main:
        cache = open_teacher_cache(directory, fingerprint, rows, writable=False)
    return cache, computed


def build_teacher_cache(teacher: str, runs: list[DistillConfig], data: DataConfig, compute: ComputeConfig) -> dict:
    """Build the teacher cache of several distillation runs at once (they share its directory): the teacher runs
    once over the union of their train rows, so each run finds its rows there. Returns what was done."""
    teacher_dir = resolve_model_dir(teacher)
    tokenizer = load_tokenizer(teacher_dir)
    teacher_config = load_config(teacher_dir)
    check_seq_len(data.seq_len, teacher_config)
    packed = prepare_data(data, tokenizer)
    row_count = len(packed.split("train"))
    needed = np.unique(np.concatenate([rows_of_run(settings, row_count, data.seq_len, 1) for settings in runs]))
    with distributed_context(compute.device) as runtime:
        _, computed = teacher_cache_for(teacher_dir, tokenizer, packed, runs[0], compute, runtime, needed, teacher_config.vocab_size,
                                        lambda: load_frozen_model(teacher_dir, dtype=compute.dtype, device=str(runtime.device)))
    return {"directory": runs[0].teacher_cache, "rows": len(needed), "computed_rows": computed}


def distill(teacher: str, student: str, out: Path, settings: DistillConfig, data: DataConfig, compute: ComputeConfig, evaluation: EvalConfig,
            resume: bool = False, overwrite: bool = False, resume_hint: str = "continue with --resume") -> dict:
    """Distil `student` from `teacher` on the train split of `data` into `out`; returns the final metrics.

    `out` receives the plain HF student, `train_log.jsonl`, `eval.json` (eval split against the teacher,
    unless `evaluation.max_batches` is 0) and resumable checkpoints; with `overwrite` an existing output
    is replaced only once the new run is complete. With `settings.teacher_cache` the student learns from
    the cache (built first where it lacks this run's rows) and the teacher is loaded only to build it or
    for the final eval. Under torchrun every rank calls this with the same arguments.
    """
    out = Path(out)
    work = working_dir(out, overwrite)
    mtd = modelopt("distill")
    teacher_dir, student_dir = resolve_model_dir(teacher), resolve_model_dir(student)
    tokenizer = load_tokenizer(student_dir)
    check_same_vocabulary(tokenizer, load_tokenizer(teacher_dir), f"student {student}", f"teacher {teacher}")
    if settings.teacher_cache is not None:
        check_output_location(Path(settings.teacher_cache), setting("distill.teacher_cache"), overwrite=True)
    with distributed_context(compute.device) as runtime:
        device = str(runtime.device)
        loaded_teacher = []

        def teacher_model():
            # One process, one teacher: shared with the stages around it. Under torchrun DDP/FSDP wrap it, so each run loads its own.
            if not loaded_teacher:
                loader = load_frozen_model if runtime.world_size == 1 or settings.teacher_cache is not None else load_model
                loaded_teacher.append(loader(teacher_dir, dtype=compute.dtype, device=device))
            return loaded_teacher[0]

        teacher_config = load_config(teacher_dir)
        student_model = load_model(student_dir, dtype=compute.dtype, device=device)
        check_pair(teacher_config, student_model.config, settings)
        check_seq_len(data.seq_len, teacher_config)
        check_seq_len(data.seq_len, student_model.config)
        packed = prepare_data_on_ranks(data, tokenizer, runtime)
        student_config = student_model.config
        inputs = {"teacher": model_fingerprint(teacher_dir), "student": model_fingerprint(student_dir), "data": packed.directory.name}

        mapping = None
        fuse_head = not (runtime.world_size > 1 and settings.distributed == "fsdp")  # FSDP shards the head's weight: chunk the logits instead
        try:  # build_distillation fuses the shared teacher's head; `finally` puts it back however this ends
            if settings.teacher_cache is not None:
                train_rows = packed.split("train")
                needed = rows_of_run(settings, len(train_rows), data.seq_len, runtime.world_size)
                cache, computed = teacher_cache_for(teacher_dir, tokenizer, packed, settings, compute, runtime, needed, teacher_config.vocab_size, teacher_model)
                log.info("teacher cache %s: %d of the run's %d rows computed now", settings.teacher_cache, computed, len(needed))
                head = pass_hidden_states(prepare_student(student_model, settings), fuse_head)
                task = TrainingTask(student_model, cached_kd_loss_function(cache, settings, head), student_config)
                inputs["teacher_cache"] = cache.fingerprint
            else:
                teacher_layers, student_layers = teacher_config.num_hidden_layers, student_config.num_hidden_layers
                mapping = layer_mapping(kept_teacher_layers(student_dir, teacher_layers, student_layers), teacher_layers)
                distill_model, compute_loss = build_distillation(teacher_model(), prepare_student(student_model, settings), settings, mapping, fuse_head)
                task = TrainingTask(distill_model, compute_loss, student_config, frozen=[teacher_model()],
                                    foreign_state_key=lambda key: key.startswith("_teacher_model."))

            identity = run_identity(settings, runtime.world_size, stage="distill", **inputs)
            result = train(task, packed.split("train"), settings, work, identity, runtime, resume=resume, overwrite=overwrite,
                           description="distill", resume_hint=resume_hint)
        finally:
            if loaded_teacher:
                restore_lm_head(loaded_teacher[0])

        plain_student = restore_lm_head(result.model if settings.teacher_cache is not None else mtd.export(result.model)).eval()
        metrics = (evaluate_model(plain_student, packed.split("eval"), evaluation, teacher=teacher_model(), description="eval vs teacher")
                   if evaluation.max_batches != 0 else None)
        summary = {"teacher": str(teacher), "student": str(student), "data": data.spec, "out": str(out), "steps": result.steps,
                   "tokens": result.tokens, "train_seconds": result.seconds, "final_train": result.last, "eval": metrics,
                   "layer_mapping": mapping if settings.intermediate_loss != "none" else None,
                   "teacher_cache": settings.teacher_cache}
        write_final_model(work, plain_student, tokenizer, {"eval.json": json.dumps(summary, indent=2) + "\n"}, runtime)
        publish_run_dir(out, work, runtime)
    return summary


def configure_parser(parser) -> None:
    from toolchain.cli_args import add_recipe_source, add_section_flags

    parser.add_argument("--teacher", required=True, help="teacher: a local Hugging Face directory or a built-in name")
    parser.add_argument("--student", required=True, help="student: a local Hugging Face directory with the teacher's tokenizer (e.g. from `minitron prune`)")
    parser.add_argument("--out", required=True, type=Path, help="run directory: the distilled student, train_log.jsonl, eval.json, checkpoints/")
    add_run_flags(parser)
    add_recipe_source(parser, student=True)
    for section in ("distill", "data", "compute", "eval"):
        add_section_flags(parser, section)


def command(args) -> int:
    from toolchain.cli_args import sections_from_args

    settings, data, compute, evaluation = sections_from_args(args, "distill", "data", "compute", "eval")
    summary = distill(args.teacher, args.student, args.out, settings, data, compute, evaluation, resume=args.resume, overwrite=args.overwrite)
    print_training_summary(summary, args.json)
    return 0
