"""In-flight batching of the CPU engine: requests join and leave the running batch at every step.

onnxruntime-genai 0.18's `Engine` batches statically on CPU (its in-flight mode needs the paged
attention of CUDA; a request that arrives while a batch decodes waits for the whole batch to drain,
measured here). This scheduler runs the same ONNX graph the builder wrote with onnxruntime directly
and keeps the KV cache itself, which the graph's GroupQueryAttention allows: each row of the batch
carries its own length (attention mask ones, then zeros), so sequences of different lengths decode
together without recomputing anything. The running batch's cache is one preallocated buffer per
cache input, [rows, kv_heads, capacity, head_dim], that a decode step reads and extends in place
(its past and present bound to the same memory, which GroupQueryAttention supports): no step copies
the cache. A finished row is refilled by moving the last row into it.

One thread owns the session and loops: take new and cancelled requests from the inbox; prefill
within the step's token budget (`max_num_tokens` minus the decode rows): the waiting prompts that
fit together in one forward (right-padded to the longest, each row's cache kept to its own length),
or one chunk of a prompt too long for the budget, so a long prompt does not stall the others; run
one decode step for every running sequence, the just-prefilled included; send each its token; drop
finished and cancelled rows at once. The KV budget (`kv_cache_tokens`) is reserved per request for
prompt + max_tokens at admission, so the tokens cached never outgrow it (the buffer holds rows x
the longest reservation among them, rounded up to `CACHE_GRANULE`).

The session runs the builder's graph with one change (`sampled_logits_graph`): logits are computed
only for the rows the scheduler samples from (each prompt's last token), not for every prompt
position; the LM head over all of them was about a third of a prefill's work. The session's threads
sleep rather than spin between operators, so the Triton process beside them gets the cores.
"""

import logging
import queue
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolchain.cpu_engine import CLOSE, FINISHED, InvalidRequest

log = logging.getLogger(__name__)

CACHE_GRANULE = 64  # the cache buffer's length grows in steps of this many positions
LOGIT_ROWS = "logit_rows"  # the added graph input: flat (row * sequence_length + position) indices of the positions to score


