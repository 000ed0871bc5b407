"""The CPU engine: onnxruntime-genai builds it from a Hugging Face checkpoint and runs it.

`build_cpu_engine` runs onnxruntime-genai's model builder (ONNX graph with a KV cache, fp32 or
int4 round-to-nearest weights) and turns its known failures into one-line errors. `CpuEngine` loads
the result and streams tokens of concurrent requests batched one of two ways (`batching`):

- "inflight" (toolchain/cpu_inflight.py): our scheduler runs the builder's graph with onnxruntime and
  keeps the KV cache itself; a request joins the running batch at the next step and leaves it the
  step it finishes or is cancelled.
- "static": onnxruntime-genai 0.18's `Engine`. Its in-flight ("dynamic") batching needs
  PagedAttention, which exists only for CUDA/WebGPU, so on CPU it batches statically: up to
  `max_batch_size` waiting requests start together, decode in one batch and finish one by one;
  requests that arrive meanwhile wait for that batch to drain. Per-request seeds are not supported
  there, so a seeded sampling request runs alone on its own generator.

It reads onnxruntime-genai folders, not engine directories: the onnxruntime-genai backend
(toolchain/backends/onnxruntime_genai.py) passes the folder, tokenizer and limits named by a manifest.
This is not a TensorRT-LLM engine (toolchain/backends/tensorrt_llm.py) and not a tokenizer service: it
takes and yields token ids; `encode`/`decode`/`stream_text` use the model's Hugging Face tokenizer, so
text matches transformers exactly (onnxruntime-genai's own tokenizer garbles invalid UTF-8 sequences).
"""

import json
import logging
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from toolchain.errors import UserError
from toolchain.models import resolve_model_dir
from toolchain.paths import atomic_output_dir

log = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
PRECISIONS = ("fp32", "int4")


class InvalidRequest(ValueError):
    """A generation request the engine refuses (empty prompt, too long, bad sampling values)."""


def check_builder_can_read(config: dict, model_dir: Path) -> None:
    """Refuse configs that make the builder fail deep inside transformers' config validation."""
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if hidden and heads and hidden % heads:
        raise UserError(
            f"{model_dir}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}; transformers (and so "
            f"onnxruntime-genai's builder) refuses it: prune to a hidden size that is a multiple of {heads}, or prune heads too")


