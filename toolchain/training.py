"""The training loop shared by `minitron distill` and `minitron finetune`.

What it adds to torch and transformers: a token or step budget turned into optimizer steps over a
global batch (gradient accumulation and torchrun DDP/FSDP with deterministic per-rank shards), and
runs that survive being killed: an output directory that remembers its configuration, atomic
checkpoints (student, optimizer, scheduler, RNG states, data position) every N steps, `--resume`,
Ctrl-C that checkpoints before exiting, and `train_log.jsonl`. Losses are the stage's business: a
stage hands over a `TrainingTask` whose `compute_loss` returns the loss to backpropagate and its parts.

Layout of a run directory (`--out`):
    run.json                   what the run is (models, data, settings); a different one is refused
    train_log.jsonl            one JSON object per optimizer step
    checkpoints/step-NNNNNNNN/ student/ (config.json, model.safetensors), optimizer.pt, trainer.pt, rng-rankR.pt
The stage writes the final model files into the same directory when training ends.

Data order: the train rows are shuffled once per epoch with a generator seeded by (seed, epoch); step s
reads global batch s of that order, and rank r takes `shard_rows(batch, r, world_size)`. So the data a
step sees depends only on the seed and the step, which is what makes resume exact and makes N ranks
see the same global batch as one.
"""

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from toolchain.data import iterate_batches, shard_rows
from toolchain.distributed import Distributed
from toolchain.errors import UserError
from toolchain.paths import atomic_write_text
from toolchain.progress import progress_bar
from toolchain.recipe import TrainingConfig

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
LOG_FILE = "train_log.jsonl"
CHECKPOINTS = "checkpoints"
# Settings that may change between a run and its resumption without changing the result.
RESUMABLE_CHANGES = ("save_every", "keep_checkpoints")


@dataclass
class TrainingTask:
    """What a stage trains: `model` (trainable parameters require grad) and the loss of one micro-batch.

    `compute_loss(wrapped_model, input_ids)` returns a dict whose "loss" is backpropagated; its other
    entries are logged. `wrapped_model` is `model` after DDP/FSDP wrapping; call it for the forward.
    `frozen` lists submodules (the teacher) that FSDP shards as their own units.
    """

    model: nn.Module
    compute_loss: Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]]
    student_config: object
    frozen: list[nn.Module] = field(default_factory=list)


@dataclass
class TrainingPlan:
    """The budget turned into steps and batches for this world size."""

    total_steps: int
    global_batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


