"""In-flight batching of the CPU engine: requests join and leave the running batch at every step.

onnxruntime-genai 0.18's `Engine` batches statically on CPU (its in-flight mode needs the paged
attention of CUDA; a request that arrives while a batch decodes waits for the whole batch to drain,
measured here). This scheduler runs the same ONNX graph the builder wrote with onnxruntime directly
and keeps the KV cache itself, which the graph's GroupQueryAttention allows: each row of the batch
carries its own length (attention mask ones, then zeros), so sequences of different lengths decode
together without recomputing anything.

One thread owns the session and loops: take new and cancelled requests from the inbox; run one
prefill chunk of the oldest waiting request (at most `max_num_tokens` minus the decode rows, so a
long prompt does not stall the others); run one decode step for every running sequence; send each
its token; drop finished and cancelled rows at once. A sequence joins the decode batch the step
after its prefill. The KV budget (`kv_cache_tokens`) is reserved per request for prompt + max_tokens
at admission, so the cache never outgrows it.
"""

import logging
import queue
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from toolchain.cpu_engine import CLOSE, FINISHED, InvalidRequest

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    """What the scheduler reports after each engine step (the Triton model turns it into metrics)."""

    batch_size: int  # sequences decoded in this step
    prefill_tokens: int
    new_tokens: int  # tokens sent to clients
    seconds: float


@dataclass
class Sequence:
    """A request in the scheduler: its prompt, how much of it is in the cache, and its own sampler."""

    submission: object  # cpu_engine.Submission
    rng: np.random.Generator
    submitted_at: float
    prefilled: int = 0
    cache: list | None = None  # while prefilling: its own [1, kv_heads, length, head_dim] per cache input
    length: int = 0  # tokens in the KV cache
    generated: int = 0
    last_token: int = 0
    admitted: bool = False  # holds its KV reservation
    done: bool = False

    @property
    def reserved_tokens(self) -> int:
        return len(self.submission.prompt_ids) + self.submission.max_new_tokens


