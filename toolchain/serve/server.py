"""Run the Triton Inference Server binary bundled in nvidia-pytriton on a model repository.

Only the process side lives here: the environment the python-backend stub needs (REFERENCE §4),
127.0.0.1 ports, readiness, and a stop that leaves no process or shared-memory segment behind.
What goes into the repository is repository.py's business.
"""

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from toolchain.errors import UserError, setting

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True)
class Endpoints:
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int

    @property
    def http(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"


def bind(host: str, port: int) -> int:
    """Bind and release host:port (0: a free port); returns the port. Raises OSError (socket.gaierror: unknown host)."""
    family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind) as sock:
        sock.bind(address)
        return sock.getsockname()[1]


def check_host(host: str) -> None:
    try:
        bind(host, 0)
    except OSError as exc:
        raise UserError(f"cannot bind {setting('serve.host')} {host} ({exc.strerror or exc}): it is not an address of this machine; "
                        "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None


def check_port_free(host: str, port: int, name: str) -> None:
    try:
        bind(host, port)
    except OSError as exc:
        raise UserError(f"port {port} on {host} is not free ({exc.strerror}); choose another {setting('serve.' + name)} or leave it out "
                        "to pick a free one") from None


def choose_endpoints(host: str, http_port: int | None, grpc_port: int | None, metrics_port: int | None) -> Endpoints:
    """The requested ports (refused when taken) and free ones for those not given, on a host this machine can bind.

    Port ranges are checked where they are declared (settings.ServeConfig)."""
    requested = ((http_port, "http_port"), (grpc_port, "grpc_port"), (metrics_port, "metrics_port"))
    check_host(host)
    chosen = []
    for port, flag in requested:
        if port is not None:
            check_port_free(host, port, flag)
        else:
            port = bind(host, 0)
            while port in chosen:
                port = bind(host, 0)
        chosen.append(port)
    if len(set(chosen)) != 3:
        raise UserError(f"HTTP, gRPC and metrics ports must differ, got {chosen}")
    return Endpoints(host, *chosen)


def pytriton_paths() -> tuple[Path, Path, Path]:
    """(tritonserver binary, python backend directory, python-backend stub for this interpreter) from nvidia-pytriton."""
    try:
        from pytriton.utils.distribution import get_root_module_path, get_stub_path
    except ImportError:
        raise UserError("nvidia-pytriton is not installed; install it with `pip install nvidia-pytriton==0.7.0` (the Triton server it bundles serves CPU engines)") from None
    root = get_root_module_path() / "tritonserver"
    stub = get_stub_path(f"{sys.version_info.major}.{sys.version_info.minor}")
    if not stub.is_file():
        raise UserError(f"nvidia-pytriton has no python-backend stub for Python {sys.version_info.major}.{sys.version_info.minor}; use Python 3.8-3.13")
    return root / "bin" / "tritonserver", root / "backends" / "python", stub


def server_environment() -> dict[str, str]:
    """The stub links libpython and finds packages through the `python3` first on PATH (REFERENCE §4)."""
    from pytriton.utils.distribution import get_libs_path

    env = dict(os.environ)
    libraries = [sysconfig.get_config_var("LIBDIR"), str(get_libs_path())]
    env["LD_LIBRARY_PATH"] = ":".join(libraries + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


class TritonServer:
    """One tritonserver process group on a model repository; `start()` returns when every model is ready."""

    def __init__(self, repository: Path, workspace: Path, endpoints: Endpoints, exit_timeout_s: int = 10):
        self.repository = Path(repository)
        self.workspace = Path(workspace)
        self.endpoints = endpoints
        self.exit_timeout_s = exit_timeout_s
        self.shm_prefix = f"minitron{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        self.log_path = self.workspace / "tritonserver.log"
        self.process: subprocess.Popen | None = None

    def command(self, binary: Path, backends: Path) -> list[str]:
        e = self.endpoints
        return [str(binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
                f"--http-address={e.host}", f"--http-port={e.http_port}", f"--grpc-address={e.host}", f"--grpc-port={e.grpc_port}",
                f"--metrics-address={e.host}", f"--metrics-port={e.metrics_port}", "--allow-gpu-metrics=false",
                f"--exit-timeout-secs={self.exit_timeout_s}", f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                "--strict-readiness=true", "--log-verbose=0"]

    def start(self, ready_timeout_s: float = 300) -> Endpoints:
        binary, python_backend, stub = pytriton_paths()
        backends = self.workspace / "backends"
        (backends / "python").mkdir(parents=True, exist_ok=True)
        for source in (python_backend / "libtriton_python.so", python_backend / "triton_python_backend_utils.py", stub):
            shutil.copy2(source, backends / "python" / source.name)
        with self.log_path.open("wb") as log_file:  # the child keeps its own descriptor
            self.process = subprocess.Popen(self.command(binary, backends), stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=server_environment(), start_new_session=True)
        try:
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.endpoints

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoints.http}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode} before it was ready; "
                                   f"its log ({self.log_path}) ends:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise RuntimeError(f"tritonserver was not ready after {timeout_s:.0f} s; its log ({self.log_path}) ends:\n{self.log_tail()}")

    def shm_segments(self) -> list[Path]:
        return sorted(SHM_DIR.glob(f"*{self.shm_prefix}*")) if SHM_DIR.is_dir() else []

    def stop(self) -> bool:
        """SIGTERM the group (Triton drains and stops its stubs), SIGKILL what is left, remove our shm segments.

        True when no process of the group and no segment is left.
        """
        if self.process is None:
            return True
        pgid = self.process.pid
        if self.process.poll() is None:
            os.killpg(pgid, signal.SIGTERM)
            try:
                self.process.wait(timeout=self.exit_timeout_s + 20)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop after SIGTERM; killing its process group")
                os.killpg(pgid, signal.SIGKILL)
        self.process.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # stubs that outlived the server, until the group is gone (reaped)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            log.warning("processes of group %d are still present after SIGKILL", pgid)
            return False
        for segment in self.shm_segments():
            segment.unlink(missing_ok=True)
        self.process = None
        return not self.shm_segments()
