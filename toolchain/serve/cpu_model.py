"""Triton python-backend model that serves a CPU engine behind the TensorRT-LLM ensemble's interface.

Copied by the onnxruntime-genai backend into `<repository>/<model name>/1/model.py`; it runs inside Triton's python
stub, never in the toolchain's own process. Inputs text_input, max_tokens and optional stream,
temperature, top_k, top_p, end_id, seed; output text_output. The model is decoupled: with
stream=true every new token goes out as its own response, otherwise one response carries the whole
text. `execute` only checks and queues requests; one thread per request relays tokens from the
CpuEngine, whose engine thread batches all requests of this instance together (in flight or
statically, as the `batching` parameter says). A cancelled request (the client closed its stream)
leaves the batch at the next token. Custom metrics, labelled with the model name: queue time
(in-flight: submission to the start of its prefill), batch size per engine step, output tokens
(a counter), output tokens/s over the last few seconds and seconds per engine step.
"""

import json
import threading
import time
from collections import deque

import numpy as np
import triton_python_backend_utils as pb_utils

from toolchain.cpu_engine import CpuEngine, InvalidRequest

OPTIONAL_SCALARS = {"stream": False, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "end_id": None, "seed": None}


def scalar(request, name, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise InvalidRequest(f"input {name} must hold one value per request, got {values.size}")
    value = values[0]
    return value.item() if isinstance(value, np.generic) else value


def text_response(text: str):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_))])


def error_response(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))


class EngineMetrics:
    """Triton custom metrics fed by the engine thread's callbacks."""

    WINDOW_S = 5.0

    def __init__(self, model_name: str):
        labels = {"model": model_name}
        family = pb_utils.MetricFamily
        self.families = [
            family("minitron_queue_seconds", "Seconds a request waited before the engine started its prompt (in-flight batching)", family.HISTOGRAM),
            family("minitron_batch_size", "Requests decoded together in one engine step", family.HISTOGRAM),
            family("minitron_output_tokens", "Tokens sent to clients", family.COUNTER),
            family("minitron_output_tokens_per_second", f"Output tokens per second over the last {self.WINDOW_S:.0f} s", family.GAUGE),
            family("minitron_step_seconds", "Seconds one engine step took (the running batch's prefill and decode)", family.HISTOGRAM),
        ]
        self.queue_seconds = self.families[0].Metric(labels=labels, buckets=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30])
        self.batch_size = self.families[1].Metric(labels=labels, buckets=[1, 2, 4, 8, 16, 32, 64])
        self.output_tokens = self.families[2].Metric(labels=labels)
        self.tokens_per_second = self.families[3].Metric(labels=labels)
        self.step_seconds = self.families[4].Metric(labels=labels, buckets=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5])
        self.recent: deque = deque()  # (time, tokens) of recent steps

    def admitted(self, queue_seconds: float) -> None:
        self.queue_seconds.observe(queue_seconds)

    def stepped(self, stats) -> None:
        now = time.monotonic()
        self.step_seconds.observe(stats.seconds)
        if stats.batch_size:
            self.batch_size.observe(stats.batch_size)
        if stats.new_tokens:
            self.output_tokens.increment(stats.new_tokens)
        self.recent.append((now, stats.new_tokens))
        while self.recent and self.recent[0][0] < now - self.WINDOW_S:
            self.recent.popleft()
        self.tokens_per_second.set(sum(tokens for _, tokens in self.recent) / self.WINDOW_S)


class TritonPythonModel:
    def initialize(self, args):
        parameters = {key: value["string_value"] for key, value in json.loads(args["model_config"])["parameters"].items()}
        self.metrics = EngineMetrics(args["model_name"])
        self.engine = CpuEngine(parameters["model_dir"], threads=int(parameters["threads"]) or None,
                                max_batch_size=int(parameters["engine_max_batch_size"]), tokenizer_dir=parameters["tokenizer_dir"],
                                max_input_len=int(parameters["max_input_len"]), max_seq_len=int(parameters["max_seq_len"]),
                                batching=parameters["batching"], max_num_tokens=int(parameters["max_num_tokens"]),
                                kv_cache_tokens=int(parameters["kv_cache_tokens"]), on_admit=self.metrics.admitted,
                                on_step=self.metrics.stepped)

    def parse(self, request) -> dict:
        prompt = scalar(request, "text_input", None)
        prompt = prompt.decode("utf-8", errors="replace") if isinstance(prompt, bytes) else str(prompt)
        if not prompt.strip():
            raise InvalidRequest("empty prompt: text_input must hold some text")
        job = {name: scalar(request, name, default) for name, default in OPTIONAL_SCALARS.items()}
        job["prompt_ids"] = self.engine.encode(prompt)
        job["max_tokens"] = int(scalar(request, "max_tokens", None))
        self.engine.check_request(job["prompt_ids"], job["max_tokens"], job["temperature"], job["top_k"], job["top_p"])
        return job

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = self.parse(request)
                tokens = self.engine.generate(job["prompt_ids"], job["max_tokens"], job["temperature"], job["top_k"], job["top_p"],
                                              job["end_id"], job["seed"])
            except Exception as exc:  # a bad request gets an error response; the model stays up
                sender.send(error_response(str(exc) if isinstance(exc, InvalidRequest) else f"bad request: {exc}"),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            threading.Thread(target=self.respond, args=(tokens, job["stream"], sender), daemon=True).start()
        return None

    def respond(self, tokens, stream: bool, sender) -> None:
        try:
            pieces = []
            for piece in self.engine.stream_text(tokens):
                if sender.is_cancelled():
                    tokens.close()  # frees the engine slot
                    break
                if stream:
                    sender.send(text_response(piece))
                else:
                    pieces.append(piece)
            else:
                if not stream:
                    sender.send(text_response("".join(pieces)))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:  # an engine failure ends this request with an error, never the server
            sender.send(error_response(f"generation failed: {exc}"), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        self.engine.close()
        del self.metrics  # its metrics before their families (Triton's rule)
