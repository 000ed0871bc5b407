"""`minitron serve` / `minitron generate` against a real Triton server (nvidia-pytriton's) on a tiny CPU engine.

One server per batching mode (in-flight, static) for the session, started by `serving` (the
lifecycle `minitron serve` and `minitron bench` use) on free 127.0.0.1 ports; every test on `server`
runs against both. One more in-flight server serves the engine under two model names with a small
batch and KV budget (joining mid-batch, cancelling, the budget, metrics); one more is started
through the CLI exactly as a user would, stopped with SIGTERM and checked for leftovers.
Repository writing and the refusals need no server.
"""

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, save_tiny_model, write_engine_manifest

from toolchain.errors import UserError
from toolchain.generate import GenerationError, generate_text
from toolchain.settings import ServeConfig

pytest.importorskip("pytriton", reason="needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("onnxruntime_genai", reason="needs the cpu-engine extra: pip install -e '.[cpu-engine]'")

MAX_INPUT_LEN = 48
PROMPTS = ["Document 3. the model reads", "the server packs ten tokens", "a student distills the logits number",
           "Document 12.", "every layer exports", "the cache", "one batch writes a sequence number 4.", "the teacher"]


@pytest.fixture(scope="session")
def cpu_engine_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A CPU engine directory as `minitron build` lays it out: manifest.json, tokenizer/, model/."""
    from toolchain.cpu_engine import build_cpu_engine

    root = tmp_path_factory.mktemp("serve")
    checkpoint = save_tiny_model(root / "checkpoint", tokenizer_dir)
    engine_dir = root / "engine"
    build_cpu_engine(checkpoint, engine_dir / "model", "fp32")
    shutil.copytree(tokenizer_dir, engine_dir / "tokenizer")
    write_engine_manifest(engine_dir, "cpu-fp32", "onnxruntime-genai", "model", max_batch_size=8, max_input_len=MAX_INPUT_LEN, max_seq_len=128)
    return engine_dir


class ServeProcess:
    def __init__(self, engine_dir: Path):
        self.process = subprocess.Popen([sys.executable, "-m", "toolchain", "serve", "--engine", str(engine_dir), "--threads", "1"],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if line.startswith("ready"):
                break
        output = "".join(self.lines)
        if not output.splitlines() or not output.splitlines()[-1].startswith("ready"):
            self.stop()
            pytest.fail(f"minitron serve did not become ready:\n{output}")
        self.http = re.search(r"HTTP\s+http://(\S+)", output).group(1)
        self.grpc = re.search(r"gRPC\s+(\S+)", output).group(1)
        self.metrics = re.search(r"metrics\s+(\S+)", output).group(1)
        self.process_group = int(re.search(r"process group (\d+)", output).group(1))

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        rest, _ = self.process.communicate(timeout=60)
        return rest


@pytest.fixture(scope="session", params=["inflight", "static"])
def server(cpu_engine_dir, request):
    """The endpoints of a Triton server on the engine, batching in flight or statically, for the whole session."""
    from toolchain.serve import serving

    with serving(cpu_engine_dir, ServeConfig(threads=1, batching=request.param)) as running:
        yield running.endpoints


KV_CACHE_TOKENS = 100


@pytest.fixture(scope="session")
def slow_engine_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A wider engine (~30M parameters) whose decode steps take milliseconds, slower than Triton relays tokens."""
    from toolchain.cpu_engine import build_cpu_engine

    root = tmp_path_factory.mktemp("serve-slow")
    checkpoint = save_tiny_model(root / "checkpoint", tokenizer_dir, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                                 num_attention_heads=8, num_key_value_heads=4)
    engine_dir = root / "engine"
    build_cpu_engine(checkpoint, engine_dir / "model", "fp32")
    shutil.copytree(tokenizer_dir, engine_dir / "tokenizer")
    write_engine_manifest(engine_dir, "cpu-fp32", "onnxruntime-genai", "model", max_batch_size=8, max_input_len=MAX_INPUT_LEN, max_seq_len=128)
    return engine_dir


def in_process_engine(engine_dir):
    """An engine directory's engine run in this process (its own static path): the reference for what Triton returns."""
    from toolchain.cpu_engine import CpuEngine

    return CpuEngine(engine_dir / "model", threads=1, tokenizer_dir=engine_dir / "tokenizer", max_input_len=MAX_INPUT_LEN, max_seq_len=128)


def greedy_of(engine):
    return lambda prompt, max_tokens: engine.decode(list(engine.generate(prompt, max_new_tokens=max_tokens)))


@pytest.fixture(scope="session")
def slow_engine(slow_engine_dir):
    with in_process_engine(slow_engine_dir) as engine:
        yield engine


@pytest.fixture(scope="session")
def slow_greedy(slow_engine):
    return greedy_of(slow_engine)


@pytest.fixture(scope="session")
def two_model_server(cpu_engine_dir, slow_engine_dir):
    """An in-flight server with the slow engine as model `ensemble` and the tiny one as `second`, two requests per batch, a KV budget of 100 tokens."""
    from toolchain.serve import serving

    settings = ServeConfig(threads=1, batching="inflight", max_batch_size=2, kv_cache_tokens=KV_CACHE_TOKENS)
    with serving({"ensemble": slow_engine_dir, "second": cpu_engine_dir}, settings) as running:
        yield running.endpoints


@pytest.fixture(scope="session")
def local_engine(cpu_engine_dir):
    with in_process_engine(cpu_engine_dir) as engine:
        yield engine


@pytest.fixture(scope="session")
def in_process_greedy(local_engine):
    return greedy_of(local_engine)


def test_health_and_metadata(server):
    import urllib.request

    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("ensemble")
    metadata = client.get_model_metadata("ensemble")
    assert {tensor["name"]: tensor["datatype"] for tensor in metadata["inputs"]} == {
        "text_input": "BYTES", "max_tokens": "INT32", "stream": "BOOL", "temperature": "FP32", "top_k": "INT32",
        "top_p": "FP32", "end_id": "INT32", "seed": "UINT64"}
    assert [tensor["name"] for tensor in metadata["outputs"]] == ["text_output"]
    assert client.get_model_config("ensemble")["model_transaction_policy"]["decoupled"] is True
    with urllib.request.urlopen(server.metrics, timeout=10) as response:
        assert "nv_inference_request_success" in response.read().decode()


def test_http_generate_and_generate_stream_equal_in_process_greedy(server, in_process_greedy):
    expected = in_process_greedy(PROMPTS[0], 12)
    assert list(generate_text(server.http, PROMPTS[0], 12, stream=False, protocol="http")) == [expected]
    pieces = list(generate_text(server.http, PROMPTS[0], 12, stream=True, protocol="http"))
    assert len(pieces) > 1 and "".join(pieces) == expected


def test_grpc_streams_token_by_token(server, local_engine, in_process_greedy):
    expected = in_process_greedy(PROMPTS[1], 16)
    pieces = list(generate_text(server.grpc, PROMPTS[1], 16, stream=True))
    assert len(pieces) >= len(list(local_engine.generate(PROMPTS[1], max_new_tokens=16))) and "".join(pieces) == expected
    assert list(generate_text(server.grpc, PROMPTS[1], 16, stream=False)) == [expected]


def test_eight_concurrent_requests_are_all_answered_correctly(server, in_process_greedy):
    expected = [in_process_greedy(prompt, 10) for prompt in PROMPTS]

    def ask(i):
        protocol, url = ("grpc", server.grpc) if i % 2 else ("http", server.http)
        return "".join(generate_text(url, PROMPTS[i], 10, stream=i % 4 < 2, protocol=protocol))

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        assert list(pool.map(ask, range(len(PROMPTS)))) == expected


def test_eight_concurrent_streams_of_different_lengths_equal_each_sent_alone(server, in_process_greedy):
    lengths = [3, 30, 12, 40, 7, 21, 16, 9]
    stream = lambda i: "".join(generate_text(server.grpc, PROMPTS[i], lengths[i], stream=True))  # noqa: E731
    alone = [stream(i) for i in range(len(PROMPTS))]
    assert alone == [in_process_greedy(prompt, length) for prompt, length in zip(PROMPTS, lengths)]  # the engine's own greedy
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        assert list(pool.map(stream, range(len(PROMPTS)))) == alone


def test_seeded_sampling_through_triton_repeats(server):
    first = "".join(generate_text(server.grpc, PROMPTS[2], 10, temperature=1.0, top_k=40, seed=11))
    assert first == "".join(generate_text(server.grpc, PROMPTS[2], 10, temperature=1.0, top_k=40, seed=11))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("prompt, max_tokens, message", [
    ("", 8, "empty prompt"),
    ("the model", 0, "max_tokens must be positive"),
    ("the model", 500, "above the engine limit"),
    ("the model reads the weights " * 20, 4, f"more than the engine's max_input_len {MAX_INPUT_LEN}"),
])
def test_bad_requests_get_an_error_and_the_server_keeps_serving(server, protocol, prompt, max_tokens, message):
    url = server.grpc if protocol == "grpc" else server.http
    with pytest.raises(GenerationError, match=message):
        list(generate_text(url, prompt, max_tokens, protocol=protocol))
    assert len("".join(generate_text(url, PROMPTS[3], 4, protocol=protocol))) > 0


def test_wrong_tensor_type_and_unknown_model_are_refused(server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with pytest.raises(GenerationError, match="unknown model|not found"):
        list(generate_text(server.grpc, "the model", 4, model="no_such_model"))
    client = grpcclient.InferenceServerClient(server.grpc)
    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"the model"]], dtype=np.object_))
    max_tokens = grpcclient.InferInput("max_tokens", [1, 1], "FP32")  # the model takes INT32
    max_tokens.set_data_from_numpy(np.array([[4.0]], dtype=np.float32))
    errors = queue.Queue()
    client.start_stream(callback=lambda result, error: errors.put(error))
    client.async_stream_infer("ensemble", [text, max_tokens])
    error = errors.get(timeout=30)
    client.stop_stream()
    client.close()
    assert isinstance(error, InferenceServerException) and "max_tokens" in error.message() and "FP32" in error.message()
    assert "".join(generate_text(server.grpc, PROMPTS[3], 4))


