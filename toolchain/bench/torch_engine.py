"""The engine behind the torch backend of the benchmark: transformers `generate` with its KV cache, in this process, requests batched.

One engine thread owns the model. Whenever it is free it takes every request waiting (up to
`max_batch_size`), left-pads their prompts into one batch and runs one greedy `generate` for the
batch; a streamer hands each step's tokens to the requests' clients as they are decoded. Requests
that arrive while a batch runs wait for the next one: static batching, which is what plain
transformers offers (the CPU engine and TensorRT-LLM batch in flight). A request's answer ends at
its own `max_new_tokens` or at EOS (which is not counted as an output token), even while its batch
goes on. Needs torch and transformers only, so benchmarks/gpu_check.py runs it on a bare GPU machine.
"""

import queue
import threading
import time
from collections.abc import Iterator

import torch

from toolchain.bench.load import RequestFailed

FINISHED, CLOSE = object(), object()


class BatchStreamer:
    """transformers streamer that routes one generate call's tokens to the requests of its batch."""

    def __init__(self, jobs: list, eos_ids: set[int]):
        self.jobs = jobs
        self.eos_ids = eos_ids
        self.produced = [0] * len(jobs)
        self.done = [False] * len(jobs)
        self.prompt_seen = False
        self.routing_seconds = 0.0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first hands the streamer the prompts
            self.prompt_seen = True
            return
        started = time.perf_counter()
        for index, token in enumerate(value.reshape(-1).tolist()):
            if self.done[index]:
                continue
            job = self.jobs[index]
            if token in self.eos_ids:
                self.finish(index)
                continue
            job.events.put(1)
            self.produced[index] += 1
            if self.produced[index] >= job.request.max_new_tokens:
                self.finish(index)
        self.routing_seconds += time.perf_counter() - started

    def finish(self, index: int) -> None:
        self.done[index] = True
        self.jobs[index].events.put(FINISHED)

    def end(self) -> None:
        for index in range(len(self.jobs)):
            if not self.done[index]:
                self.finish(index)


class Job:
    def __init__(self, request):
        self.request = request
        self.events: queue.Queue = queue.Queue()


class TorchEngine:
    """A loaded causal LM that answers concurrent `send` calls in static batches (see the module docstring)."""

    def __init__(self, model, pad_token_id: int, eos_token_ids: list[int], max_batch_size: int = 8):
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_ids = set(eos_token_ids)
        self.max_batch_size = max_batch_size
        self.routing_seconds = 0.0
        self.batches: list[int] = []  # sizes of the batches run, for the record
        self._inbox: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="torch-engine", daemon=True)
        self._thread.start()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def send(self, request) -> Iterator[int]:
        """Queue the request; yield 1 for every token as its batch decodes it. Raises RequestFailed if generate fails."""
        if not self._thread.is_alive():
            raise RequestFailed("the torch engine thread has stopped")
        job = Job(request)
        self._inbox.put(job)
        while True:
            event = job.events.get()
            if event is FINISHED:
                return
            if isinstance(event, Exception):
                raise RequestFailed(str(event))
            yield event

    def _serve(self) -> None:
        while True:
            job = self._inbox.get()
            if job is CLOSE:
                return
            jobs = [job]
            while len(jobs) < self.max_batch_size:
                try:
                    waiting = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if waiting is CLOSE:
                    self._inbox.put(CLOSE)
                    break
                jobs.append(waiting)
            self._run_batch(jobs)

    def _run_batch(self, jobs: list[Job]) -> None:
        from transformers import GenerationConfig

        prompts = [list(job.request.prompt_ids) for job in jobs]
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + p for p in prompts], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        streamer = BatchStreamer(jobs, self.eos_ids)
        config = GenerationConfig(max_new_tokens=max(job.request.max_new_tokens for job in jobs), do_sample=False,
                                  pad_token_id=self.pad_token_id, eos_token_id=sorted(self.eos_ids))
        self.batches.append(len(jobs))
        try:
            with torch.inference_mode():
                self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config, streamer=streamer)
        except (RuntimeError, ValueError) as exc:  # e.g. out of memory: this batch's requests fail, the runner goes on
            for index, job in enumerate(jobs):
                if not streamer.done[index]:
                    streamer.done[index] = True
                    job.events.put(RuntimeError(f"generate failed: {exc}"))
            return
        finally:
            self.routing_seconds += streamer.routing_seconds
        streamer.end()

    def close(self) -> None:
        self._inbox.put(CLOSE)
        self._thread.join(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
