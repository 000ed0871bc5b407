"""The training loop shared by `minitron distill` and `minitron finetune`.

What it adds to torch and transformers: a token or step budget turned into optimizer steps over a
global batch (gradient accumulation and torchrun DDP/FSDP with deterministic per-rank shards), and
runs that survive being killed: an output directory that remembers its configuration, atomic
checkpoints (student, optimizer, scheduler, RNG states, data position) every N steps, `--resume` from
the newest intact one, Ctrl-C that checkpoints before exiting, `--overwrite` that replaces an old
run only once the new one is complete, and `train_log.jsonl`. Optimizer (AdamW or SGD) and schedule
(warm-up, then cosine, linear or constant decay to min_lr) come from the settings. Losses are the stage's business: a
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
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toolchain.data import iterate_batches, shard_rows
from toolchain.distributed import Distributed
from toolchain.errors import UserError, setting
from toolchain.modelopt_compat import expected_modelopt_warnings
from toolchain.models import check_safetensors
from toolchain.paths import atomic_write_text, check_output_location, replace_path
from toolchain.progress import progress_bar
from toolchain.settings import TrainingConfig

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
    `foreign_state_key` marks state-dict keys a resumed checkpoint need not hold (e.g. a frozen teacher).
    """

    model: nn.Module
    compute_loss: Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]]
    student_config: object
    frozen: list[nn.Module] = field(default_factory=list)
    foreign_state_key: Callable[[str], bool] = lambda key: False
    """True for keys of `model.state_dict()` that are not the student's (a wrapper's frozen teacher): not checkpointed state."""


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
        raise UserError(f"no training budget; set {setting('training.tokens')} N or {setting('training.steps')} N")
    global_batch = config.global_batch_size
    if global_batch % world_size:
        raise UserError(f"global batch {global_batch} does not split over {world_size} ranks; make {setting('training.global_batch_size')} a multiple of {world_size}")
    per_rank = global_batch // world_size
    micro = min(config.micro_batch_size, per_rank)
    if per_rank % micro:
        raise UserError(f"{per_rank} sequences per rank are not a multiple of the micro batch {micro}; change "
                        f"{setting('training.micro_batch_size')} or {setting('training.global_batch_size')}")
    if train_rows < global_batch:
        raise UserError(f"the train split holds {train_rows} sequences of {seq_len} tokens, fewer than one global batch of {global_batch}; "
                        f"add data, lower {setting('training.global_batch_size')} or lower {setting('data.seq_len')}")
    steps = config.steps if config.steps is not None else math.ceil(config.tokens / (global_batch * seq_len))
    return TrainingPlan(steps, global_batch, micro, per_rank // micro, seq_len)


def epoch_order(row_count: int, epoch: int, seed: int) -> np.ndarray:
    """The permutation of the train rows in one epoch, seeded by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(row_count, generator=generator).numpy()


def global_batch_indices(row_count: int, step: int, global_batch: int, seed: int) -> np.ndarray:
    """Indices of the rows of global batch `step`: consecutive slices of each epoch's order; the tail that fills no batch is skipped."""
    epoch, index = divmod(step, row_count // global_batch)
    return np.sort(epoch_order(row_count, epoch, seed)[index * global_batch : (index + 1) * global_batch])


def global_batch_rows(rows: np.ndarray, step: int, global_batch: int, seed: int) -> np.ndarray:
    return rows[global_batch_indices(len(rows), step, global_batch, seed)]


def rows_of_run(config: TrainingConfig, row_count: int, seq_len: int, world_size: int) -> np.ndarray:
    """Sorted indices of the train rows a run of `config` reads (what a teacher-logit cache must hold for it): a run
    shorter than an epoch reads the head of the first epoch's order, a longer one may read every row."""
    plan = plan_training(config, row_count, seq_len, world_size)
    if plan.total_steps >= row_count // plan.global_batch_size:
        return np.arange(row_count)
    return np.sort(epoch_order(row_count, 0, config.seed)[: plan.total_steps * plan.global_batch_size])


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


def working_dir(out: Path, overwrite: bool) -> Path:
    """Where a run trains: `out`, or with --overwrite of an existing output a directory beside it that
    replaces `out` only when the new run is complete (`publish_run_dir`), so a failed or interrupted
    overwrite loses nothing."""
    out = Path(out)
    check_output_location(out, overwrite=True)
    if overwrite and out.is_dir() and any(out.iterdir()):
        return out.parent / f".{out.name}.overwrite"
    return out


def publish_run_dir(out: Path, work: Path, runtime: Distributed) -> None:
    """Put a completed overwrite run in place of the old output (rank 0; all ranks wait)."""
    if Path(work) != Path(out) and runtime.is_main:
        replace_path(Path(out), Path(work))
    runtime.barrier()


def open_run_dir(out: Path, identity: dict, resume: bool, overwrite: bool) -> list[Path]:
    """Check the run directory against this run; returns the checkpoints to resume from, newest first (none: start afresh).

    Writes nothing. An existing run with the same identity and no checkpoint simply starts again (nothing to lose).
    """
    out = Path(out)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one")
    existing = out.is_dir() and any(out.iterdir())
    if not existing:
        if resume:
            raise UserError(f"--resume: {out} holds no run to resume; start without --resume")
        return []
    if overwrite:
        return []
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
                        "choose another --out or pass --overwrite to replace it once the new run is complete")
    if resume:
        if not checkpoints:
            raise UserError(f"--resume: {out} has no checkpoint yet; start again without --resume")
        return checkpoints[::-1]
    if checkpoints:
        raise UserError(f"{out} holds this run with checkpoints up to {checkpoints[-1].name}; pass --resume to continue it or --overwrite to start over")
    return []


def start_run_dir(out: Path, identity: dict, resume_from: Path | None) -> None:
    """Create or reset the run directory (rank 0): run.json, and a train log cut back to the resumed step."""
    out = Path(out)
    if resume_from is None and out.is_dir():  # open_run_dir allowed starting over: a fresh overwrite dir or a run without checkpoints
        shutil.rmtree(out)
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


def checkpoint_is_intact(checkpoint: Path, world_size: int) -> bool:
    """Whether every file of a checkpoint is present and whole (safetensors header against its size, torch zip directories)."""
    files = [checkpoint / "student" / "model.safetensors", checkpoint / "optimizer.pt", checkpoint / "trainer.pt",
             *(checkpoint / f"rng-rank{rank}.pt" for rank in range(world_size))]
    if not all(path.is_file() for path in files):
        return False
    try:
        check_safetensors(files[0])
        for path in files[1:]:
            zipfile.ZipFile(path).close()  # torch.save writes a zip archive; a truncated one has no readable directory
    except (UserError, zipfile.BadZipFile, OSError):
        return False
    return True


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


def load_checkpoint(checkpoint: Path, task: TrainingTask, optimizer, scheduler, runtime: Distributed) -> tuple[int, int]:
    """Restore student, optimizer, scheduler and this rank's RNG state; returns (step, tokens)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    broadcast = runtime.world_size > 1
    model = task.model
    model_state = load_file(checkpoint / "student" / "model.safetensors") if runtime.is_main or not broadcast else {}
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True) if runtime.is_main or not broadcast else {}
    # strict=False, then our own check: what is not the student's (the task says which keys) may be absent or extra.
    incompatible = set_model_state_dict(model, model_state, options=state_dict_options(broadcast_from_rank0=broadcast, strict=False))
    missing = [key for key in incompatible.missing_keys if not task.foreign_state_key(key)]
    unexpected = [key for key in incompatible.unexpected_keys if not task.foreign_state_key(key)]
    if missing or unexpected:
        raise UserError(f"checkpoint {checkpoint} does not fit the student (missing {missing[:3]}, unexpected {unexpected[:3]}); "
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


def build_optimizer(parameters: list, config: TrainingConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay, betas=tuple(config.adam_betas))


def lr_factor(step: int, total_steps: int, warmup: int, config: TrainingConfig) -> float:
    """Learning rate of `step` as a share of the peak: linear warm-up, then the schedule's decay to min_lr over the rest of the run."""
    if step < warmup:
        return step / warmup  # transformers' convention: the first step of a warm-up runs at lr 0
    floor = config.min_lr / config.lr
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if config.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if config.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig, total_steps: int):
    warmup = config.warmup_for(total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, config))


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
          resume: bool = False, overwrite: bool = False, description: str = "train", resume_hint: str = "continue with --resume") -> TrainingResult:
    """Run the budget from scratch or from the newest intact checkpoint; returns the (unwrapped) trained model.

    `out` is the directory the run trains in (see `working_dir`). Raises KeyboardInterrupt after
    writing a checkpoint when asked to stop; `resume_hint` tells the user how to continue.
    """
    out = Path(out)
    plan = plan_training(config, len(rows), rows.shape[1], runtime.world_size)
    checkpoints = open_run_dir(out, identity, resume, overwrite)
    intact = [checkpoint for checkpoint in checkpoints if checkpoint_is_intact(checkpoint, runtime.world_size)]
    if checkpoints and not intact:
        raise UserError(f"no intact checkpoint in {out / CHECKPOINTS} (the files of {', '.join(c.name for c in checkpoints)} are damaged); "
                        "start over with --overwrite")
    for damaged in checkpoints[: checkpoints.index(intact[0])] if intact else []:
        log.warning("checkpoint %s is damaged; resuming from the previous intact one", damaged)
    resume_from = intact[0] if intact else None
    runtime.barrier()
    if runtime.is_main:
        start_run_dir(out, identity, resume_from)
    runtime.barrier()

    torch.manual_seed(config.seed)
    wrapped = wrap_for_distributed(task, config, runtime)
    parameters = [p for p in task.model.parameters() if p.requires_grad]
    optimizer = build_optimizer(parameters, config)
    scheduler = build_scheduler(optimizer, config, plan.total_steps)
    step, tokens = 0, 0
    if resume_from is not None:
        step, tokens = load_checkpoint(resume_from, task, optimizer, scheduler, runtime)
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

    with StopRequest() as stop, progress_bar(description, total=plan.total_steps, unit="step") as bar, expected_modelopt_warnings():
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
                log.warning("stopped at step %d of %d; %s (checkpoint: %s)", step, plan.total_steps, resume_hint,
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
