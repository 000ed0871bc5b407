"""Projection of teacher and students onto the GPUs (or the CPU) an engine profile targets: roofline numbers, every one labelled projected.

For a model, a profile and a workload's mean prompt and answer lengths: batch-1 decode tokens/s and
time to first token (the roofline of bytes and FLOPs, bound.py), the largest batch whose KV cache
fits next to the weights (the profile's free-memory fraction of what the weights leave; activations
and workspace ignored), and the output throughput of in-flight batching at that batch and at each
concurrency the workload sweeps: B requests cost B prefills plus `output_len` decode steps of B
sequences, so throughput = B x output_len / (B x prefill + output_len x step). Models are costed
at the precision the profile stores them in (bound.precision_of). The figures are upper bounds from
data sheets: real engines reach part of them (kernel efficiency, scheduling, launch overheads);
results say so. Needs no GPU and no weights: a config is enough.
"""

import math

from toolchain.bench.bound import Device, ModelCost, precision_of

PROJECTED = ("projected: roofline upper bound from the figures named in `device` (no measurement); "
             "real engines reach a fraction of it")


def profile_device(profile, measured_cpu: Device | None = None) -> Device:
    """The device of an engine profile: its data sheet (times tp x pp GPUs, ideal scaling), or for a cpu profile this CPU as measured."""
    if profile.device is None:
        if measured_cpu is None:
            raise ValueError(f"profile {profile.name} targets the CPU: pass the measured CPU")
        return measured_cpu
    sheet, gpus = profile.device, profile.tp * profile.pp
    return Device(name=f"{gpus} x {profile.target}" if gpus > 1 else profile.target, bandwidth=sheet.memory_bandwidth_gb_s * 1e9 * gpus,
                  peak_flops={precision: tflops * 1e12 * gpus for precision, tflops in sheet.dense_tflops.items()},
                  memory=sheet.memory_gb * 1e9 * gpus, source=sheet.source + (f"; x{gpus} GPUs, ideal scaling" if gpus > 1 else ""))


def profile_precision(profile):
    return precision_of(profile.dtype, profile.quantization, profile.kv_cache.dtype)


def throughput(cost: ModelCost, device: Device, batch: int, input_len: float, output_len: float) -> float:
    """Output tokens/s of in-flight batching that keeps `batch` requests running (see the module docstring)."""
    compute = cost.precision.compute
    prefill = device.seconds(cost.prefill(round(input_len)), compute)
    step = device.seconds(cost.decode_step(batch, input_len + output_len / 2), compute)
    return batch * output_len / (batch * prefill + output_len * step)


def project_model(cost: ModelCost, device: Device, input_len: float, output_len: float, concurrency: list[int],
                  kv_memory_fraction: float) -> dict:
    """The projected numbers of one model on one device at one workload shape."""
    compute = cost.precision.compute
    context = input_len + output_len / 2
    step = cost.decode_step(1, context)
    prefill = cost.prefill(round(input_len))
    sequence_kv = cost.kv_bytes_per_token * (input_len + output_len)
    free = (device.memory - cost.weight_bytes_stored) * kv_memory_fraction if device.memory else None
    max_batch = max(0, math.floor(free / sequence_kv)) if free is not None else None
    projected = {
        "batch1_decode_tokens_per_s": 1 / device.seconds(step, compute),
        "batch1_decode_bound_by": device.bound_by(step, compute),
        "ttft_ms": device.seconds(prefill, compute) * 1e3,
        "ttft_bound_by": device.bound_by(prefill, compute),
        "weights_gb": cost.weight_bytes_stored / 1e9,
        "kv_gb_per_sequence": sequence_kv / 1e9,
        "max_batch": max_batch,
        "output_tokens_per_s_at_max_batch": throughput(cost, device, max_batch, input_len, output_len) if max_batch else None,
        "output_tokens_per_s_at_concurrency": {str(c): throughput(cost, device, min(c, max_batch) if max_batch else c, input_len, output_len)
                                               for c in concurrency if max_batch != 0},
    }
    if max_batch == 0:
        projected["note"] = "the weights leave no room for one sequence's KV cache on this device"
    return projected


def speedups(teacher: dict, student: dict) -> dict:
    """Projected student / teacher ratios (TTFT: teacher over student, so above 1 means faster)."""
    ratio = lambda a, b: a / b if a and b else None  # noqa: E731
    return {"batch1_decode": ratio(student["batch1_decode_tokens_per_s"], teacher["batch1_decode_tokens_per_s"]),
            "ttft": ratio(teacher["ttft_ms"], student["ttft_ms"]),
            "max_batch_throughput": ratio(student["output_tokens_per_s_at_max_batch"], teacher["output_tokens_per_s_at_max_batch"]),
            "at_concurrency": {c: ratio(value, teacher["output_tokens_per_s_at_concurrency"].get(c))
                               for c, value in student["output_tokens_per_s_at_concurrency"].items()}}


def project(models: dict[str, object], profiles: list, input_len: float, output_len: float, concurrency: list[int],
            measured_cpu: Device | None = None) -> dict:
    """Project `models` (label -> transformers config; the first is the teacher) onto every profile; labelled projected."""
    result = {"label": PROJECTED, "input_len": input_len, "output_len": output_len, "profiles": {}}
    teacher = next(iter(models))
    for profile in profiles:
        device = profile_device(profile, measured_cpu)
        precision = profile_precision(profile)
        rows = {label: {"cost": (cost := ModelCost.from_config(config, precision)).describe(),
                        **project_model(cost, device, input_len, output_len, concurrency, profile.kv_cache.free_gpu_memory_fraction)}
                for label, config in models.items()}
        for label, row in rows.items():
            if label != teacher:
                row["speedup"] = speedups(rows[teacher], row)
        result["profiles"][profile.name] = {"device": device.describe(), "precision": precision.label, "models": rows}
    return result
