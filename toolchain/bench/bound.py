"""The physical bound of decoding: what a token costs in bytes moved and FLOPs, from the model's config, and what a device allows.

A decode step of a batch of B sequences at context L must read every weight the step uses once
(the decoder layers and the lm_head; of the embedding table only B rows, which is nothing) at the
precision the engine stores it in, and the KV cache of all B sequences (2 x layers x KV heads x
head_dim elements per token of context); it does 2 FLOPs per weight per sequence plus attention
(4 x layers x heads x head_dim x L per sequence). A device moves `bandwidth` bytes and does
`peak` FLOPs per second, so a step takes at least max(bytes / bandwidth, FLOPs / peak): the
roofline. A prefill of n tokens reads the weights once, writes n tokens of KV cache and does the
matmuls for every token (the lm_head only for the last) plus causal attention (2 x layers x width x n^2).

On this machine the device is measured (`measure_cpu`: the read bandwidth of a summed 1 GiB array
and the FLOP rate of a float32 matmul, best of several runs, with the benchmark's threads); for GPUs
it comes from the engine profile's data-sheet figures (projection.py). Numbers are bounds: real
engines reach a fraction of them. Needs torch and transformers only.
"""

import math
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

# Bytes per stored weight. ModelOpt quantizes the decoder layers' linears and keeps the lm_head and
# embeddings in the activation dtype; int4_awq stores a float16 scale per group of 128 weights;
# onnxruntime-genai's int4 (RTN, symmetric, block 32) stores a float32 scale per block and quantizes
# the lm_head too (its builder's default).
DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}
QUANTIZED_LINEAR_BYTES = {"fp8": 1.0, "int8_sq": 1.0, "int4_awq": 0.5 + 2 / 128, "int4_rtn": 0.5 + 4 / 32}
QUANTIZED_COMPUTE = {"fp8": "fp8", "int8_sq": "int8"}  # the tensor-core peak their math runs at; the others dequantize to the dtype
KV_BYTES = {"fp8": 1.0, "int8": 1.0}
MEASURE_BYTES = 1 << 30
MEASURE_MATMUL = 1024
MEASURE_ROUNDS = 5


@dataclass(frozen=True)
class Precision:
    """How an engine stores a model: bytes per weight of the layers' linears and of the lm_head/embeddings, bytes per KV element, and its compute precision."""

    linear_bytes: float
    head_bytes: float
    kv_bytes: float
    compute: str  # the key of the device's peak the matmuls run at: float32, bfloat16, float16, fp8, int8
    label: str


def precision_of(dtype: str, quantization: str = "none", kv_dtype: str = "auto") -> Precision:
    """The storage of a model built with `dtype` activations, `quantization` (engine-profile names) and a `kv_dtype` KV cache."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}")
    if quantization != "none" and quantization not in QUANTIZED_LINEAR_BYTES:
        raise ValueError(f"unknown quantization {quantization!r}")
    dtype_bytes = DTYPE_BYTES[dtype]
    linear = QUANTIZED_LINEAR_BYTES.get(quantization, dtype_bytes)
    head = linear if quantization == "int4_rtn" else dtype_bytes
    kv = KV_BYTES.get(kv_dtype, dtype_bytes)
    label = dtype if quantization == "none" else f"{quantization} ({'lm_head too' if head == linear else f'lm_head {dtype}'})"
    return Precision(linear, head, kv, QUANTIZED_COMPUTE.get(quantization, dtype), f"{label}, KV {kv_dtype if kv_dtype in KV_BYTES else dtype}")


@dataclass(frozen=True)
class Cost:
    bytes: float
    flops: float


@dataclass(frozen=True)
class ModelCost:
    """What a model's tokens cost, from its config: parameters by role, KV cache geometry, and the precision it is stored in."""

    layers: int
    attention_width: int  # query heads x head_dim
    kv_width: int  # KV heads x head_dim
    layer_parameters: int  # everything but the embedding table and the lm_head (read once per step)
    head_parameters: int  # vocab x hidden: the lm_head, read once per step whether tied or not
    table_parameters: int  # stored, barely read: the embedding table when it is not tied to the lm_head
    precision: Precision

    @classmethod
    def from_config(cls, config, precision: Precision) -> "ModelCost":
        """`config`: a transformers config (a meta-device model is built to count its parameters; no weights are read)."""
        from toolchain.models import head_dim, parameter_counts

        counts = parameter_counts(config)
        head = config.vocab_size * config.hidden_size
        heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(layers=config.num_hidden_layers, attention_width=heads * head_dim(config), kv_width=kv_heads * head_dim(config),
                   layer_parameters=counts["non_embedding"], head_parameters=head,
                   table_parameters=counts["total"] - counts["non_embedding"] - head, precision=precision)

    @property
    def weight_bytes_read(self) -> float:
        """Bytes of weights one decode step reads."""
        return self.layer_parameters * self.precision.linear_bytes + self.head_parameters * self.precision.head_bytes

    @property
    def weight_bytes_stored(self) -> float:
        """Bytes the weights take in memory."""
        return self.weight_bytes_read + self.table_parameters * self.precision.head_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        """KV cache bytes of one token of context (keys and values of every layer)."""
        return 2 * self.layers * self.kv_width * self.precision.kv_bytes

    def decode_step(self, batch: int, context: float) -> Cost:
        """One step that decodes a token for each of `batch` sequences holding `context` tokens."""
        flops = batch * (2 * (self.layer_parameters + self.head_parameters) + 4 * self.layers * self.attention_width * context)
        return Cost(self.weight_bytes_read + batch * (context + 1) * self.kv_bytes_per_token, flops)

    def prefill(self, tokens: int) -> Cost:
        """The prompt of one sequence: every weight read once, its KV written, logits of the last token only."""
        flops = 2 * self.layer_parameters * tokens + 2 * self.head_parameters + 2 * self.layers * self.attention_width * tokens ** 2
        return Cost(self.weight_bytes_read + tokens * self.kv_bytes_per_token, flops)

    def describe(self) -> dict:
        return {"parameters_read_per_step": self.layer_parameters + self.head_parameters,
                "parameters_stored": self.layer_parameters + self.head_parameters + self.table_parameters,
                "precision": self.precision.label, "weight_bytes_read_per_step": self.weight_bytes_read,
                "weight_bytes_stored": self.weight_bytes_stored, "kv_bytes_per_token": self.kv_bytes_per_token,
                "flops_per_token_at_zero_context": 2 * (self.layer_parameters + self.head_parameters)}


