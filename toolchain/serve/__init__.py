"""`minitron serve`: serve an engine directory through a real Triton Inference Server.

`serving` is the one engine lifecycle: pick endpoints, write the repository of the engine's backend
(toolchain/backends/), start Triton, hand the endpoints to the caller, stop Triton and remove its
workspace, leaving no process or /dev/shm segment. `minitron serve` runs it in the foreground until
SIGTERM/SIGINT; `minitron bench` and the tests use it directly. Engines whose backend Triton cannot
run here (TensorRT-LLM: a GPU and NVIDIA's container) get their repository with `--repo-only`.
Every backend exposes the same `ensemble` model interface (text_input, max_tokens, stream,
temperature/top_k/top_p, end_id, seed -> text_output), so `minitron generate` and the benchmarks talk
to any of them. One server can serve several CPU engines, each under its own model name
(`--engine teacher=DIR --engine width=DIR`), for A/B comparisons. Layout: repository.py (shared pieces of what Triton loads), server.py (the process),
cpu_model.py and trtllm_*.py (model code Triton runs).
"""

import contextlib
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from toolchain.backends import engine_backend
from toolchain.errors import UserError
from toolchain.manifest import read_manifest
from toolchain.paths import atomic_output_dir, check_output_location
from toolchain.serve.repository import ENSEMBLE
from toolchain.serve.server import Endpoints, TritonServer, choose_endpoints
from toolchain.settings import ServeConfig


@dataclass(frozen=True)
class RunningServer:
    """What `serving` yields: where the server listens, which engine each model name serves, and its process."""

    endpoints: Endpoints
    models: dict[str, Path]  # model name clients address -> engine directory it serves
    server: TritonServer


MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def engine_models(engines: Path | str | dict[str, Path]) -> dict[str, Path]:
    """Model name -> engine directory; one engine without a name is model `ensemble`."""
    if not isinstance(engines, dict):
        return {ENSEMBLE: Path(engines)}
    for name in engines:
        if not MODEL_NAME.match(name):
            raise UserError(f"model name {name!r} is not one Triton accepts; use letters, digits, '_', '-' and '.'")
    return {name: Path(directory) for name, directory in engines.items()}


def parse_engines(values: list[str]) -> dict[str, Path]:
    """`--engine DIR` (model `ensemble`) or several `--engine NAME=DIR`, each under its own model name."""
    if len(values) == 1 and "=" not in values[0]:
        return {ENSEMBLE: Path(values[0])}
    engines = {}
    for value in values:
        name, equals, directory = value.partition("=")
        if not equals or not name or not directory:
            raise UserError(f"--engine {value}: to serve several engines name each one, --engine NAME=DIR (e.g. --engine teacher=engines/teacher)")
        if name in engines:
            raise UserError(f"--engine names model {name!r} twice; give each engine its own name")
        engines[name] = Path(directory)
    return engine_models(engines)


@contextlib.contextmanager
def serving(engines: Path | str | dict[str, Path], settings: ServeConfig = ServeConfig(), ready_timeout_s: float = 300) -> Iterator[RunningServer]:
    """A Triton server serving the engines for the duration of the block, bound and sized as `settings` say.

    `engines`: one engine directory (served as model `ensemble`) or model name -> engine directory.
    Free ports for those not given; on leaving the block (also on an error or Ctrl-C) the server is
    stopped and its workspace removed; a stop that leaves a process or shm segment is a UserError.
    """
    models = engine_models(engines)
    manifests = {name: read_manifest(directory) for name, directory in models.items()}
    for name, directory in models.items():
        reason = engine_backend(manifests[name].backend).unavailable_reason()
        if reason is not None:
            raise UserError(f"{directory} cannot be served here: {reason}; write its repository with "
                            f"`minitron serve --engine {directory} --repo-only DIR` and start Triton where it runs (docs/serve.md)")
    endpoints = choose_endpoints(settings.host, settings.http_port, settings.grpc_port, settings.metrics_port)
    workspace = Path(tempfile.mkdtemp(prefix="minitron-serve-"))
    server = TritonServer(workspace / "repository", workspace, endpoints)
    try:
        for name, directory in models.items():
            backend = engine_backend(manifests[name].backend)
            backend.write_repository(directory, manifests[name], server.repository, name, settings)
        try:
            server.start(ready_timeout_s)
        except RuntimeError as exc:
            raise UserError(f"Triton did not start on {', '.join(map(str, models.values()))}: {exc}".replace("\n", " | ")) from None
        yield RunningServer(endpoints, models, server)
    finally:
        clean = server.stop()
        shutil.rmtree(workspace, ignore_errors=True)
    if not clean:
        raise UserError(f"stopping tritonserver left processes or /dev/shm/*{server.shm_prefix}* behind; remove them by hand")