def plan_training(config: TrainingConfig, train_rows: int, seq_len: int, world_size: int) -> TrainingPlan:
    """Check the budget and batch shape against the data and the number of ranks."""
    if config.tokens is None and config.steps is None:
        raise UserError("no training budget; pass --tokens N or --steps N")
    global_batch = config.global_batch_size
    if global_batch % world_size:
        raise UserError(f"global batch {global_batch} does not split over {world_size} ranks; use a multiple of {world_size}")
    per_rank = global_batch // world_size
    micro = min(config.micro_batch_size, per_rank)
    if per_rank % micro:
        raise UserError(f"{per_rank} sequences per rank are not a multiple of the micro batch {micro}; change --micro-batch-size or --global-batch-size")
    if train_rows < global_batch:
        raise UserError(f"the train split holds {train_rows} sequences of {seq_len} tokens, fewer than one global batch of {global_batch}; "
                        "add data, lower --global-batch-size or lower --seq-len")
    steps = config.steps if config.steps is not None else math.ceil(config.tokens / (global_batch * seq_len))
    return TrainingPlan(steps, global_batch, micro, per_rank // micro, seq_len)


def global_batch_rows(rows: np.ndarray, step: int, global_batch: int, seed: int) -> np.ndarray:
    """Rows of global batch `step`: each epoch is a fresh permutation seeded by (seed, epoch); the tail that fills no batch is skipped."""
    steps_per_epoch = len(rows) // global_batch
    epoch, index = divmod(step, steps_per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(rows), generator=generator).numpy()
    return rows[np.sort(order[index * global_batch : (index + 1) * global_batch])]


# ---------------------------------------------------------------- run directory and checkpoints


def run_identity(config: TrainingConfig, world_size: int, **inputs) -> dict:
    """What makes two runs the same run: inputs, settings that change the result, and the number of ranks."""
    settings = config.model_dump(mode="json", exclude=set(RESUMABLE_CHANGES))
    return {**inputs, "settings": settings, "world_size": world_size}


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint directory exists only once it is complete)."""
    directory = out / CHECKPOINTS
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.iterdir() if path.is_dir() and path.name.startswith("step-") and (path / "trainer.pt").is_file())


def open_run_dir(out: Path, identity: dict, resume: bool, overwrite: bool) -> Path | None:
    """Check `out` against this run and say which checkpoint to resume from; writes nothing.

    An existing run with the same identity and no checkpoint simply starts again (nothing to lose).
    """
    out = Path(out)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one")
    existing = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if not existing:
        if resume:
            raise UserError(f"--resume: {out} holds no run to resume; start without --resume")
        return None
    if overwrite:
        return None
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory")
    previous = None
    if (out / RUN_FILE).is_file():
        try:
            previous = json.loads((out / RUN_FILE).read_text())
        except json.JSONDecodeError:
            previous = None
    if previous is None:
        raise UserError(f"output directory {out} exists and holds no run of this toolchain; choose another --out or pass --overwrite")
    differing = sorted(key for key in set(previous) | set(identity) if previous.get(key) != identity.get(key))
    if differing == ["settings"]:
        differing = sorted(key for key in set(previous["settings"]) | set(identity["settings"])
                           if previous["settings"].get(key) != identity["settings"].get(key))
    checkpoints = checkpoint_dirs(out)
    if differing:
        raise UserError(f"{out} holds a run with a different configuration ({', '.join(differing)} differ); "
                        "choose another --out or pass --overwrite to start over")
    if resume:
        if not checkpoints:
            raise UserError(f"--resume: {out} has no checkpoint yet; start again without --resume")
        return checkpoints[-1]
    if checkpoints:
        raise UserError(f"{out} holds this run with checkpoints up to {checkpoints[-1].name}; pass --resume to continue it or --overwrite to start over")
    return None


def start_run_dir(out: Path, identity: dict, resume_from: Path | None, overwrite: bool) -> None:
    """Create or reset the run directory (rank 0): run.json, and a train log cut back to the resumed step."""
    out = Path(out)
    if resume_from is None and out.is_dir():  # open_run_dir allowed starting over: an --overwrite or a run without checkpoints
        shutil.rmtree(out)
    elif resume_from is None and out.exists():
        out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
    atomic_write_text(out / RUN_FILE, json.dumps(identity, indent=1) + "\n")
    log_file = out / LOG_FILE
    if resume_from is None:
        log_file.unlink(missing_ok=True)
    elif log_file.is_file():
        step = torch.load(resume_from / "trainer.pt", weights_only=True)["step"]
        kept = [line for line in log_file.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(log_file, "".join(line + "\n" for line in kept))


def save_safetensors(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """save_file refuses tensors that share memory (tied embeddings): store each shared one as a copy."""
    from safetensors.torch import save_file

    seen, tensors = set(), {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        tensors[name] = tensor.detach().clone().contiguous() if key in seen else tensor.detach().contiguous()
        seen.add(key)
    save_file(tensors, str(path), metadata={"format": "pt"})


def state_dict_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def save_checkpoint(out: Path, step: int, tokens: int, model: nn.Module, optimizer, scheduler, rng_state: torch.Tensor,
                    student_config, keep: int, runtime: Distributed) -> Path:
    """Write checkpoint `step` into a hidden directory and rename it into place, then drop the oldest beyond `keep`."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_state = get_model_state_dict(model, options=state_dict_options())  # collective under FSDP
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=state_dict_options())
    partial = out / f".checkpoint-{step:08d}"
    final = out / CHECKPOINTS / f"step-{step:08d}"
    if runtime.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "student").mkdir(parents=True)
    runtime.barrier()
    torch.save(rng_state, partial / f"rng-rank{runtime.rank}.pt")
    if runtime.is_main:
        save_safetensors(model_state, partial / "student" / "model.safetensors")
        student_config.save_pretrained(partial / "student")
        torch.save(optimizer_state, partial / "optimizer.pt")
        torch.save({"step": step, "tokens": tokens, "scheduler": scheduler.state_dict()}, partial / "trainer.pt")
    runtime.barrier()
    if runtime.is_main:
        final.parent.mkdir(exist_ok=True)
        if final.exists():  # the same step written again after a resume: replace it
            shutil.rmtree(final)
        partial.rename(final)
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()
    return final


