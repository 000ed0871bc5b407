"""Teacher-logit cache: the teacher runs once over the train rows, and students train against what it stored.

Stored per token of each train row, at the distillation temperature T, as memory-mapped `.npy` arrays
over the whole train split (files are sparse until rows are written):

    indices.npy    int32   [rows, seq_len, k + m]  the teacher's k most likely next tokens, then m tokens drawn from the rest
    log_probs.npy  float32 [rows, seq_len, k + m]  their log-probabilities, log softmax(z / T)
    rest.npy       float32 [rows, seq_len]         log of the probability left outside the top-k (-inf when k = vocabulary)
    built.npy      bool    [rows]              rows whose entries are complete
    cache.json     the fingerprint: teacher weights, tokenizer, packed data (content, tokenizer, seq_len), k, m, T, dtype

Only the rows a run reads are computed, in shards of `SHARD_ROWS` rows: a shard's entries are flushed
to disk before its rows are marked built (an atomic rewrite of `built.npy`), so a build killed at any
moment resumes with the shard it was writing, and no row is ever read before it is complete. An array
whose file is shorter or shaped otherwise than the fingerprint says (a crash of the filesystem, a copy
cut short) is recreated and every row rebuilt. A cache whose fingerprint differs from the run's is
refused. The loss against it is `toolchain.losses.top_k_kl`; the cache does not depend on the seed
or the batch order (rows are looked up by their tokens; the m tail samples of a row are drawn with a
generator seeded by its tokens), so every student, seed and epoch reuses it.

Top-k alone (m = 0) keeps the rest of the mass as one bin: the loss is the KL of the coarsened
distributions, deterministic and exact at k = vocabulary, but biased: the shape of the student's
tail (about a tenth of the teacher's mass at k = 64 on the CPU demo) is never taught. With m > 0 the
tail is sampled from the teacher itself, so no importance weights are needed and the loss and its
gradient are unbiased estimates of the full ones, exact on the top-k. Both are measured against
online KD at equal tokens in benchmarks/results/distill_quality_{width,depth}.md.
"""

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toolchain.errors import UserError, setting
from toolchain.paths import atomic_write_text
from toolchain.progress import progress_bar

log = logging.getLogger(__name__)

CACHE_FORMAT = "1"
CACHE_FILE = "cache.json"
BUILT_FILE = "built.npy"
SHARD_ROWS = 16


def row_digest(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.int32).tobytes(), digest_size=16).digest()


def cache_fingerprint(teacher_fingerprint: str, tokenizer_fingerprint: str, data_key: str, seq_len: int, vocab_size: int,
                      top_k: int, tail_samples: int, temperature: float, dtype: str) -> dict:
    """What the cached numbers depend on; a cache built for another one is refused."""
    return {"format": CACHE_FORMAT, "teacher": teacher_fingerprint, "tokenizer": tokenizer_fingerprint, "data": data_key, "seq_len": seq_len,
            "vocab_size": vocab_size, "top_k": min(top_k, vocab_size), "tail_samples": tail_samples if top_k < vocab_size else 0,
            "temperature": temperature, "dtype": dtype}


@dataclass
class TeacherCache:
    """An open cache: the memory maps, which rows are built, and the slot of each train row's tokens."""

    directory: Path
    fingerprint: dict
    indices: np.ndarray
    log_probs: np.ndarray
    rest: np.ndarray
    built: np.ndarray
    slot_of: dict[bytes, int]

    def slots(self, rows: np.ndarray) -> np.ndarray:
        """The slot of each row (identical rows share the first one's slot: the teacher's output depends only on the tokens)."""
        try:
            return np.array([self.slot_of[row_digest(row)] for row in rows], dtype=np.int64)
        except KeyError:
            raise UserError(f"a training row is not in the train split the teacher cache {self.directory} was built on") from None

    def targets(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices, log_probs, rest_log_mass) of these rows, the arguments of `top_k_kl` (with this cache's tail_samples), on the device of `input_ids`."""
        slots = self.slots(input_ids.cpu().numpy())
        if not self.built[slots].all():
            raise UserError(f"the teacher cache {self.directory} lacks rows this run reads; rerun to build them")
        device = input_ids.device
        return (torch.from_numpy(self.indices[slots]).to(device), torch.from_numpy(self.log_probs[slots]).to(device),
                torch.from_numpy(self.rest[slots]).to(device))


def array_specs(rows: int, fingerprint: dict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    seq_len, k = fingerprint["seq_len"], fingerprint["top_k"] + fingerprint["tail_samples"]
    return {"indices": ((rows, seq_len, k), np.dtype(np.int32)), "log_probs": ((rows, seq_len, k), np.dtype(np.float32)),
            "rest": ((rows, seq_len), np.dtype(np.float32))}


def open_array(path: Path, shape: tuple[int, ...], dtype: np.dtype, writable: bool) -> np.ndarray | None:
    """The memory map of one array, or None if the file is missing, truncated or of another shape or dtype."""
    try:  # read the header first: numpy would silently zero-extend a short file opened for writing
        with path.open("rb") as f:
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(f))
            if read_header is None:
                return None
            stored_shape, fortran_order, stored_dtype = read_header(f)
            data_start = f.tell()
        if (stored_shape, stored_dtype, fortran_order) != (shape, dtype, False) or path.stat().st_size < data_start + dtype.itemsize * int(np.prod(shape)):
            return None
        return np.load(path, mmap_mode="r+" if writable else "r")
    except (OSError, ValueError):
        return None


def save_built(directory: Path, built: np.ndarray) -> None:
    partial = directory / f".{BUILT_FILE}.partial"
    with partial.open("wb") as f:
        np.save(f, built)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, directory / BUILT_FILE)


