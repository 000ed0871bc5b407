"""Engine backends: everything that differs between kinds of engine, behind one interface (base.py).

A backend is named by the `backend` string of engine profiles and manifests and says which profiles
it can build, how it builds its engine from a model, which Triton model repository serves it, whether
the Triton server the toolchain starts can serve it on this machine, and where its tokenizer is.
`minitron build`, `serve`, `bench` and `run` look the backend up here and never compare backend names
themselves: another engine (say OpenVINO GenAI) is one more EngineBackend subclass in its own module
and one more entry in BACKENDS.

Not here: the profile schema (engine_profile.py), the engine directory's manifest (manifest.py), the
Triton process (serve/server.py), the CPU engine runtime (cpu_engine.py).
"""

from toolchain.backends.base import BuildOutcome, EngineBackend
from toolchain.backends.onnxruntime_genai import OnnxRuntimeGenAI
from toolchain.backends.tensorrt_llm import TensorRTLLM
from toolchain.errors import UserError

BACKENDS: dict[str, EngineBackend] = {backend.name: backend for backend in (TensorRTLLM(), OnnxRuntimeGenAI())}

__all__ = ["BACKENDS", "BuildOutcome", "EngineBackend", "engine_backend"]


def engine_backend(name: str) -> EngineBackend:
    """The backend named by a profile's or a manifest's `backend`."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise UserError(f"unknown engine backend {name!r}; this toolchain builds and serves {', '.join(BACKENDS)}") from None