def test_generate_cli_prints_text(server, in_process_greedy):
    result = run_cli("generate", "--url", server.grpc, "--prompt", PROMPTS[4], "--max-tokens", "8", "--stream")
    assert result.returncode == 0, result.stderr
    assert result.stdout == in_process_greedy(PROMPTS[4], 8) + "\n"
    refused = run_cli("generate", "--url", server.http, "--protocol", "http", "--prompt", "", "--max-tokens", "4")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "empty prompt" in refused.stderr


def test_generate_names_the_wrong_protocol_or_port(server):
    nothing = f"127.0.0.1:{free_port()}"
    for url, protocol, reason in ((server.grpc, "http", "the port answered, but not in HTTP/1.1"), (server.http, "grpc", "failed to connect"),
                                  (nothing, "grpc", "Connection refused"), (nothing, "http", "Connection refused")):
        result = run_cli("generate", "--url", url, "--protocol", protocol, "--prompt", "the model", "--max-tokens", "4")
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        name, other = ("HTTP", "grpc") if protocol == "http" else ("gRPC", "http")
        assert f"found no Triton {name} endpoint at {url}" in result.stderr and reason in result.stderr
        assert "is the server running" in result.stderr and f"its {name} port" in result.stderr and f"--protocol {other}" in result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("args, message", [
    (["--grpc-port", "70000"], "invalid --grpc-port: Input should be less than or equal to 65535"),
    (["--http-port", "0"], "invalid --http-port: Input should be greater than or equal to 1"),
    (["--instances", "0"], "invalid --instances: Input should be greater than 0"),
    (["--max-batch-size", "0"], "invalid --max-batch-size: Input should be greater than 0"),  # a batch that holds no request
    (["--host", "999.1.1.1"], "cannot bind --host 999.1.1.1"),
    (["--host", "192.0.2.1"], "cannot bind --host 192.0.2.1"),  # a valid address, but not this machine's
])
def test_serve_refuses_bad_addresses_in_one_line(cpu_engine_dir, args, message):
    result = run_cli("serve", "--engine", cpu_engine_dir, *args)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_serve_refuses_engine_dir_without_manifest(tmp_path):
    result = run_cli("serve", "--engine", tmp_path)
    assert result.returncode == 2 and "no manifest.json" in result.stderr and result.stderr.count("\n") == 1