def sampled_logits_graph(model_path: Path, hidden_size: int) -> bytes:
    """The builder's graph (weights left in its external data file) with the LM head applied only at `logit_rows`.

    Inserts Reshape [-1, hidden] -> Gather(logit_rows) -> Reshape [-1, 1, hidden] before the node that writes
    `logits`, so logits are [len(logit_rows), 1, vocab].
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    lm_head = next(node for node in graph.node if "logits" in node.output)
    graph.initializer.extend([numpy_helper.from_array(np.array([-1, hidden_size], dtype=np.int64), "logit_rows/flat_shape"),
                              numpy_helper.from_array(np.array([-1, 1, hidden_size], dtype=np.int64), "logit_rows/row_shape")])
    nodes = [helper.make_node("Reshape", [lm_head.input[0], "logit_rows/flat_shape"], ["logit_rows/flat"], name="logit_rows/Flatten"),
             helper.make_node("Gather", ["logit_rows/flat", LOGIT_ROWS], ["logit_rows/rows"], name="logit_rows/Gather", axis=0),
             helper.make_node("Reshape", ["logit_rows/rows", "logit_rows/row_shape"], ["logit_rows/hidden"], name="logit_rows/Rows")]
    lm_head.input[0] = "logit_rows/hidden"
    position = list(graph.node).index(lm_head)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    graph.input.append(helper.make_tensor_value_info(LOGIT_ROWS, onnx.TensorProto.INT64, ["logit_rows"]))
    logits = next(output for output in graph.output if output.name == "logits")
    vocab = logits.type.tensor_type.shape.dim[2]
    logits.CopyFrom(helper.make_tensor_value_info("logits", logits.type.tensor_type.elem_type, ["logit_rows", 1, vocab.dim_value or vocab.dim_param]))
    return model.SerializeToString()


def inflight_session(model_path: Path, hidden_size: int, threads: int | None):
    """An onnxruntime session of `sampled_logits_graph`, its weights read from the engine folder."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(Path(model_path).parent))
    return ort.InferenceSession(sampled_logits_graph(model_path, hidden_size), options, providers=["CPUExecutionProvider"])


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
    prefilling: Sequence | None = None  # a prompt too long for one step's budget, prefilled chunk by chunk
    running: list = field(default_factory=list)
    cache: list | None = None  # the running batch's cache buffer: [rows, kv_heads, capacity, head_dim] per cache input; row i is running[i]

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

    def admit(self, budget: int) -> list[Sequence]:
        """Take the waiting requests (oldest first) that a batch slot, their KV reservation and this step's token budget allow.

        Whole prompts are taken while, padded to the longest, they fit `budget` together; a first prompt longer
        than the budget is taken alone (it is then prefilled chunk by chunk).
        """
        batch: list[Sequence] = []
        while self.waiting and len(self.running) + len(batch) < self.max_batch_size:
            sequence = self.waiting[0]
            if sequence.reserved_tokens > self.kv_cache_tokens:
                self.waiting.popleft()
                self.finish(sequence, InvalidRequest(f"prompt ({len(sequence.submission.prompt_ids)} tokens) plus max_tokens "
                                                     f"({sequence.submission.max_new_tokens}) exceed the KV-cache budget of {self.kv_cache_tokens} tokens"))
                continue
            if self.reserved + sequence.reserved_tokens > self.kv_cache_tokens:
                break  # waits for running sequences to free their reservation
            longest = max(len(candidate.submission.prompt_ids) for candidate in [*batch, sequence])
            if batch and longest * (len(batch) + 1) > budget:
                break
            self.waiting.popleft()
            self.reserved += sequence.reserved_tokens
            sequence.admitted = True
            batch.append(sequence)
            if self.on_admit:
                self.on_admit(time.monotonic() - sequence.submitted_at)
            if longest > budget:
                break
        return batch

    # --- the engine steps ------------------------------------------------------------------------

    def forward(self, input_ids: np.ndarray, mask: np.ndarray, cache: list, logit_rows: np.ndarray) -> tuple[np.ndarray, list]:
        """One pass of the graph; logits [len(logit_rows), vocab] at the flat positions `logit_rows` of `input_ids`."""
        feed = {"input_ids": input_ids, "attention_mask": mask, LOGIT_ROWS: logit_rows, **dict(zip(self.cache_names, cache))}
        logits, *present = self.session.run(["logits", *self.present_names], feed)
        return logits[:, 0], present

    def empty_cache(self, batch: int) -> list:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32) for _ in self.cache_names]

    def prefill(self) -> int:
        """Prefill within this step's token budget (see the module docstring); returns the prompt tokens fed."""
        budget = max(1, self.max_num_tokens - len(self.running))
        if self.prefilling is None:
            batch = self.admit(budget)
            if len(batch) == 1 and len(batch[0].submission.prompt_ids) > budget:
                self.prefilling = batch[0]
            elif batch:
                return self.prefill_prompts(batch)
        return self.prefill_chunk(budget) if self.prefilling is not None else 0

    def prefill_prompts(self, batch: list[Sequence]) -> int:
        """Whole prompts in one forward, right-padded to the longest; each emits its first token and joins the decode batch."""
        lengths = np.array([len(sequence.submission.prompt_ids) for sequence in batch])
        width = int(lengths.max())
        ids = np.zeros((len(batch), width), dtype=np.int64)
        for row, sequence in enumerate(batch):
            ids[row, :lengths[row]] = sequence.submission.prompt_ids
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        try:
            logits, cache = self.forward(ids, mask, self.empty_cache(len(batch)), np.arange(len(batch)) * width + lengths - 1)
        except Exception as exc:  # these are not running yet: the step's failure handler would miss them
            for sequence in batch:
                self.finish(sequence, RuntimeError(f"engine step failed: {exc}"))
            raise
        for row, sequence in enumerate(batch):
            sequence.prefilled = sequence.length = int(lengths[row])
            self.emit(sequence, logits[row])
        self.join(batch, cache)
        return int(lengths.sum())

    def prefill_chunk(self, budget: int) -> int:
        """Feed the long prompt being prefilled its next chunk; when the prompt is in, emit its first token and join it."""
        sequence = self.prefilling
        prompt = sequence.submission.prompt_ids
        ids = prompt[sequence.prefilled:sequence.prefilled + budget]
        cache = sequence.cache or self.empty_cache(1)
        total = sequence.prefilled + len(ids)
        logits, sequence.cache = self.forward(ids[None, :].astype(np.int64), np.ones((1, total), dtype=np.int64), cache,
                                              np.array([len(ids) - 1]))
        sequence.prefilled = sequence.length = total
        if total == len(prompt):
            self.prefilling = None
            self.emit(sequence, logits[0])
            self.join([sequence], sequence.cache)
            sequence.cache = None
        return len(ids)

    def join(self, sequences: list[Sequence], cache: list) -> None:
        """Copy prefilled sequences' cache (rows of `cache`) into the buffer after the running rows; finished ones leave."""
        first, rows = len(self.running), len(self.running) + len(sequences)
        self.reserve(rows, max(sequence.reserved_tokens for sequence in [*self.running, *sequences]))
        for layer, own in zip(self.cache, cache):
            layer[first:rows, :, :own.shape[2]] = own
        self.running.extend(sequences)
        self.drop_finished()

    def reserve(self, rows: int, length: int) -> None:
        """Grow the cache buffer (keeping the running rows) to at least `rows` x `length` positions."""
        old = self.cache
        if old is not None and rows <= old[0].shape[0] and length <= old[0].shape[2]:
            return
        if old is not None:
            rows, length = min(self.max_batch_size, max(rows, 2 * old[0].shape[0])), max(length, old[0].shape[2])
        length = -(-length // CACHE_GRANULE) * CACHE_GRANULE
        self.cache = [np.zeros((rows, self.kv_heads, length, self.head_dim), dtype=np.float32) for _ in self.cache_names]
        for layer, previous in zip(self.cache, old or []):
            layer[:len(self.running), :, :previous.shape[2]] = previous[:len(self.running)]

    def decode_step(self) -> None:
        """One new token for every running sequence, in one batch, the cache extended in place."""
        import onnxruntime as ort

        rows = len(self.running)
        lengths = np.array([sequence.length for sequence in self.running])
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.array([[sequence.last_token] for sequence in self.running], dtype=np.int64))
        binding.bind_cpu_input("attention_mask", (np.arange(lengths.max() + 1)[None, :] <= lengths[:, None]).astype(np.int64))
        binding.bind_cpu_input(LOGIT_ROWS, np.arange(rows, dtype=np.int64))
        binding.bind_output("logits")  # the first output
        for past, present, layer in zip(self.cache_names, self.present_names, self.cache):
            value = ort.OrtValue.ortvalue_from_numpy(layer[:rows])
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()[:, 0]
        for row, sequence in enumerate(self.running):
            sequence.length += 1
            self.emit(sequence, logits[row])
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
        """Remove finished rows, moving the last running rows into their places (only their filled positions are copied)."""
        rows = len(self.running)
        kept = rows - sum(sequence.done for sequence in self.running)
        if kept == rows:
            return
        movers = [row for row in range(kept, rows) if not self.running[row].done]
        holes = [row for row in range(kept) if self.running[row].done]
        for hole, mover in zip(holes, movers):
            length = self.running[mover].length
            for layer in self.cache:
                layer[hole, :, :length] = layer[mover, :, :length]
            self.running[hole] = self.running[mover]
        del self.running[kept:]
        if not self.running:
            self.cache = None  # the buffer's memory goes back while idle

    def step(self) -> StepStats:
        """One engine step: prefill within the token budget, then one decode for every running sequence."""
        started, self.sent = time.perf_counter(), 0
        prefill_tokens = self.prefill()
        batch = len(self.running)
        if self.running:
            self.decode_step()
        return StepStats(batch, prefill_tokens, self.sent, time.perf_counter() - started)

    def run(self) -> None:
        """The engine thread's loop, until CLOSE; requests still in it then get an error."""
        while True:
            idle = self.prefilling is None and not self.running and not self.waiting
            if not self.take_inbox(block=idle):
                for sequence in self.all_sequences():
                    self.finish(sequence, RuntimeError("the CPU engine was closed"))
                return
            try:
                stats = self.step()
            except Exception as exc:  # a failed step fails the requests in it, not the engine
                log.exception("in-flight engine step failed")
                for sequence in [*([self.prefilling] if self.prefilling else []), *self.running]:
                    self.finish(sequence, RuntimeError(f"engine step failed: {exc}"))
                self.prefilling, self.running, self.cache = None, [], None
                continue
            if self.on_step and (stats.prefill_tokens or stats.batch_size):
                self.on_step(stats)

    def fail_all(self, exc: Exception) -> None:
        for sequence in self.all_sequences():
            self.finish(sequence, RuntimeError(f"the CPU engine stopped: {exc}"))