@dataclass(frozen=True)
class Device:
    """What a device moves and computes per second, where those figures come from, and its memory."""

    name: str
    bandwidth: float  # bytes per second
    peak_flops: dict  # compute precision -> FLOP/s
    memory: float | None  # bytes
    source: str

    def seconds(self, cost: Cost, compute: str) -> float:
        """The roofline time of `cost` with the matmuls at `compute` precision."""
        if compute not in self.peak_flops:
            raise ValueError(f"{self.name} has no {compute} peak (it lists {', '.join(self.peak_flops)})")
        return max(cost.bytes / self.bandwidth, cost.flops / self.peak_flops[compute])

    def bound_by(self, cost: Cost, compute: str) -> str:
        return "bandwidth" if cost.bytes / self.bandwidth >= cost.flops / self.peak_flops[compute] else "compute"

    def describe(self) -> dict:
        return {**asdict(self), "bandwidth_gb_s": self.bandwidth / 1e9, "peak_tflops": {k: v / 1e12 for k, v in self.peak_flops.items()}}


def decode_bound(cost: ModelCost, device: Device, batch: float, context: float) -> dict:
    """The roofline of decoding at `batch` sequences of `context` tokens: tokens/s it allows and what it is bound by."""
    batch = max(1, round(batch))
    step = cost.decode_step(batch, context)
    seconds = device.seconds(step, cost.precision.compute)
    return {"batch": batch, "context": context, "bytes_per_token": step.bytes / batch, "flops_per_token": step.flops / batch,
            "tokens_per_s": batch / seconds, "bound_by": device.bound_by(step, cost.precision.compute)}


def load_point_bound(cost: ModelCost, device: Device, point: dict, max_batch: int) -> dict | None:
    """The roofline at this load point and the measured decode rate (batch / mean ITL) against it.

    The batch is the mean number of requests between their first and last token (Little's law over the
    decode phase), at most the engine's batch: requests queued before their first token are in flight
    but not decoding, so an engine that serves one request at a time is bound as batch 1."""
    if not point["itl_ms"] or not point["mean_decoding"]:
        return None
    batch = max(1.0, min(point["mean_decoding"], max_batch))
    context = point["input_tokens_per_request"] + point["output_tokens_per_request"] / 2
    bound = decode_bound(cost, device, batch, context)
    decode_rate = bound["batch"] / (point["itl_ms"]["mean"] / 1e3)
    return {**bound, "decode_tokens_per_s": decode_rate, "fraction": decode_rate / bound["tokens_per_s"]}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_cpu(threads: int) -> Device:
    """This CPU as a device: read bandwidth (sum of a 1 GiB float32 array) and float32 matmul FLOP/s, best of a few runs on `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        array = torch.ones(MEASURE_BYTES // 4, dtype=torch.float32)
        array.sum()  # fault the pages in
        bandwidth = MEASURE_BYTES / best_time(array.sum)
        a, b = torch.randn(MEASURE_MATMUL, MEASURE_MATMUL), torch.randn(MEASURE_MATMUL, MEASURE_MATMUL)
        a @ b
        flops = 2 * MEASURE_MATMUL ** 3 / best_time(lambda: a @ b)
    finally:
        torch.set_num_threads(previous)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    return Device(name=f"{cpu_name()} ({threads} thread{'s' if threads > 1 else ''})", bandwidth=bandwidth, peak_flops={"float32": flops},
                  memory=memory, source=f"measured here: sum of a {MEASURE_BYTES >> 20} MiB float32 array and a {MEASURE_MATMUL}^3 float32 "
                                        f"matmul, best of {MEASURE_ROUNDS}, {threads} torch threads")


def best_time(work) -> float:
    best = math.inf
    for _ in range(MEASURE_ROUNDS):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best