def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when temperature is 0, else temperature / top-k / top-p sampling from one row of logits."""
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    order = np.argsort(-scaled)
    if top_k:
        order = order[:top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if top_p < 1:
        keep = int(np.searchsorted(np.cumsum(probs), top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])


@dataclass
class InflightScheduler:
    """Owns an onnxruntime session of the builder's graph; `run` is the engine thread's loop (see the module docstring)."""

    session: object  # onnxruntime.InferenceSession
    max_batch_size: int
    max_num_tokens: int
    kv_cache_tokens: int
    head_dim: int
    eos_token_ids: tuple[int, ...]
    inbox: queue.Queue
    on_admit: object = None  # callable(queue_seconds) or None
    on_step: object = None  # callable(StepStats) or None
    waiting: deque = field(default_factory=deque)
    prefilling: Sequence | None = None
    running: list = field(default_factory=list)
    cache: list | None = None  # the running batch's cache: [batch, kv_heads, longest length, head_dim] per cache input

    def __post_init__(self):
        inputs = self.session.get_inputs()
        self.cache_names = [spec.name for spec in inputs if spec.name.startswith("past_key_values.")]
        self.present_names = [name.replace("past_key_values.", "present.") for name in self.cache_names]
        self.kv_heads = next(spec for spec in inputs if spec.name == self.cache_names[0]).shape[1]
        self.reserved = 0  # KV tokens reserved by admitted requests
        self.sent = 0  # tokens sent in the current step

    # --- requests in and out ---------------------------------------------------------------------

    def send(self, sequence: Sequence, event) -> None:
        sequence.submission.events.put(event)

    def all_sequences(self) -> list[Sequence]:
        return [*self.waiting, *([self.prefilling] if self.prefilling else []), *self.running]

    def finish(self, sequence: Sequence, event=FINISHED) -> None:
        """End the sequence's stream with `event` (FINISHED or an exception) and release its KV reservation."""
        if not sequence.done:
            sequence.done = True
            if sequence.admitted:
                self.reserved -= sequence.reserved_tokens
            self.send(sequence, event)

    def take_inbox(self, block: bool) -> bool:
        """Apply what the inbox holds (waiting for one item when `block`); False when the engine is closed."""
        try:
            item = self.inbox.get(block=block)
        except queue.Empty:
            return True
        while True:
            if item is CLOSE:
                return False
            if isinstance(item, tuple):  # ("cancel", submission): its slot and cache are freed now
                self.cancel(item[1])
            else:
                self.waiting.append(Sequence(item, np.random.default_rng(item.seed), time.monotonic()))
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return True

    def cancel(self, submission) -> None:
        for sequence in self.all_sequences():
            if sequence.submission is submission:
                self.finish(sequence)
        self.waiting = deque(sequence for sequence in self.waiting if not sequence.done)
        if self.prefilling is not None and self.prefilling.done:
            self.prefilling = None
        self.drop_finished()

    def admit(self) -> None:
        """Start prefilling the oldest waiting request when a batch slot and its KV reservation are free."""
        if self.prefilling is not None or not self.waiting or len(self.running) >= self.max_batch_size:
            return
        sequence = self.waiting[0]
        if sequence.reserved_tokens > self.kv_cache_tokens:
            self.waiting.popleft()
            self.finish(sequence, InvalidRequest(f"prompt ({len(sequence.submission.prompt_ids)} tokens) plus max_tokens "
                                                 f"({sequence.submission.max_new_tokens}) exceed the KV-cache budget of {self.kv_cache_tokens} tokens"))
            return
        if self.reserved + sequence.reserved_tokens > self.kv_cache_tokens:
            return  # waits for running sequences to free their reservation
        self.waiting.popleft()
        self.reserved += sequence.reserved_tokens
        sequence.admitted = True
        self.prefilling = sequence
        if self.on_admit:
            self.on_admit(time.monotonic() - sequence.submitted_at)

    # --- the engine steps ------------------------------------------------------------------------

    def forward(self, input_ids: np.ndarray, mask: np.ndarray, cache: list) -> tuple[np.ndarray, list]:
        feed = {"input_ids": input_ids, "attention_mask": mask, **dict(zip(self.cache_names, cache))}
        logits, *present = self.session.run(["logits", *self.present_names], feed)
        return logits, present

    def empty_cache(self, batch: int) -> list:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32) for _ in self.cache_names]

    def prefill_chunk(self) -> int:
        """Feed the prefilling request its next chunk of prompt; when the prompt is in, emit its first token."""
        sequence = self.prefilling
        prompt = sequence.submission.prompt_ids
        chunk = max(1, self.max_num_tokens - len(self.running))
        ids = prompt[sequence.prefilled:sequence.prefilled + chunk]
        cache = sequence.cache or self.empty_cache(1)
        total = sequence.prefilled + len(ids)
        logits, sequence.cache = self.forward(ids[None, :].astype(np.int64), np.ones((1, total), dtype=np.int64), cache)
        sequence.prefilled = sequence.length = total
        if total == len(prompt):
            self.prefilling = None
            self.emit(sequence, logits[0, -1])
            if not sequence.done:
                self.join(sequence)
        return len(ids)

    def join(self, sequence: Sequence) -> None:
        """Append a prefilled sequence to the decode batch (its cache padded to the batch's longest, or the batch's to its)."""
        if not self.running:
            self.cache, self.running = sequence.cache, [sequence]
        else:
            width = max(self.cache[0].shape[2], sequence.length)
            self.cache = [np.concatenate([pad_length(batch, width), pad_length(own, width)], axis=0)
                          for batch, own in zip(self.cache, sequence.cache)]
            self.running.append(sequence)
        sequence.cache = None

    def decode_step(self) -> None:
        """One new token for every running sequence, in one batch."""
        lengths = np.array([sequence.length for sequence in self.running])
        width = int(lengths.max())
        cache = [layer[:, :, :width] for layer in self.cache]
        mask = (np.arange(width + 1)[None, :] <= lengths[:, None]).astype(np.int64)
        ids = np.array([[sequence.last_token] for sequence in self.running], dtype=np.int64)
        logits, self.cache = self.forward(ids, mask, cache)
        for row, sequence in enumerate(self.running):
            sequence.length += 1
            self.emit(sequence, logits[row, -1])
        self.drop_finished()

    def emit(self, sequence: Sequence, logits: np.ndarray) -> None:
        """Sample the sequence's next token from its logits and send it, or finish it (EOS, end_id, max_tokens)."""
        submission = sequence.submission
        token = sample(logits, submission.temperature, submission.top_k, submission.top_p, sequence.rng)
        if token in self.eos_token_ids or token == submission.end_id:
            self.finish(sequence)
            return
        self.send(sequence, token)
        self.sent += 1
        sequence.last_token, sequence.generated = token, sequence.generated + 1
        if sequence.generated >= submission.max_new_tokens:
            self.finish(sequence)

    def drop_finished(self) -> None:
        keep = [row for row, sequence in enumerate(self.running) if not sequence.done]
        if len(keep) == len(self.running):
            return
        self.running = [self.running[row] for row in keep]
        if not self.running:
            self.cache = None
            return
        width = max(sequence.length for sequence in self.running)
        self.cache = [np.ascontiguousarray(layer[keep, :, :width]) for layer in self.cache]

    def run(self) -> None:
        """The engine thread's loop, until CLOSE; requests still in it then get an error."""
        while True:
            idle = self.prefilling is None and not self.running and not self.waiting
            if not self.take_inbox(block=idle):
                for sequence in self.all_sequences():
                    self.finish(sequence, RuntimeError("the CPU engine was closed"))
                return
            self.admit()
            if self.prefilling is None and not self.running:
                continue  # nothing admitted: the waiting request was refused (over the budget), or none waits
            started, self.sent = time.perf_counter(), 0
            try:
                prefill_tokens = self.prefill_chunk() if self.prefilling is not None else 0
                batch = len(self.running)
                if self.running:
                    self.decode_step()
            except Exception as exc:  # a failed step fails the requests in it, not the engine
                log.exception("in-flight engine step failed")
                for sequence in [*([self.prefilling] if self.prefilling else []), *self.running]:
                    self.finish(sequence, RuntimeError(f"engine step failed: {exc}"))
                self.prefilling, self.running, self.cache = None, [], None
                continue
            if self.on_step:
                self.on_step(StepStats(batch, prefill_tokens, self.sent, time.perf_counter() - started))

    def fail_all(self, exc: Exception) -> None:
        for sequence in self.all_sequences():
            self.finish(sequence, RuntimeError(f"the CPU engine stopped: {exc}"))


def pad_length(cache: np.ndarray, width: int) -> np.ndarray:
    """A cache [batch, heads, length, head_dim] zero-padded (masked out) to `width` positions."""
    missing = width - cache.shape[2]
    return cache if missing <= 0 else np.pad(cache, ((0, 0), (0, 0), (0, missing), (0, 0)))