def load_checkpoint(checkpoint: Path, model: nn.Module, optimizer, scheduler, runtime: Distributed) -> tuple[int, int]:
    """Restore student, optimizer, scheduler and this rank's RNG state; returns (step, tokens)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    broadcast = runtime.world_size > 1
    model_state = load_file(checkpoint / "student" / "model.safetensors") if runtime.is_main or not broadcast else {}
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True) if runtime.is_main or not broadcast else {}
    # strict=False: torch adds the frozen teacher's own tensors to what it loads and ModelOpt then hides them as unexpected.
    incompatible = set_model_state_dict(model, model_state, options=state_dict_options(broadcast_from_rank0=broadcast, strict=False))
    unexpected = [key for key in incompatible.unexpected_keys if not key.startswith("_teacher_model.")]
    if incompatible.missing_keys or unexpected:
        raise UserError(f"checkpoint {checkpoint} does not fit the student (missing {incompatible.missing_keys[:3]}, unexpected {unexpected[:3]}); "
                        "start over with --overwrite")
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=state_dict_options(broadcast_from_rank0=broadcast))
    trainer = torch.load(checkpoint / "trainer.pt", weights_only=True)
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(torch.load(checkpoint / f"rng-rank{runtime.rank}.pt", weights_only=True))
    return trainer["step"], trainer["tokens"]


# ---------------------------------------------------------------- the loop


def prepare_student(model: nn.Module, config: TrainingConfig) -> nn.Module:
    """Training mode and optional gradient checkpointing (HF's, non-reentrant)."""
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def wrap_for_distributed(task: TrainingTask, config: TrainingConfig, runtime: Distributed) -> nn.Module:
    """DDP replicates the model (the frozen teacher included); FSDP shards every decoder layer, each frozen module and the root."""
    if runtime.world_size == 1:
        return task.model
    if config.distributed == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return DistributedDataParallel(task.model, device_ids=device_ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_autocast(config, runtime.device) else MixedPrecisionPolicy()
    for module in list(task.model.modules()):
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module, mp_policy=policy)
    for frozen in task.frozen:
        fully_shard(frozen, mp_policy=policy)
    fully_shard(task.model, mp_policy=policy)
    return task.model


def use_autocast(config: TrainingConfig, device: torch.device) -> bool:
    return config.autocast and device.type == "cuda" and torch.cuda.is_bf16_supported()


def gradient_sync(wrapped: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(wrapped, "no_sync") and not enabled:
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop checks between micro-batches; a second signal stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: finishing the current micro-batch, writing a checkpoint, then exiting (again to abort)")

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


@dataclass
class TrainingResult:
    model: nn.Module
    steps: int
    tokens: int
    seconds: float
    last: dict


def train(task: TrainingTask, rows: np.ndarray, config: TrainingConfig, out: Path, identity: dict, runtime: Distributed,
          resume: bool = False, overwrite: bool = False, description: str = "train") -> TrainingResult:
    """Run the budget from scratch or from the newest checkpoint; returns the (unwrapped) trained model.

    Raises KeyboardInterrupt after writing a checkpoint when asked to stop.
    """
    out = Path(out)
    plan = plan_training(config, len(rows), rows.shape[1], runtime.world_size)
    resume_from = open_run_dir(out, identity, resume, overwrite)
    runtime.barrier()
    if runtime.is_main:
        start_run_dir(out, identity, resume_from, overwrite)
    runtime.barrier()

    torch.manual_seed(config.seed)
    wrapped = wrap_for_distributed(task, config, runtime)
    parameters = [p for p in task.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, config.warmup_steps, plan.total_steps, min_lr=config.min_lr)
    step, tokens = 0, 0
    if resume_from is not None:
        step, tokens = load_checkpoint(resume_from, task.model, optimizer, scheduler, runtime)
        log.info("resuming %s from %s (step %d of %d)", out, resume_from.name, step, plan.total_steps)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_autocast(config, runtime.device) else contextlib.nullcontext()
    last_saved = step if resume_from is not None else -1
    last: dict = {}
    started = time.perf_counter()
    first_step = step

    def checkpoint(rng_state):
        nonlocal last_saved
        save_checkpoint(out, step, tokens, task.model, optimizer, scheduler, rng_state, task.student_config, config.keep_checkpoints, runtime)
        last_saved = step

    with StopRequest() as stop, progress_bar(description, total=plan.total_steps, unit="step") as bar, warnings.catch_warnings():
        # ModelOpt warns when gradient checkpointing re-runs its capture hooks in backward; that is expected.
        warnings.filterwarnings("ignore", message=".*already has an intermediate output stored.*")
        bar.initial = bar.n = step
        bar.refresh()
        while step < plan.total_steps:
            rng_state = torch.get_rng_state()
            step_started = time.perf_counter()
            local_rows = shard_rows(global_batch_rows(rows, step, plan.global_batch_size, config.seed), runtime.rank, runtime.world_size)
            sums: dict[str, float] = {}
            stopped = False
            for index, input_ids in enumerate(iterate_batches(local_rows, plan.micro_batch_size)):
                is_last = index == plan.accumulation_steps - 1
                with gradient_sync(wrapped, is_last), autocast:
                    losses = task.compute_loss(wrapped, input_ids.to(runtime.device))
                    (losses["loss"] / plan.accumulation_steps).backward()
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value.item() / plan.accumulation_steps
                if runtime.any(stop.requested):
                    stopped = True
                    break
            if stopped:
                if last_saved != step and step > 0:
                    checkpoint(rng_state)
                log.warning("stopped at step %d of %d; continue with --resume (checkpoint: %s)", step, plan.total_steps,
                            checkpoint_dirs(out)[-1] if checkpoint_dirs(out) else "none yet")
                raise KeyboardInterrupt
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += plan.tokens_per_step
            seconds = time.perf_counter() - step_started
            last = {"step": step, "tokens": tokens, **runtime.mean(sums), "lr": lr, "grad_norm": float(grad_norm),
                    "tokens_per_second": plan.tokens_per_step / seconds}
            if runtime.is_main:
                with (out / LOG_FILE).open("a") as f:
                    f.write(json.dumps(last) + "\n")
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_second']:,.0f}", refresh=False)
                bar.update(1)
            if step % config.save_every == 0 or step == plan.total_steps:
                checkpoint(torch.get_rng_state())
    return TrainingResult(task.model, step, tokens, time.perf_counter() - started, {**last, "steps_this_session": step - first_step})


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per token (position t predicts token t+1 of the packed row)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def write_final_model(out: Path, model: nn.Module, tokenizer, files: dict[str, str], runtime: Distributed) -> None:
    """Write the plain HF student into `out` beside the run files; config.json moves in last.

    Files go to a hidden directory first and are moved in one by one, so `out` never holds a
    config.json whose weights are missing.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=state_dict_options())
    if not runtime.is_main:
        return
    staging = out / ".final"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    names = sorted((p.name for p in staging.iterdir()), key=lambda name: name == "config.json")
    for name in names:
        os.replace(staging / name, out / name)
    staging.rmdir()
    for name, text in files.items():
        atomic_write_text(out / name, text)


# ---------------------------------------------------------------- CLI flags shared by distill and finetune


def add_training_arguments(parser) -> None:
    group = parser.add_argument_group("training")
    budget = group.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=int, help="token budget (global batch x seq_len per step)")
    budget.add_argument("--steps", type=int, help="optimizer-step budget")
    batch = group.add_mutually_exclusive_group()
    batch.add_argument("--global-batch-size", type=int, help="sequences per optimizer step over all ranks (default 8)")
    batch.add_argument("--global-batch-tokens", type=int, help="tokens per optimizer step over all ranks (a multiple of --seq-len)")
    group.add_argument("--micro-batch-size", type=int, help="sequences per forward/backward on one rank (default 4)")
    group.add_argument("--lr", type=float, help="peak learning rate (default 1e-4)")
    group.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine decay (default 1e-5)")
    group.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 40)")
    group.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    group.add_argument("--grad-clip", type=float, help="gradient-norm clip (default 1.0)")
    group.add_argument("--no-autocast", dest="autocast", action="store_const", const=False, help="no bfloat16 autocast on CUDA")
    group.add_argument("--gradient-checkpointing", action="store_const", const=True, help="recompute activations in backward")
    group.add_argument("--distributed", choices=["ddp", "fsdp"], help="strategy under torchrun (default ddp)")
    group.add_argument("--save-every", type=int, help="checkpoint every N steps (default 100)")
    group.add_argument("--keep-checkpoints", type=int, help="checkpoints kept (default 2)")
    group.add_argument("--seed", type=int, help="seed of the data order (default 0)")
    group.add_argument("--eval-batches", type=int, default=None, help="final eval on at most this many batches of 8 (default: the whole eval split)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete the run in --out and start over")
    parser.add_argument("--json", action="store_true", help="print the final metrics as JSON")


def config_from_args(args, config_class: type[TrainingConfig], extra_fields: tuple[str, ...] = ()):
    """Build the stage's config from the flags that were given; pydantic's complaint becomes a one-line error."""
    from pydantic import ValidationError

    names = ("tokens", "steps", "global_batch_size", "micro_batch_size", "lr", "min_lr", "warmup_steps", "weight_decay",
             "grad_clip", "autocast", "gradient_checkpointing", "distributed", "save_every", "keep_checkpoints", "seed") + extra_fields
    fields = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if getattr(args, "global_batch_tokens", None) is not None:
        if args.global_batch_tokens <= 0 or args.global_batch_tokens % args.seq_len:
            raise UserError(f"--global-batch-tokens {args.global_batch_tokens} must be a positive multiple of --seq-len {args.seq_len}")
        fields["global_batch_size"] = args.global_batch_tokens // args.seq_len
    try:
        return config_class(**fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        flag = "--" + str(error["loc"][0]).replace("_", "-") if error["loc"] else "options"
        raise UserError(f"invalid {flag}: {error['msg'].removeprefix('Value error, ')}") from None


def print_summary(summary: dict, as_json: bool) -> None:
    """The whole summary as JSON, or the few numbers a person reads after a run."""
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    evaluation = summary["eval"]
    rows = {"out": summary["out"], "steps": summary["steps"], "tokens": summary["tokens"], "train seconds": f"{summary['train_seconds']:.1f}",
            "final train loss": f"{summary['final_train'].get('loss', float('nan')):.4f}", "eval perplexity": f"{evaluation['perplexity']:.3f}"}
    if "kl" in evaluation:
        rows.update({"teacher perplexity": f"{evaluation['teacher_perplexity']:.3f}", "KL(teacher || student)": f"{evaluation['kl']:.4f}",
                     "top-1 agreement": f"{evaluation['top1_agreement']:.2%}"})
    width = max(len(key) for key in rows)
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