def open_teacher_cache(directory: Path, fingerprint: dict, rows: np.ndarray, writable: bool) -> TeacherCache:
    """Open the cache in `directory` for the train split `rows`; `writable` creates what is missing and recreates damaged arrays."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"teacher cache {directory} is a file; pass a directory to {setting('distill.teacher_cache')}")
    cache_file = directory / CACHE_FILE
    if cache_file.is_file():
        try:
            stored = json.loads(cache_file.read_text())
        except json.JSONDecodeError:
            stored = {}
        differing = sorted(key for key in set(stored) | set(fingerprint) if stored.get(key) != fingerprint.get(key))
        if differing:
            raise UserError(f"teacher cache {directory} was built for another {', '.join(differing)}; pass another "
                            f"{setting('distill.teacher_cache')} directory or delete this one")
    elif not writable:
        raise UserError(f"{directory} holds no teacher cache")
    specs = array_specs(len(rows), fingerprint)
    arrays = {name: open_array(directory / f"{name}.npy", shape, dtype, writable) for name, (shape, dtype) in specs.items()}
    built = None
    if all(array is not None for array in arrays.values()) and cache_file.is_file():
        with contextlib.suppress(OSError, ValueError):
            built = np.load(directory / BUILT_FILE)
    if built is None or built.shape != (len(rows),) or built.dtype != np.bool_:
        if not writable:
            raise UserError(f"teacher cache {directory} is damaged; rebuild it")
        if cache_file.is_file():
            log.warning("teacher cache %s is damaged or incomplete (an array is truncated or missing); rebuilding every row", directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, (shape, dtype) in specs.items():
            arrays[name] = np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        built = np.zeros(len(rows), dtype=np.bool_)
        save_built(directory, built)
        atomic_write_text(cache_file, json.dumps(fingerprint, indent=1) + "\n")
    slot_of: dict[bytes, int] = {}
    for index, row in enumerate(rows):
        slot_of.setdefault(row_digest(row), index)
    return TeacherCache(directory, fingerprint, arrays["indices"], arrays["log_probs"], arrays["rest"], built, slot_of)


@contextlib.contextmanager
def build_lock(directory: Path):
    """One builder at a time per cache directory (a second waits)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@torch.no_grad()
def teacher_entries(teacher_model, input_ids: torch.Tensor, top_k: int, temperature: float, tail_samples: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each position of these rows: the top-k token ids then `tail_samples` ids drawn from the teacher outside its
    top-k, their log-probabilities, and the log of the mass outside the top-k."""
    logits = teacher_model(input_ids=input_ids, use_cache=False).logits
    indices, log_probs, rest = [], [], []
    for row_ids, row_logits in zip(input_ids, logits):  # one row at a time: the softmax temporaries of one sequence, not of the batch
        log_p = F.log_softmax(row_logits.float() / temperature, dim=-1)
        top = log_p.topk(top_k, dim=-1)
        tail = log_p.scatter(-1, top.indices, float("-inf"))
        rest_log_mass = tail.logsumexp(-1)
        row_indices = top.indices
        if tail_samples:  # in place: at Llama-3's vocabulary and 4,096 tokens each [seq, vocab] copy is 2 GiB
            generator = torch.Generator(device=log_p.device).manual_seed(int.from_bytes(row_digest(row_ids.cpu().numpy())[:8], "little") >> 1)
            tail.sub_(rest_log_mass[:, None]).exp_()
            tail[~torch.isfinite(rest_log_mass)] = 1.0  # no mass outside the top-k: any draw (its weight r is 0)
            row_indices = torch.cat([top.indices, torch.multinomial(tail, tail_samples, replacement=True, generator=generator)], dim=-1)
        rest.append(rest_log_mass.cpu().numpy())
        indices.append(row_indices.to(torch.int32).cpu().numpy())
        log_probs.append(log_p.gather(-1, row_indices).cpu().numpy())
    return np.stack(indices), np.stack(log_probs), np.stack(rest)


def fill_teacher_cache(cache: TeacherCache, teacher_model, rows: np.ndarray, needed: np.ndarray, batch_size: int, device: str) -> int:
    """Compute the entries of the `needed` train rows that are not built yet, shard by shard; returns how many rows it computed."""
    slots = np.unique(cache.slots(rows[needed])) if len(needed) else np.zeros(0, dtype=np.int64)
    missing = slots[~cache.built[slots]]
    if not len(missing):
        return 0
    top_k, tail_samples, temperature = cache.fingerprint["top_k"], cache.fingerprint["tail_samples"], cache.fingerprint["temperature"]
    with progress_bar("teacher cache", total=len(missing), unit="row") as bar:
        for start in range(0, len(missing), SHARD_ROWS):
            shard = missing[start : start + SHARD_ROWS]
            for batch_start in range(0, len(shard), batch_size):
                batch = shard[batch_start : batch_start + batch_size]
                input_ids = torch.from_numpy(np.asarray(rows[batch], dtype=np.int64)).to(device)
                cache.indices[batch], cache.log_probs[batch], cache.rest[batch] = teacher_entries(teacher_model, input_ids, top_k, temperature, tail_samples)
                bar.update(len(batch))
            for array in (cache.indices, cache.log_probs, cache.rest):
                array.flush()
            cache.built[shard] = True
            save_built(cache.directory, cache.built)
    return len(missing)