def warn_if_exposed(host: str) -> None:
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {host} exposes the server beyond this machine; it has no authentication", file=sys.stderr)


def write_repository_only(engines: Path | dict[str, Path], repository: Path, settings: ServeConfig) -> Path:
    """The engines' repository in `repository` (new or empty), to start Triton on elsewhere."""
    check_output_location(repository, "--repo-only", overwrite=True)  # emptiness: checked below, in serve's own words
    if repository.is_dir() and any(repository.iterdir()):
        raise UserError(f"--repo-only {repository} is not empty; name a new or empty directory (serve never overwrites one)")
    models = engine_models(engines)
    manifests = {name: read_manifest(directory) for name, directory in models.items()}
    with atomic_output_dir(repository) as tmp:
        for name, directory in models.items():
            written = engine_backend(manifests[name].backend).write_repository(directory, manifests[name], tmp, name, settings)
            print(f"wrote a Triton model repository for {directory} ({manifests[name].backend}) to {repository}: models {', '.join(written)}")
    for name, directory in models.items():
        for note in engine_backend(manifests[name].backend).repository_notes(directory, manifests[name], repository):
            print(note)
    return repository


def serve(engines: Path | dict[str, Path], settings: ServeConfig, repo_only: Path | None = None, ready_timeout_s: float = 300) -> Path | None:
    """Serve the engines until SIGTERM/SIGINT; with `repo_only`, only write their Triton model repository there.

    Returns the repository path for `repo_only`, else None once the server has stopped and left nothing behind.
    """
    if repo_only is not None:
        return write_repository_only(engines, Path(repo_only), settings)
    stop_requested = threading.Event()
    previous = {}
    try:
        with serving(engines, settings, ready_timeout_s) as running:
            endpoints, process = running.endpoints, running.server.process
            warn_if_exposed(settings.host)
            for name, directory in running.models.items():
                manifest = read_manifest(directory)
                print(f"serving {directory} ({manifest.backend}, profile {manifest.profile_name}, {settings.batching} batching) as model '{name}'")
            print(f"  HTTP     http://{endpoints.http}  (POST /v2/models/{'|'.join(running.models)}/generate, /generate_stream)")
            print(f"  gRPC     {endpoints.grpc}")
            print(f"  metrics  {endpoints.metrics}")
            # From here until the server has stopped, a signal asks for a clean stop instead of interrupting it.
            previous = {sig: signal.signal(sig, lambda *_: stop_requested.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
            print(f"ready (process group {process.pid}); Ctrl-C or SIGTERM stops the server", flush=True)
            while not stop_requested.wait(0.5):
                if process.poll() is not None:
                    raise UserError(f"tritonserver exited unexpectedly with code {process.returncode}: "
                                    f"{running.server.log_tail(5)}".replace("\n", " | "))
            print("stopping", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped; no process or shared-memory segment left", flush=True)
    return None


def configure_parser(parser) -> None:
    from toolchain.cli_args import add_recipe_source, add_section_flags

    parser.add_argument("--engine", required=True, action="append", metavar="[NAME=]DIR",
                        help="engine directory written by `minitron build` (holds manifest.json), served as model 'ensemble'; "
                             "repeat as NAME=DIR to serve several engines, each as model NAME")
    parser.add_argument("--repo-only", type=Path, metavar="DIR", help="write the Triton model repository to DIR and exit (TensorRT-LLM engines: for NVIDIA's container)")
    add_recipe_source(parser)
    add_section_flags(parser, "serve")


def command(args) -> int:
    from toolchain.cli_args import sections_from_args

    (settings,) = sections_from_args(args, "serve")
    serve(parse_engines(args.engine), settings, repo_only=args.repo_only)
    return 0