def builder_error(stderr: str) -> str:
    """The last exception line of the builder's output, which names what went wrong."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception)\b", line) or re.match(r"^\w*Error:", line):
            return line
    return lines[-1] if lines else "no output"


def build_cpu_engine(model_dir: Path, out_dir: Path, precision: Literal["fp32", "int4"], cache_dir: Path | None = None) -> None:
    """Build an onnxruntime-genai CPU engine of `model_dir` into `out_dir` (nothing left there on failure).

    Runs `python -m onnxruntime_genai.models.builder` in a subprocess so its memory is returned and its
    progress output stays out of ours; `cache_dir` keeps the builder's intermediate files (a temporary
    directory by default).
    """
    if precision not in PRECISIONS:
        raise UserError(f"CPU engine precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    model_dir = resolve_model_dir(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    check_builder_can_read(config, model_dir)
    with atomic_output_dir(Path(out_dir)) as tmp, tempfile.TemporaryDirectory(prefix="ort-genai-cache-") as scratch:
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(tmp),
                   "-p", precision, "-e", "cpu", "-c", str(cache_dir or scratch)]
        log.info("building the %s CPU engine of %s with onnxruntime-genai", precision, model_dir)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        log.debug("builder output:\n%s%s", result.stdout, result.stderr)
        if result.returncode != 0 or not (tmp / GENAI_CONFIG).is_file():
            raise UserError(f"onnxruntime-genai's model builder failed on {model_dir} ({precision}): "
                            f"{builder_error(result.stderr or result.stdout)}; for its full output run `python -m "
                            f"onnxruntime_genai.models.builder -i {model_dir} -o {out_dir} -p {precision} -e cpu`")


@dataclass
class EngineLimits:
    max_input_len: int
    max_seq_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]


@dataclass
class Submission:
    """One request on its way to the engine thread, and the queue its tokens come back on."""

    prompt_ids: np.ndarray
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    end_id: int | None
    seed: int | None = None
    events: queue.Queue = field(default_factory=queue.Queue)
    request: object = None
    turn_id: int | None = None
    stopped: bool = False


FINISHED, CLOSE = object(), object()
BATCHING = ("inflight", "static")


class CpuEngine:
    """An onnxruntime-genai model served by one engine thread that batches every concurrent `generate`."""

    def __init__(self, model_dir: Path | str, threads: int | None = None, max_batch_size: int = 8, tokenizer_dir: Path | str | None = None,
                 max_input_len: int | None = None, max_seq_len: int | None = None, batching: str = "static",
                 max_num_tokens: int | None = None, kv_cache_tokens: int | None = None, on_admit=None, on_step=None):
        """`model_dir`: an onnxruntime-genai folder; `tokenizer_dir`: its Hugging Face tokenizer (default: `model_dir`,
        where the builder copies it); `max_input_len`/`max_seq_len`: the engine directory's limits (its manifest's),
        capped by the model's context length. In-flight only: `max_num_tokens` prompt + decode tokens per step
        (default max_input_len: a prompt in one chunk), `kv_cache_tokens` the KV cache budget over all running
        requests (default max_batch_size * max_seq_len); `on_admit(queue_seconds)` and `on_step(StepStats)` observe it."""
        import onnxruntime_genai as og

        self._og = og
        from transformers import AutoTokenizer

        if batching not in BATCHING:
            raise UserError(f"batching {batching!r} is not one of {', '.join(BATCHING)}")
        if max_batch_size < 1:
            raise UserError(f"max_batch_size {max_batch_size} cannot hold one request; use at least 1")

        self.model_dir = Path(model_dir)
        if not (self.model_dir / GENAI_CONFIG).is_file():
            raise UserError(f"{self.model_dir} is not an onnxruntime-genai engine folder (no {GENAI_CONFIG}); "
                            "build an engine directory with `minitron build --profile cpu-fp32`")
        genai = json.loads((self.model_dir / GENAI_CONFIG).read_text())["model"]
        context = int(genai["context_length"])
        eos = genai.get("eos_token_id")
        max_seq_len = min(context, max_seq_len or context)
        self.limits = EngineLimits(max_input_len=min(max_input_len or max_seq_len - 1, max_seq_len - 1), max_seq_len=max_seq_len,
                                   vocab_size=int(genai["vocab_size"]), eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]))
        self.threads = threads
        self.max_batch_size = max_batch_size
        self.batching = batching
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or self.model_dir, trust_remote_code=False)
        self._inbox: queue.Queue = queue.Queue()
        self._closed = False
        if batching == "inflight":
            self.scheduler = self._inflight_scheduler(genai, max_num_tokens, kv_cache_tokens, on_admit, on_step)
            target = self._run_inflight
        else:
            overlay = {"engine": {"static_batching": {"max_batch_size": max_batch_size}}, "search": {"max_length": max_seq_len}}
            if threads:
                overlay["model"] = {"decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}}
            config = og.Config(str(self.model_dir))
            config.overlay(json.dumps(overlay))
            self.model = og.Model(config)
            self.on_step = on_step
            target = self._run_engine
        self._thread = threading.Thread(target=target, name="cpu-engine", daemon=True)
        self._thread.start()

    def _inflight_scheduler(self, genai: dict, max_num_tokens: int | None, kv_cache_tokens: int | None, on_admit, on_step):
        """The in-flight scheduler on an onnxruntime session of the builder's graph; budgets that cannot hold one request are refused."""
        from toolchain.cpu_inflight import InflightScheduler, inflight_session

        limits = self.limits
        kv_cache_tokens = kv_cache_tokens or self.max_batch_size * limits.max_seq_len
        if kv_cache_tokens < limits.max_input_len + 1:
            raise UserError(f"kv_cache_tokens {kv_cache_tokens} cannot hold one request of max_input_len {limits.max_input_len} "
                            f"plus one new token; use at least {limits.max_input_len + 1}")
        decoder = genai["decoder"]
        session = inflight_session(self.model_dir / decoder["filename"], int(decoder["hidden_size"]), self.threads)
        return InflightScheduler(session, self.max_batch_size, max_num_tokens or limits.max_input_len, kv_cache_tokens,
                                 int(decoder["head_size"]), limits.eos_token_ids, self._inbox, on_admit, on_step)

    def _run_inflight(self) -> None:
        try:
            self.scheduler.run()
        except Exception as exc:  # a dead engine thread must not leave callers waiting forever
            log.exception("the CPU engine thread stopped")
            self._closed = True
            self.scheduler.fail_all(exc)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def stream_text(self, tokens: Iterator[int]) -> Iterator[str]:
        """One text piece per token (empty while a character is incomplete), then any rest; joined they equal `decode`.

        Decodes a short window of recent tokens, not the whole answer, for each piece (offsets as in vLLM's detokenizer).
        """
        ids: list[int] = []
        prefix_offset = read_offset = 0
        for token in tokens:
            ids.append(token)
            prefix_text = self.decode(ids[prefix_offset:read_offset])
            new_text = self.decode(ids[prefix_offset:])
            if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
                yield new_text[len(prefix_text):]
                prefix_offset, read_offset = read_offset, len(ids)
            else:
                yield ""
        rest, prefix_text = self.decode(ids[prefix_offset:]), self.decode(ids[prefix_offset:read_offset])
        if len(rest) > len(prefix_text):
            yield rest[len(prefix_text):]

    def check_request(self, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
        limits = self.limits
        if len(prompt_ids) == 0:
            raise InvalidRequest("empty prompt: send at least one token of text")
        if len(prompt_ids) > limits.max_input_len:
            raise InvalidRequest(f"prompt has {len(prompt_ids)} tokens, more than the engine's max_input_len {limits.max_input_len}")
        if max_new_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be positive, got {max_new_tokens}")
        if len(prompt_ids) + max_new_tokens > limits.max_seq_len:
            raise InvalidRequest(f"max_tokens {max_new_tokens} is above the engine limit: prompt ({len(prompt_ids)} tokens) plus "
                                 f"max_tokens must not exceed max_seq_len {limits.max_seq_len}")
        if min(prompt_ids) < 0 or max(prompt_ids) >= limits.vocab_size:
            raise InvalidRequest(f"prompt token ids must lie in [0, {limits.vocab_size})")
        if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
            raise InvalidRequest(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, end_id: int | None = None, seed: int | None = None) -> Iterator[int]:
        """Stream new token ids as they are decoded; greedy when temperature is 0; stops at EOS or `end_id`.

        The request is checked and queued now (bad ones raise InvalidRequest here); closing the
        returned iterator early cancels it.
        """
        if self._closed or not self._thread.is_alive():
            raise RuntimeError("the CPU engine is closed")
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else [int(token) for token in prompt]
        self.check_request(prompt_ids, max_new_tokens, temperature, top_k, top_p)
        ids = np.asarray(prompt_ids, dtype=np.int32)
        if seed is not None and temperature > 0 and self.batching == "static":
            return self._generate_seeded(ids, max_new_tokens, temperature, top_k, top_p, end_id, seed)
        submission = Submission(ids, max_new_tokens, temperature, top_k, top_p, end_id, seed)
        self._inbox.put(submission)
        return self._stream(submission)

    def _stream(self, submission: Submission) -> Iterator[int]:
        finished = False
        try:
            while True:
                event = submission.events.get()
                if event is FINISHED:
                    finished = True
                    return
                if isinstance(event, Exception):
                    finished = True
                    raise event
                yield event
        finally:
            if not finished:  # the consumer stopped early: free the batch slot
                self._inbox.put(("cancel", submission))

    def _generate_seeded(self, ids, max_new_tokens, temperature, top_k, top_p, end_id, seed) -> Iterator[int]:
        """Reproducible sampling: a batch-1 generator of its own (the CPU Engine has no per-request seed)."""
        og = self._og
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=True, temperature=temperature, top_k=top_k or self.limits.vocab_size, top_p=top_p,
                                  random_seed=seed, max_length=len(ids) + max_new_tokens)
        generator = og.Generator(self.model, params)
        generator.append_tokens(ids)
        stops = {*self.limits.eos_token_ids, end_id}
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in stops:
                return
            yield token

    def _start(self, engine, submission: Submission) -> None:
        og = self._og
        request = engine.create_request(options=og.RequestOptions())
        options = og.TurnOptions(request)
        options.set_max_generated_tokens(submission.max_new_tokens)
        options.set_do_sample(submission.temperature > 0)
        if submission.temperature > 0:
            options.set_temperature(submission.temperature)
            options.set_top_k(submission.top_k or self.limits.vocab_size)
            options.set_top_p(submission.top_p)
        submission.request = request
        submission.turn_id = request.begin_turn(submission.prompt_ids, options)

    def _run_engine(self) -> None:
        """The one thread that owns the og.Engine (it must): admits requests, steps the batch, routes tokens."""
        og = self._og
        active: dict[int, Submission] = {}
        try:
            self._step_forever(og.Engine(self.model), active)
        except Exception as exc:  # a dead engine thread must not leave callers waiting forever
            log.exception("the CPU engine thread stopped")
            self._closed = True
            for submission in active.values():
                submission.events.put(RuntimeError(f"the CPU engine stopped: {exc}"))

    def _step_forever(self, engine, active: dict) -> None:
        from toolchain.cpu_inflight import StepStats

        og = self._og
        token_flag, finished_flag, failed_flag = (int(og.EngineEventFlags.TOKEN), int(og.EngineEventFlags.TURN_FINISHED),
                                                  int(og.EngineEventFlags.FAILED))
        events = engine.create_event_buffer(max(64, 4 * self.max_batch_size))
        while True:
            try:
                item = self._inbox.get(block=not engine.has_pending_requests())
            except queue.Empty:
                item = None
            while item is not None:
                if item is CLOSE:
                    for submission in active.values():
                        submission.events.put(RuntimeError("the CPU engine was closed"))
                    return
                if isinstance(item, tuple):  # ("cancel", submission)
                    submission = item[1]
                    if id(submission.request) in active and not submission.stopped:
                        submission.stopped = True
                        submission.request.cancel_turn(submission.turn_id)
                else:
                    try:
                        self._start(engine, item)
                        active[id(item.request)] = item
                    except RuntimeError as exc:
                        item.events.put(InvalidRequest(str(exc)))
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = None
            if not engine.has_pending_requests():
                continue
            started, batch = time.perf_counter(), len(active)
            try:
                engine.run(events)
            except RuntimeError as exc:  # the Engine is unusable after a failed step: fail its requests, start a new one
                log.error("onnxruntime-genai engine step failed: %s", exc)
                for submission in active.values():
                    submission.events.put(RuntimeError(f"engine step failed: {exc}"))
                active.clear()
                engine = og.Engine(self.model)
                events = engine.create_event_buffer(max(64, 4 * self.max_batch_size))
                continue
            sent = 0
            for index in range(len(events)):
                event = events[index]
                submission = active.get(id(event.request))
                if submission is None:
                    continue
                flags = int(event.flags)
                if flags & token_flag and not submission.stopped:
                    if event.token == submission.end_id:
                        submission.stopped = True
                        submission.request.cancel_turn(submission.turn_id)
                    else:
                        submission.events.put(int(event.token))
                        sent += 1
                if flags & failed_flag:
                    submission.events.put(RuntimeError(f"generation failed ({event.error_code})"))
                if flags & (finished_flag | failed_flag):
                    submission.events.put(FINISHED)
                    submission.request.close()
                    del active[id(event.request)]
            if self.on_step:
                self.on_step(StepStats(batch, 0, sent, time.perf_counter() - started))

    def close(self) -> None:
        """Stop the engine thread; requests still running get an error."""
        if not self._closed:
            self._closed = True
            self._inbox.put(CLOSE)
            self._thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
