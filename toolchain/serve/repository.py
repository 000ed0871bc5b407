"""Triton model repositories for engine directories.

CPU engines (backend onnxruntime-genai): one decoupled python-backend model, `ensemble`, that runs
the CpuEngine (cpu_model.py) and takes the TensorRT-LLM ensemble's inputs, so clients and benchmarks
talk to both kinds of server the same way.

TensorRT-LLM engines: the inflight-batching layout of NVIDIA's tensorrtllm backend —
`preprocessing` (python, tokenizer) -> `tensorrt_llm` (backend tensorrtllm, in-flight batching) ->
`postprocessing` (python, detokenizer), tied by the `ensemble` — with parameters taken from the
engine manifest and its profile. It is written for NVIDIA's Triton TRT-LLM container (docker/);
the engine and tokenizer paths are the engine directory's absolute paths, so mount it at the same
path in the container. The optional `tensorrt_llm_bls` model is not written: the ensemble covers
streaming and non-streaming requests.
"""

import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from toolchain.manifest import EngineManifest

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


def write_cpu_repository(engine_dir: Path, manifest: EngineManifest, repository: Path, instances: int, max_batch_size: int,
                         threads: int | None) -> None:
    """One `ensemble` python model that serves the CPU engine, `threads` intra-op threads per instance."""
    threads = threads or manifest.profile.get("cpu_threads") or max(1, (os.cpu_count() or 1) // instances)
    engine_batch = min(max_batch_size, manifest.max_batch_size)
    parameters = {"engine_dir": Path(engine_dir).resolve(), "threads": threads, "engine_max_batch_size": engine_batch}
    model_dir = repository / ENSEMBLE
    copy_model_code("cpu_model.py", model_dir / "1")
    (model_dir / "config.pbtxt").write_text(model_config(ENSEMBLE, "python", max_batch_size, ENSEMBLE_INPUTS, ENSEMBLE_OUTPUTS,
                                                         parameters, instances=instances, decoupled=True))


def write_trtllm_repository(engine_dir: Path, manifest: EngineManifest, repository: Path, instances: int, max_batch_size: int) -> None:
    """preprocessing -> tensorrt_llm -> postprocessing, and the ensemble that chains them (tensorrtllm backend layout)."""
    from toolchain.engine_profile import EngineProfile

    profile = EngineProfile.model_validate(manifest.profile)
    engine_dir = Path(engine_dir).resolve()
    batch = min(max_batch_size, manifest.max_batch_size)
    tokenizer = {"tokenizer_dir": engine_dir / manifest.tokenizer_dir, "max_input_len": manifest.max_input_len,
                 "max_seq_len": manifest.max_seq_len}
    int_scalar = lambda name: TensorSpec(name, "TYPE_INT32")  # noqa: E731
    preprocessing_outputs = (TensorSpec("INPUT_ID", "TYPE_INT32", "[ -1 ]"), int_scalar("REQUEST_INPUT_LEN"),
                             int_scalar("REQUEST_OUTPUT_LEN"), int_scalar("OUT_END_ID"), int_scalar("OUT_PAD_ID"))
    models = {
        "preprocessing": model_config("preprocessing", "python", batch, (
            TensorSpec("QUERY", "TYPE_STRING"), int_scalar("REQUEST_OUTPUT_LEN"),
            TensorSpec("END_ID", "TYPE_INT32", optional=True), TensorSpec("PAD_ID", "TYPE_INT32", optional=True),
        ), preprocessing_outputs, tokenizer, instances=instances),
        "tensorrt_llm": model_config("tensorrt_llm", "tensorrtllm", batch, (
            TensorSpec("input_ids", "TYPE_INT32", "[ -1 ]\n    allow_ragged_batch: true"),
            TensorSpec("input_lengths", "TYPE_INT32", "[ 1 ]\n    reshape: { shape: [ ] }"),
            TensorSpec("request_output_len", "TYPE_INT32", "[ 1 ]\n    reshape: { shape: [ ] }"),
            TensorSpec("end_id", "TYPE_INT32", "[ 1 ]\n    reshape: { shape: [ ] }", optional=True),
            TensorSpec("pad_id", "TYPE_INT32", "[ 1 ]\n    reshape: { shape: [ ] }", optional=True),
            TensorSpec("streaming", "TYPE_BOOL", "[ 1 ]", optional=True),
            TensorSpec("temperature", "TYPE_FP32", "[ 1 ]\n    reshape: { shape: [ ] }", optional=True),
            TensorSpec("runtime_top_k", "TYPE_INT32", "[ 1 ]\n    reshape: { shape: [ ] }", optional=True),
            TensorSpec("runtime_top_p", "TYPE_FP32", "[ 1 ]\n    reshape: { shape: [ ] }", optional=True),
            TensorSpec("seed", "TYPE_UINT64", "[ 1 ]\n    reshape: { shape: [ ] }", optional=True),
        ), (TensorSpec("output_ids", "TYPE_INT32", "[ -1, -1 ]"), TensorSpec("sequence_length", "TYPE_INT32", "[ -1 ]")), {
            "gpt_model_type": "inflight_fused_batching",
            "gpt_model_path": engine_dir / manifest.model_dir,
            "max_beam_width": 1,
            "batch_scheduler_policy": "guaranteed_no_evict",
            "kv_cache_free_gpu_mem_fraction": profile.kv_cache.free_gpu_memory_fraction,
            "enable_kv_cache_reuse": str(profile.kv_cache.enable_block_reuse).lower(),
            "enable_chunked_context": str(profile.plugins.use_paged_context_fmha).lower(),
            "exclude_input_in_output": "true",
            "decoding_mode": "top_k_top_p",
        }, instances=1, decoupled=True),
        "postprocessing": model_config("postprocessing", "python", batch, (
            TensorSpec("TOKENS_BATCH", "TYPE_INT32", "[ -1, -1 ]"), TensorSpec("SEQUENCE_LENGTH", "TYPE_INT32", "[ -1 ]"),
        ), (TensorSpec("OUTPUT", "TYPE_STRING", "[ -1 ]"),), tokenizer, instances=instances),
        ENSEMBLE: model_config(ENSEMBLE, "ensemble", batch, ENSEMBLE_INPUTS, ENSEMBLE_OUTPUTS, {}, dynamic_batching=False)
        + ensemble_scheduling(),
    }
    for name, config in models.items():
        (repository / name / "1").mkdir(parents=True, exist_ok=True)
        (repository / name / "config.pbtxt").write_text(config)
    copy_model_code("trtllm_preprocessing.py", repository / "preprocessing" / "1")
    copy_model_code("trtllm_postprocessing.py", repository / "postprocessing" / "1")


def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    maps = "".join(f'      input_map {{ key: "{key}" value: "{value}" }}\n' for key, value in inputs.items())
    maps += "".join(f'      output_map {{ key: "{key}" value: "{value}" }}\n' for key, value in outputs.items())
    return f'    {{\n      model_name: "{model}"\n      model_version: -1\n{maps}    }}'


def ensemble_scheduling() -> str:
    steps = [
        step("preprocessing", {"QUERY": "text_input", "REQUEST_OUTPUT_LEN": "max_tokens", "END_ID": "end_id"},
             {"INPUT_ID": "_INPUT_ID", "REQUEST_INPUT_LEN": "_REQUEST_INPUT_LEN", "REQUEST_OUTPUT_LEN": "_REQUEST_OUTPUT_LEN",
              "OUT_END_ID": "_END_ID", "OUT_PAD_ID": "_PAD_ID"}),
        step("tensorrt_llm", {"input_ids": "_INPUT_ID", "input_lengths": "_REQUEST_INPUT_LEN", "request_output_len": "_REQUEST_OUTPUT_LEN",
                              "end_id": "_END_ID", "pad_id": "_PAD_ID", "streaming": "stream", "temperature": "temperature",
                              "runtime_top_k": "top_k", "runtime_top_p": "top_p", "seed": "seed"},
             {"output_ids": "_TOKENS_BATCH", "sequence_length": "_SEQUENCE_LENGTH"}),
        step("postprocessing", {"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"}, {"OUTPUT": "text_output"}),
    ]
    return "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"


def write_model_repository(engine_dir: Path, manifest: EngineManifest, repository: Path, instances: int = 1, max_batch_size: int = 8,
                           threads: int | None = None) -> list[str]:
    """Write the repository for this engine's backend into `repository`; returns the model names."""
    repository = Path(repository)
    if manifest.backend == "onnxruntime-genai":
        write_cpu_repository(engine_dir, manifest, repository, instances, max_batch_size, threads)
    else:
        write_trtllm_repository(engine_dir, manifest, repository, instances, max_batch_size)
    return sorted(path.name for path in repository.iterdir() if (path / "config.pbtxt").is_file())
