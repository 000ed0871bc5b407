"""The backends of `minitron bench`: how one model answers the workload's requests, each timed token by token.

- torch: a Hugging Face model (a folder or a built-in name) run by transformers `generate` with its
  KV cache in this process, requests batched (torch_engine.py);
- cpu-engine: an onnxruntime-genai engine directory run by the toolchain's CpuEngine in this process
  (in-flight batching of concurrent requests);
- triton: an engine directory served by a Triton server started here (`toolchain.serve.serving`),
  or a model on a running server (`--url`, or a legacy HOST:PORT target), through the streaming
  gRPC client, each token timed as its response arrives;
- trtllm: a TensorRT-LLM engine directory or Hugging Face folder run by TensorRT-LLM's LLM API with
  streaming; only where `tensorrt_llm` imports and a GPU is present, which no machine of this
  project offers (REFERENCE §3): it is refused elsewhere with the reason, and untested.

Each runner checks a model before any work (`prepare`: tokenizer, the config and stored precision
the bound needs, the engine's limits) and then runs it for a block (`running`: yields the `send`
that load.py drives). Not here: the engine backends that build and serve engines (toolchain/backends/).
"""

import contextlib
import importlib.util
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from toolchain.bench.bound import Precision, precision_of
from toolchain.bench.load import BenchRequest, RequestFailed
from toolchain.errors import UserError
from toolchain.settings import ComputeConfig, ServeConfig


@dataclass(frozen=True)
class Target:
    """A model as the benchmark names it: its label in the results, what the user gave, and the Triton model to address at a URL."""

    label: str
    source: str
    served_name: str | None = None  # with --url: the model's name on that server

    def is_url(self) -> bool:
        return self.served_name is not None or (":" in self.source and not Path(self.source).exists())


@dataclass
class Prepared:
    """What a runner found out about a target before running it."""

    tokenizer: object
    config: object | None  # transformers config, for the bound; None when unknown (a model on a remote server)
    precision: Precision | None
    max_batch: int  # most requests the backend decodes together for this target
    max_input_len: int | None = None
    max_seq_len: int | None = None
    no_bound_reason: str | None = None


@dataclass
class Running:
    """A target being served for the benchmark: `send(request)` yields token counts as they arrive."""

    send: Callable[[BenchRequest], Iterator[int]]
    harness_seconds: Callable[[], float] = lambda: 0.0  # time the runner's own code spent routing tokens so far (torch)


@dataclass(frozen=True)
class RunSettings:
    threads: int
    serve: ServeConfig
    compute: ComputeConfig