def test_serve_refuses_a_port_in_use(cpu_engine_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_cli("serve", "--engine", cpu_engine_dir, "--http-port", taken.getsockname()[1])
    assert result.returncode == 2 and "is not free" in result.stderr and result.stderr.count("\n") == 1


def test_repo_only_writes_the_cpu_repository(cpu_engine_dir, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    result = run_cli("serve", "--engine", cpu_engine_dir, "--repo-only", tmp_path / "repo", "--instances", "2", "--max-batch-size", "4")
    assert result.returncode == 0, result.stderr
    config = text_format.Parse((tmp_path / "repo" / "ensemble" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.backend == "python" and config.max_batch_size == 4 and config.model_transaction_policy.decoupled
    assert config.instance_group[0].count == 2
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters["model_dir"] == str((cpu_engine_dir / "model").resolve())
    assert parameters["tokenizer_dir"] == str((cpu_engine_dir / "tokenizer").resolve())
    assert (parameters["max_input_len"], parameters["max_seq_len"], parameters["engine_max_batch_size"]) == (str(MAX_INPUT_LEN), "128", "4")
    assert (parameters["batching"], parameters["max_num_tokens"], parameters["kv_cache_tokens"]) == ("inflight", str(MAX_INPUT_LEN), str(4 * 128))
    assert "TritonPythonModel" in (tmp_path / "repo" / "ensemble" / "1" / "model.py").read_text()


def test_repo_only_refuses_a_used_folder_naming_what_serve_accepts(cpu_engine_dir, tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "mine.txt").write_text("keep")
    result = run_cli("serve", "--engine", cpu_engine_dir, "--repo-only", tmp_path / "repo")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--repo-only" in result.stderr and "new or empty directory" in result.stderr
    assert "--overwrite" not in result.stderr and "--out" not in result.stderr
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["mine.txt"] and (tmp_path / "repo" / "mine.txt").read_text() == "keep"


@pytest.fixture
def trtllm_engine_dir(tmp_path, tokenizer_dir) -> Path:
    engine_dir = tmp_path / "trtllm-engine"
    (engine_dir / "engine").mkdir(parents=True)
    shutil.copytree(tokenizer_dir, engine_dir / "tokenizer")
    write_engine_manifest(engine_dir, "h100-fp8", "tensorrt-llm", "engine", built=False)
    return engine_dir


def test_repo_only_writes_the_tensorrt_llm_inflight_batching_layout(trtllm_engine_dir, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from toolchain.engine_profile import load_profile

    profile = load_profile("h100-fp8")
    result = run_cli("serve", "--engine", trtllm_engine_dir, "--repo-only", tmp_path / "repo", "--max-batch-size", "512")
    assert result.returncode == 0, result.stderr
    assert "build the engine first" in result.stdout
    configs = {name: text_format.Parse((tmp_path / "repo" / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
               for name in ("preprocessing", "tensorrt_llm", "postprocessing", "ensemble")}
    llm = configs["tensorrt_llm"]
    assert llm.backend == "tensorrtllm" and llm.model_transaction_policy.decoupled
    assert llm.max_batch_size == profile.max_batch_size  # capped by the engine's limit
    assert llm.parameters["gpt_model_path"].string_value == str((trtllm_engine_dir / "engine").resolve())
    assert llm.parameters["gpt_model_type"].string_value == "inflight_fused_batching"
    assert float(llm.parameters["kv_cache_free_gpu_mem_fraction"].string_value) == profile.kv_cache.free_gpu_memory_fraction
    assert configs["preprocessing"].parameters["tokenizer_dir"].string_value == str((trtllm_engine_dir / "tokenizer").resolve())
    assert configs["preprocessing"].parameters["max_input_len"].string_value == str(profile.max_input_len)
    ensemble = configs["ensemble"]
    assert ensemble.platform == "ensemble" and [step.model_name for step in ensemble.ensemble_scheduling.step] == [
        "preprocessing", "tensorrt_llm", "postprocessing"]
    assert {tensor.name for tensor in ensemble.input} >= {"text_input", "max_tokens", "stream", "temperature", "top_k", "top_p", "end_id"}
    produced = {value for step in ensemble.ensemble_scheduling.step for value in step.output_map.values()}
    consumed = {value for step in ensemble.ensemble_scheduling.step for value in step.input_map.values()}
    assert consumed - produced <= {tensor.name for tensor in ensemble.input}  # every step input is wired
    for name in ("preprocessing", "postprocessing"):
        assert "TritonPythonModel" in (tmp_path / "repo" / name / "1" / "model.py").read_text()


def test_a_tensorrt_llm_repository_serves_one_engine_as_ensemble(trtllm_engine_dir, tmp_path):
    from toolchain.backends import engine_backend
    from toolchain.manifest import read_manifest

    manifest = read_manifest(trtllm_engine_dir)
    (tmp_path / "repo").mkdir()
    with pytest.raises(UserError, match="served as model 'ensemble'.*'student' is not possible"):
        engine_backend(manifest.backend).write_repository(trtllm_engine_dir, manifest, tmp_path / "repo", "student", ServeConfig())
    assert list((tmp_path / "repo").iterdir()) == []


def test_serve_refuses_to_start_a_tensorrt_llm_engine_here(trtllm_engine_dir):
    result = run_cli("serve", "--engine", trtllm_engine_dir)
    assert result.returncode == 2 and "--repo-only" in result.stderr and result.stderr.count("\n") == 1


def output_tokens(metrics_url: str, model: str = "ensemble") -> float:
    """The engine's output-token counter of `model` on the metrics page."""
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        page = response.read().decode()
    return float(re.search(rf'^minitron_output_tokens{{model="{model}"}} (\S+)$', page, re.MULTILINE).group(1))


def test_a_request_arriving_mid_batch_gets_its_first_token_before_the_batch_finishes(two_model_server, slow_engine):
    long_tokens, short_prompt = 80, PROMPTS[5]
    assert len(list(slow_engine.generate(PROMPTS[4], max_new_tokens=long_tokens))) == long_tokens  # no early EOS: it runs long
    events, started = [], threading.Event()

    def long_request():
        for piece in generate_text(two_model_server.grpc, PROMPTS[4], long_tokens, stream=True):
            started.set()
        events.append("long finished")

    thread = threading.Thread(target=long_request)
    thread.start()
    assert started.wait(60)
    short = generate_text(two_model_server.grpc, short_prompt, 4, stream=True)
    next(short)
    events.append("short first token")
    rest = list(short)
    thread.join(60)
    assert events == ["short first token", "long finished"]
    assert "".join(rest)


def test_cancelling_a_stream_frees_its_slot(two_model_server, slow_greedy):
    """A (95 tokens) is cancelled after its first; B cannot start until A's KV reservation is freed (their sum is over the budget).

    Without the cancellation A would run to its end: 95 + 40 tokens.
    """
    before = output_tokens(two_model_server.metrics)
    cancelled = generate_text(two_model_server.grpc, PROMPTS[4], 95, stream=True)
    next(cancelled)
    cancelled.close()  # stops the gRPC stream, cancelling the request
    assert "".join(generate_text(two_model_server.grpc, PROMPTS[5], 40, stream=True)) == slow_greedy(PROMPTS[5], 40)
    generated = output_tokens(two_model_server.metrics) - before
    assert 40 < generated < 95 + 40, f"{generated} tokens: the cancelled request ran to its end"


def test_a_request_over_the_kv_budget_gets_an_error_and_the_others_are_served(two_model_server, slow_greedy):
    with pytest.raises(GenerationError, match=f"exceed the KV-cache budget of {KV_CACHE_TOKENS} tokens"):
        list(generate_text(two_model_server.grpc, PROMPTS[0], 100))
    assert "".join(generate_text(two_model_server.grpc, PROMPTS[0], 10)) == slow_greedy(PROMPTS[0], 10)


def test_two_models_answer_as_their_engines_and_report_their_metrics(two_model_server, slow_greedy, in_process_greedy):
    import urllib.request

    for model, greedy in (("ensemble", slow_greedy), ("second", in_process_greedy)):
        assert "".join(generate_text(two_model_server.http, PROMPTS[6], 12, stream=True, protocol="http", model=model)) == greedy(PROMPTS[6], 12)
    with urllib.request.urlopen(two_model_server.metrics, timeout=10) as response:
        page = response.read().decode()
    for model in ("ensemble", "second"):
        assert re.search(rf'^minitron_queue_seconds_count{{model="{model}"}} [1-9]', page, re.MULTILINE), page
        assert re.search(rf'^minitron_batch_size_bucket{{le="1",model="{model}"}} [1-9]', page, re.MULTILINE) or \
            re.search(rf'^minitron_batch_size_bucket{{model="{model}",le="1"}} [1-9]', page, re.MULTILINE), page
        assert f'minitron_output_tokens_per_second{{model="{model}"}}' in page
        assert float(re.search(rf'^minitron_step_seconds_sum{{model="{model}"}} (\S+)$', page, re.MULTILINE).group(1)) > 0
        assert output_tokens(two_model_server.metrics, model) >= 12


def test_kv_budget_that_cannot_hold_one_request_is_refused(cpu_engine_dir, tmp_path):
    result = run_cli("serve", "--engine", cpu_engine_dir, "--repo-only", tmp_path / "repo", "--kv-cache-tokens", "20")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"--kv-cache-tokens 20 cannot hold one request of the engine's max_input_len {MAX_INPUT_LEN}" in result.stderr


def test_repo_only_writes_several_named_engines_and_refuses_unnamed_ones(cpu_engine_dir, tmp_path):
    result = run_cli("serve", "--engine", f"teacher={cpu_engine_dir}", "--engine", f"width={cpu_engine_dir}", "--repo-only", tmp_path / "repo",
                     "--batching", "static")
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in (tmp_path / "repo").iterdir()) == ["teacher", "width"]
    assert 'key: "batching"\n  value: { string_value: "static" }' in (tmp_path / "repo" / "width" / "config.pbtxt").read_text()
    refused = run_cli("serve", "--engine", cpu_engine_dir, "--engine", cpu_engine_dir)
    assert refused.returncode == 2 and "--engine NAME=DIR" in refused.stderr and refused.stderr.count("\n") == 1


def test_serve_in_the_foreground_answers_and_stops_on_sigterm_leaving_nothing(cpu_engine_dir, in_process_greedy):
    """`minitron serve` as a user runs it: ready, answers, then SIGTERM and look for leftovers."""
    server = ServeProcess(cpu_engine_dir)
    segments = lambda: list(Path("/dev/shm").glob(f"*minitron{server.process.pid}-*"))  # noqa: E731
    try:
        assert "".join(generate_text(server.grpc, PROMPTS[5], 6)) == in_process_greedy(PROMPTS[5], 6)
        assert segments(), "the running server should hold python-backend shared memory"
    finally:
        output = server.stop()
    assert server.process.returncode == 0, output
    assert "stopped; no process or shared-memory segment left" in output
    with pytest.raises(ProcessLookupError):
        os.killpg(server.process_group, 0)
    assert segments() == []
