"""`minitron generate`: ask a running Triton server (CPU or TensorRT-LLM engine) for text.

`generate_text` is the one client of the `ensemble` interface (text_input, max_tokens, stream,
temperature, top_k, top_p, end_id, seed -> text_output) and is what tests and benchmarks use too.
gRPC goes through tritonclient's streaming API (the only way to reach a decoupled model over gRPC);
HTTP uses Triton's `generate` / `generate_stream` (server-sent events) endpoints. A refusal by the
server is a GenerationError; nothing answering (no server, wrong port, the other protocol's port) is
ServerUnreachable, whose message says what to check. Not a server, not a tokenizer: it sends text and
yields text pieces.
"""

import http.client
import json
import queue
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import numpy as np

from toolchain.errors import UserError


class GenerationError(RuntimeError):
    """The server answered the request with an error (its message names the problem)."""


class ServerUnreachable(ConnectionError):
    """No Triton server answered at the URL over the protocol."""


PROTOCOL_NAMES = {"grpc": "gRPC", "http": "HTTP"}


def other_protocol(protocol: str) -> str:
    return "http" if protocol == "grpc" else "grpc"


def unreachable(url: str, protocol: str, reason: str) -> ServerUnreachable:
    name, other = PROTOCOL_NAMES[protocol], PROTOCOL_NAMES[other_protocol(protocol)]
    return ServerUnreachable(f"found no Triton {name} endpoint at {url} ({reason}); is the server running (`minitron serve`), "
                             f"and is {url} its {name} port, not its {other} one?")


def request_fields(prompt: str, max_tokens: int, stream: bool, temperature: float, top_k: int, top_p: float,
                   end_id: int | None, seed: int | None) -> dict:
    fields = {"text_input": prompt, "max_tokens": max_tokens, "stream": stream, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    if end_id is not None:
        fields["end_id"] = end_id
    if seed is not None:
        fields["seed"] = seed
    return fields


GRPC_TYPES = {"text_input": ("BYTES", np.object_), "max_tokens": ("INT32", np.int32), "stream": ("BOOL", np.bool_),
              "temperature": ("FP32", np.float32), "top_k": ("INT32", np.int32), "top_p": ("FP32", np.float32),
              "end_id": ("INT32", np.int32), "seed": ("UINT64", np.uint64)}


def generate_grpc(url: str, model: str, fields: dict, timeout_s: float) -> Iterator[str]:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    inputs = []
    for name, value in fields.items():
        datatype, dtype = GRPC_TYPES[name]
        tensor = grpcclient.InferInput(name, [1, 1], datatype)
        tensor.set_data_from_numpy(np.array([[value.encode() if isinstance(value, str) else value]], dtype=dtype))
        inputs.append(tensor)
    def failure(error) -> Exception:
        if not isinstance(error, InferenceServerException):
            return GenerationError(str(error))
        if error.status() == "StatusCode.UNAVAILABLE":  # nothing, or no gRPC server, listens there
            return unreachable(url, "grpc", error.message())
        return GenerationError(error.message())

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(model, inputs, request_id=uuid.uuid4().hex, enable_empty_final_response=True,
                                  outputs=[grpcclient.InferRequestedOutput("text_output")])
        while True:
            try:
                result, error = responses.get(timeout=timeout_s)
            except queue.Empty:
                raise GenerationError(f"no response from {url} within {timeout_s:.0f} s") from None
            if error is not None:
                raise failure(error)
            text = result.as_numpy("text_output")
            if text is not None:
                yield "".join(piece.decode("utf-8", errors="replace") for piece in text.reshape(-1))
            if result.get_response().parameters["triton_final_response"].bool_param:
                return
    except InferenceServerException as exc:  # the reason, if any, went to the callback (e.g. connection refused)
        reported = [error for _, error in list(responses.queue) if error is not None]
        raise failure(reported[0] if reported else exc) from None
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def http_error(exc: urllib.error.HTTPError) -> str:
    body = exc.read().decode("utf-8", errors="replace")
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {exc.code}: {body[:200]}"


def generate_http(url: str, model: str, fields: dict, timeout_s: float) -> Iterator[str]:
    endpoint = "generate_stream" if fields["stream"] else "generate"
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/{endpoint}", data=json.dumps(fields).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            if endpoint == "generate":
                yield json.loads(response.read())["text_output"]
                return
            for line in response:
                line = line.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[len("data:"):])
                if "error" in event:
                    raise GenerationError(event["error"])
                yield event.get("text_output", "")
    except urllib.error.HTTPError as exc:
        raise GenerationError(http_error(exc)) from None
    except TimeoutError:
        raise GenerationError(f"no response from {url} within {timeout_s:.0f} s") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        talks_other = isinstance(exc, http.client.BadStatusLine) and not isinstance(exc, ConnectionError)
        raise unreachable(url, "http", "the port answered, but not in HTTP/1.1" if talks_other else str(getattr(exc, "reason", exc))) from None


def generate_text(url: str, prompt: str, max_tokens: int = 64, stream: bool = False, protocol: str = "grpc", model: str = "ensemble",
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, end_id: int | None = None, seed: int | None = None,
                  timeout_s: float = 300) -> Iterator[str]:
    """Yield the generated text: one piece per token with `stream`, else one piece. Raises GenerationError on a refusal."""
    url = url.removeprefix("http://").removeprefix("grpc://").rstrip("/")
    fields = request_fields(prompt, max_tokens, stream, temperature, top_k, top_p, end_id, seed)
    if protocol == "grpc":
        return generate_grpc(url, model, fields, timeout_s)
    if protocol == "http":
        return generate_http(url, model, fields, timeout_s)
    raise UserError(f"unknown protocol {protocol!r}; use grpc or http")


def configure_parser(parser) -> None:
    parser.add_argument("--url", required=True, help="server endpoint HOST:PORT (the gRPC port by default, the HTTP port with --protocol http)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-tokens", type=int, default=64, help="most new tokens (default 64)")
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="grpc (default) or http")
    parser.add_argument("--model", default="ensemble", help="Triton model name (default ensemble)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 = all")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    parser.add_argument("--end-id", type=int, help="token id that ends generation (default: the model's EOS)")
    parser.add_argument("--seed", type=int, help="sampling seed")


def command(args) -> int:
    pieces = generate_text(args.url, args.prompt, args.max_tokens, args.stream, args.protocol, args.model,
                           args.temperature, args.top_k, args.top_p, args.end_id, args.seed)
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except GenerationError as exc:
        raise UserError(f"request failed: {exc}".replace("\n", " ")) from None
    except ServerUnreachable as exc:
        other = other_protocol(args.protocol)
        raise UserError(f"{exc} (--protocol {other} talks to the {PROTOCOL_NAMES[other]} port)".replace("\n", " ")) from None
    sys.stdout.write("\n")
    return 0