class Runner(ABC):
    name: str

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run on this machine; None when it can."""
        return None

    @abstractmethod
    def prepare(self, target: Target, settings: RunSettings, tokenizer) -> Prepared:
        """Check the target (UserError naming the fix) and gather its tokenizer, config, precision and limits.

        `tokenizer` (a model folder or built-in name, or a loaded tokenizer) serves models on a running server only."""

    @abstractmethod
    def running(self, target: Target, prepared: Prepared, settings: RunSettings) -> contextlib.AbstractContextManager[Running]:
        """Load or serve the target for the duration of the block."""


def engine_manifest(target: Target, backend_names: tuple[str, ...], runner: str):
    """The manifest of an engine-directory target, refused unless its engine backend is one of `backend_names`."""
    from toolchain.manifest import read_manifest

    path = Path(target.source)
    if not path.is_dir():
        raise UserError(f"{runner} bench target {target.source!r} is not an engine directory; build one with `minitron build`")
    if (path / "config.json").is_file() and not (path / "manifest.json").is_file():
        raise UserError(f"{target.source} is a Hugging Face model, not an engine directory: build one with `minitron build --profile ...`, "
                        "or benchmark the model itself with --backend torch")
    manifest = read_manifest(path)
    if manifest.backend not in backend_names:
        raise UserError(f"{target.source} is a {manifest.backend} engine; --backend {runner} runs {' or '.join(backend_names)} engines")
    return manifest


def engine_config(engine_dir: Path, manifest):
    """The transformers config of the model an engine was built from (for the bound), or None with the reason."""
    from transformers import AutoConfig

    source = Path(manifest.source_model)
    if not (source / "config.json").is_file():
        from toolchain.models import BUILTIN_MODELS, resolve_model_dir

        if manifest.source_model not in BUILTIN_MODELS:
            return None, f"the source model {manifest.source_model} of {engine_dir} is no longer there (its config.json gives the bound)"
        source = resolve_model_dir(manifest.source_model)
    return AutoConfig.from_pretrained(source, trust_remote_code=False), None


def engine_precision(manifest) -> Precision:
    profile = manifest.profile
    return precision_of(profile["dtype"], profile.get("quantization", "none"), profile.get("kv_cache", {}).get("dtype", "auto"))


def prepare_engine(target: Target, manifest, max_batch: int) -> Prepared:
    from toolchain.backends import engine_backend

    config, reason = engine_config(Path(target.source), manifest)
    return Prepared(engine_backend(manifest.backend).load_tokenizer(Path(target.source), manifest), config, engine_precision(manifest),
                    max_batch=max_batch, max_input_len=manifest.max_input_len, max_seq_len=manifest.max_seq_len, no_bound_reason=reason)


class TorchRunner(Runner):
    name = "torch"

    def prepare(self, target: Target, settings: RunSettings, tokenizer) -> Prepared:
        from toolchain.models import load_config, load_tokenizer, resolve_dtype

        if (Path(target.source) / "manifest.json").is_file():
            raise UserError(f"{target.source} is an engine directory; --backend torch runs Hugging Face models: pass the model it was "
                            "built from, or benchmark the engine with --backend cpu-engine or triton")
        config = load_config(target.source)
        dtype = str(resolve_dtype(settings.compute.dtype, settings.compute.device)).removeprefix("torch.")
        return Prepared(load_tokenizer(target.source), config, precision_of(dtype), max_batch=settings.serve.max_batch_size,
                        max_seq_len=getattr(config, "max_position_embeddings", None))

    @contextlib.contextmanager
    def running(self, target: Target, prepared: Prepared, settings: RunSettings) -> Iterator[Running]:
        import torch

        from toolchain.bench.torch_engine import TorchEngine
        from toolchain.models import load_model

        model = load_model(target.source, dtype=settings.compute.dtype, device=settings.compute.device)
        threads = torch.get_num_threads()
        if model.device.type == "cpu":
            torch.set_num_threads(settings.threads)
        tokenizer = prepared.tokenizer
        eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        try:
            with TorchEngine(model, pad, eos_ids, max_batch_size=prepared.max_batch) as engine:
                yield Running(engine.send, lambda: engine.routing_seconds)
        finally:
            torch.set_num_threads(threads)


class CpuEngineRunner(Runner):
    name = "cpu-engine"

    def unavailable_reason(self) -> str | None:
        from toolchain.backends import engine_backend

        return engine_backend("onnxruntime-genai").unavailable_reason()

    def prepare(self, target: Target, settings: RunSettings, tokenizer) -> Prepared:
        manifest = engine_manifest(target, ("onnxruntime-genai",), self.name)
        return prepare_engine(target, manifest, min(settings.serve.max_batch_size, manifest.max_batch_size))

    @contextlib.contextmanager
    def running(self, target: Target, prepared: Prepared, settings: RunSettings) -> Iterator[Running]:
        from toolchain.backends.onnxruntime_genai import inflight_max_num_tokens
        from toolchain.cpu_engine import CpuEngine, InvalidRequest
        from toolchain.manifest import read_manifest

        engine_dir = Path(target.source)
        manifest = read_manifest(engine_dir)
        serve = settings.serve
        with CpuEngine(engine_dir / manifest.model_dir, threads=settings.threads, max_batch_size=prepared.max_batch,
                       tokenizer_dir=engine_dir / manifest.tokenizer_dir, max_input_len=manifest.max_input_len,
                       max_seq_len=manifest.max_seq_len, batching=serve.batching,
                       max_num_tokens=inflight_max_num_tokens(serve, manifest),
                       kv_cache_tokens=serve.kv_cache_tokens) as engine:
            def send(request) -> Iterator[int]:
                try:
                    for _ in engine.generate(list(request.prompt_ids), max_new_tokens=request.max_new_tokens):
                        yield 1
                except (InvalidRequest, RuntimeError) as exc:
                    raise RequestFailed(str(exc)) from None

            yield Running(send)


class TritonRunner(Runner):
    name = "triton"

    def prepare(self, target: Target, settings: RunSettings, tokenizer) -> Prepared:
        from toolchain.backends import engine_backend
        from toolchain.models import load_tokenizer

        if target.is_url():
            if tokenizer is None:
                raise UserError(f"{target.source} is a running server: pass --tokenizer (a model directory or built-in name) to cut the prompts")
            return Prepared(load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer, None, None, max_batch=settings.serve.max_batch_size,
                            no_bound_reason="a model on a running server: its config and precision are unknown here (bench its engine directory for the bound)")
        if not Path(target.source).is_dir():
            raise UserError(f"bench target {target.source!r} is neither an engine directory nor a HOST:PORT URL")
        from toolchain.backends import BACKENDS

        manifest = engine_manifest(target, tuple(BACKENDS), self.name)
        reason = engine_backend(manifest.backend).unavailable_reason()
        if reason is not None:
            raise UserError(f"bench target {target.source} cannot be served here: {reason}; serve it where it runs and pass its gRPC HOST:PORT instead")
        return prepare_engine(target, manifest, min(settings.serve.max_batch_size, manifest.max_batch_size))

    @contextlib.contextmanager
    def running(self, target: Target, prepared: Prepared, settings: RunSettings) -> Iterator[Running]:
        if target.is_url():
            yield Running(self.sender(target.source, target.served_name or "ensemble"))
            return
        from toolchain.serve import serving

        serve = settings.serve.model_copy(update={"threads": settings.threads})
        with serving(Path(target.source), serve) as server:
            yield Running(self.sender(server.endpoints.grpc, "ensemble"))

    @staticmethod
    def sender(url: str, model: str):
        """Streams a request over gRPC; one response per token (the CPU model and TensorRT-LLM's streaming postprocessing
        send one each; the CPU model adds one more, counted as no token, when the answer ends inside a multi-byte character)."""
        from toolchain.generate import GenerationError, ServerUnreachable, generate_text

        def send(request) -> Iterator[int]:
            received = 0
            try:
                for _ in generate_text(url, request.prompt, max_tokens=request.max_new_tokens, stream=True, protocol="grpc", model=model):
                    received += 1
                    yield 1 if received <= request.max_new_tokens else 0
            except (GenerationError, ServerUnreachable) as exc:
                raise RequestFailed(str(exc)) from None

        return send


class TrtllmRunner(Runner):
    """TensorRT-LLM's LLM API, streaming. Written against TensorRT-LLM 1.x's API; never run in this project (no machine imports tensorrt_llm)."""

    name = "trtllm"

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("tensorrt_llm") is None:
            return ("tensorrt_llm is not importable here (it installs only from NVIDIA's own index or container, REFERENCE §3); run "
                    "`minitron bench --backend trtllm` inside NVIDIA's TensorRT-LLM container on a GPU machine, or serve the engine with "
                    "Triton there and use --backend triton --url HOST:PORT")
        import torch

        return None if torch.cuda.is_available() else "TensorRT-LLM needs a CUDA GPU and none is visible"

    def prepare(self, target: Target, settings: RunSettings, tokenizer) -> Prepared:
        from transformers import AutoConfig

        from toolchain.models import load_tokenizer

        if (Path(target.source) / "manifest.json").is_file():
            manifest = engine_manifest(target, ("tensorrt-llm",), self.name)
            if not manifest.built:
                raise UserError(f"{target.source} holds no built engine yet: run its build.sh on a GPU machine (docs/engines.md)")
            return prepare_engine(target, manifest, min(settings.serve.max_batch_size, manifest.max_batch_size))
        config = AutoConfig.from_pretrained(target.source, trust_remote_code=False)
        return Prepared(load_tokenizer(target.source), config, precision_of(settings.compute.dtype if settings.compute.dtype != "auto" else "bfloat16"),
                        max_batch=settings.serve.max_batch_size, max_seq_len=getattr(config, "max_position_embeddings", None))

    @contextlib.contextmanager
    def running(self, target: Target, prepared: Prepared, settings: RunSettings) -> Iterator[Running]:
        from tensorrt_llm import SamplingParams

        source = Path(target.source)
        if (source / "manifest.json").is_file():  # a TensorRT engine: the LLM class of the TensorRT backend
            from tensorrt_llm._tensorrt_engine import LLM

            manifest = json.loads((source / "manifest.json").read_text())
            llm = LLM(model=str(source / manifest["model_dir"]), tokenizer=str(source / manifest["tokenizer_dir"]))
        else:  # a Hugging Face folder: TensorRT-LLM 1.x's default PyTorch backend
            from tensorrt_llm import LLM

            llm = LLM(model=str(source), max_batch_size=prepared.max_batch)

        def send(request) -> Iterator[int]:
            params = SamplingParams(max_tokens=request.max_new_tokens, top_k=1)
            seen = 0
            try:
                for output in llm.generate_async(list(request.prompt_ids), sampling_params=params, streaming=True):
                    produced = len(output.outputs[0].token_ids)
                    if produced > seen:
                        yield produced - seen
                        seen = produced
            except RuntimeError as exc:
                raise RequestFailed(str(exc)) from None

        try:
            yield Running(send)
        finally:
            llm.shutdown()


RUNNERS: dict[str, Runner] = {runner.name: runner for runner in (TorchRunner(), CpuEngineRunner(), TritonRunner(), TrtllmRunner())}
