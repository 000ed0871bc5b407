"""`minitron serve`: serve an engine directory through a real Triton Inference Server.

CPU engines run in the Triton server bundled with nvidia-pytriton (python backend); TensorRT-LLM
engines get the tensorrtllm backend's repository layout, written with `--repo-only` for NVIDIA's
Triton TRT-LLM container on a GPU machine. Both expose the same `ensemble` model interface
(text_input, max_tokens, stream, temperature/top_k/top_p, end_id, seed -> text_output), so
`minitron generate` and the benchmarks talk to either. Layout: repository.py (what Triton loads),
server.py (the process), cpu_model.py and trtllm_*.py (model code Triton runs).
"""

import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from toolchain.errors import UserError
from toolchain.manifest import read_manifest
from toolchain.paths import atomic_output_dir
from toolchain.serve.repository import ENSEMBLE, write_model_repository
from toolchain.serve.server import TritonServer, choose_endpoints


def check_host(host: str) -> None:
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {host} exposes the server beyond this machine; it has no authentication", file=sys.stderr)


def serve(engine_dir: Path, host: str = "127.0.0.1", http_port: int | None = None, grpc_port: int | None = None,
          metrics_port: int | None = None, instances: int = 1, max_batch_size: int = 8, repo_only: Path | None = None,
          threads: int | None = None, ready_timeout_s: float = 300) -> Path | None:
    """Write the engine's Triton model repository and serve it until SIGTERM/SIGINT; with `repo_only`, only write it there.

    Returns the repository path for `repo_only`, else None once the server has stopped and left nothing behind.
    """
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    if instances < 1 or max_batch_size < 1:
        raise UserError(f"--instances and --max-batch-size must be positive, got {instances} and {max_batch_size}")
    if repo_only is not None:
        with atomic_output_dir(Path(repo_only)) as tmp:
            models = write_model_repository(engine_dir, manifest, tmp, instances, max_batch_size, threads)
        print(f"wrote a Triton model repository for {engine_dir} ({manifest.backend}) to {repo_only}: models {', '.join(models)}")
        if manifest.backend == "tensorrt-llm":
            print(f"start it in NVIDIA's Triton TRT-LLM container with the engine directory mounted at {engine_dir.resolve()}: "
                  f"tritonserver --model-repository={Path(repo_only).resolve()}")
            if not manifest.built:
                print("note: this engine directory holds the checkpoint and the trtllm-build command only; build the engine first")
        return Path(repo_only)
    if manifest.backend != "onnxruntime-genai":
        raise UserError(f"{engine_dir} is a TensorRT-LLM engine: it needs a GPU and the tensorrtllm backend of NVIDIA's Triton container; "
                        "write its repository with --repo-only DIR and start Triton there (see docs/serve.md)")
    check_host(host)
    endpoints = choose_endpoints(host, http_port, grpc_port, metrics_port)
    workspace = Path(tempfile.mkdtemp(prefix="minitron-serve-"))
    stop_requested = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop_requested.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    server = TritonServer(workspace / "repository", workspace, endpoints)
    try:
        write_model_repository(engine_dir, manifest, server.repository, instances, max_batch_size, threads)
        try:
            server.start(ready_timeout_s)
        except RuntimeError as exc:
            raise UserError(f"Triton did not start on {engine_dir}: {exc}".replace("\n", " | ")) from None
        print(f"serving {engine_dir} ({manifest.backend}, profile {manifest.profile_name}) as model '{ENSEMBLE}'")
        print(f"  HTTP     http://{endpoints.http}  (POST /v2/models/{ENSEMBLE}/generate, /generate_stream)")
        print(f"  gRPC     {endpoints.grpc}")
        print(f"  metrics  {endpoints.metrics}")
        print(f"ready (process group {server.process.pid}); Ctrl-C or SIGTERM stops the server", flush=True)
        while not stop_requested.wait(0.5):
            if server.process.poll() is not None:
                raise UserError(f"tritonserver exited unexpectedly with code {server.process.returncode}: {server.log_tail(5)}".replace("\n", " | "))
        print("stopping", flush=True)
    finally:
        clean = server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(workspace, ignore_errors=True)
    if not clean:
        raise UserError(f"stopping tritonserver left processes or /dev/shm/*{server.shm_prefix}* behind; remove them by hand")
    print("stopped; no process or shared-memory segment left", flush=True)
    return None


def configure_parser(parser) -> None:
    parser.add_argument("--engine", required=True, type=Path, help="engine directory written by `minitron build` (holds manifest.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, help="HTTP port (default: a free one)")
    parser.add_argument("--grpc-port", type=int, help="gRPC port (default: a free one)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus metrics port (default: a free one)")
    parser.add_argument("--instances", type=int, default=1, help="model instances, each with its own engine (default 1)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="largest batch Triton and the engine form (default 8)")
    parser.add_argument("--threads", type=int, help="CPU engine threads per instance (default: the profile's cpu_threads, else cores / instances)")
    parser.add_argument("--repo-only", type=Path, metavar="DIR", help="write the Triton model repository to DIR and exit (TensorRT-LLM engines: for NVIDIA's container)")


def command(args) -> int:
    serve(args.engine, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
          instances=args.instances, max_batch_size=args.max_batch_size, repo_only=args.repo_only, threads=args.threads)
    return 0
