"""Pieces of Triton model repositories that every engine backend uses: the `ensemble` interface and config.pbtxt writing.

Every backend serves an engine as a model with the TensorRT-LLM ensemble's interface (ENSEMBLE_INPUTS,
ENSEMBLE_OUTPUTS), so clients and benchmarks talk to every kind of server the same way. The layouts
themselves (which models, which parameters) belong to the backends (toolchain/backends/); the model
code Triton runs is in this package (cpu_model.py, trtllm_*.py).
"""

import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

ENSEMBLE = "ensemble"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str
    dims: str = "[ 1 ]"
    optional: bool = False


# The ensemble interface of tensorrtllm_backend's inflight_batcher_llm, the part both kinds of server serve.
ENSEMBLE_INPUTS = (
    TensorSpec("text_input", "TYPE_STRING"),
    TensorSpec("max_tokens", "TYPE_INT32"),
    TensorSpec("stream", "TYPE_BOOL", optional=True),
    TensorSpec("temperature", "TYPE_FP32", optional=True),
    TensorSpec("top_k", "TYPE_INT32", optional=True),
    TensorSpec("top_p", "TYPE_FP32", optional=True),
    TensorSpec("end_id", "TYPE_INT32", optional=True),
    TensorSpec("seed", "TYPE_UINT64", optional=True),
)
ENSEMBLE_OUTPUTS = (TensorSpec("text_output", "TYPE_STRING", "[ -1 ]"),)


def tensor_block(kind: str, specs) -> str:
    entries = []
    for spec in specs:
        optional = "\n    optional: true" if spec.optional else ""
        entries.append(f'  {{\n    name: "{spec.name}"\n    data_type: {spec.data_type}\n    dims: {spec.dims}{optional}\n  }}')
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def parameter_block(parameters: dict) -> str:
    return "".join(f'parameters: {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n' for key, value in parameters.items())


def model_config(name: str, backend: str, max_batch_size: int, inputs, outputs, parameters: dict, instances: int = 1,
                 decoupled: bool = False, dynamic_batching: bool = True) -> str:
    head = f'name: "{name}"\n' + (f'platform: "{backend}"\n' if backend == "ensemble" else f'backend: "{backend}"\n')
    head += f"max_batch_size: {max_batch_size}\n"
    if decoupled:
        head += "model_transaction_policy {\n  decoupled: true\n}\n"
    if dynamic_batching:
        head += "dynamic_batching {\n  max_queue_delay_microseconds: 1000\n}\n"
    body = tensor_block("input", inputs) + tensor_block("output", outputs)
    if backend != "ensemble":
        body += f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]\n"
    return head + body + parameter_block(parameters)


def copy_model_code(source_name: str, version_dir: Path) -> None:
    version_dir.mkdir(parents=True, exist_ok=True)
    with resources.as_file(resources.files("toolchain.serve").joinpath(source_name)) as source:
        shutil.copy(source, version_dir / "model.py")
