"""Cross-check of `minitron bench` against NVIDIA's AIPerf: the same Triton server, the same prompts, both tools' TTFT, ITL and throughput side by side.

    python benchmarks/crosscheck_aiperf.py --engine ENGINE_DIR --aiperf /path/to/venv/bin/aiperf [--workload cpu-crosscheck] [--threads 1]

AIPerf 0.13 needs numpy 2, which nvidia-pytriton's numpy<2 pin excludes from the toolchain's
environment, so AIPerf runs from a venv of its own as a subprocess (`python3 -m venv V &&
V/bin/pip install aiperf==0.13.0`); it is no dependency of the toolchain or its tests.

One Triton server is started on the engine. Per load point of the workload, the harness sends the
workload's requests over streaming gRPC (as `minitron bench --backend triton` does), then AIPerf
sends the same prompts, in the same order, at the same concurrency, over Triton's HTTP
`generate_stream` (AIPerf's `template` endpoint; it has no KServe gRPC client). Both tools'
TTFT, ITL, end-to-end latency and output tokens/s are compared; they should agree within 10% or the
results say why. Differences that remain by construction: the protocol (gRPC vs HTTP/SSE), and token
counting (the harness counts streamed responses, one per token; AIPerf re-tokenizes the answer's text).
Writes benchmarks/results/aiperf_crosscheck.{json,md}.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_results  # noqa: E402

from toolchain.bench.load import run_load_point  # noqa: E402
from toolchain.bench.runners import TritonRunner  # noqa: E402
from toolchain.bench.workloads import draw_requests, load_workload  # noqa: E402
from toolchain.manifest import read_manifest  # noqa: E402
from toolchain.models import read_tokenizer  # noqa: E402
from toolchain.serve import serving  # noqa: E402
from toolchain.settings import DataConfig, ServeConfig  # noqa: E402

# Triton's generate_stream takes the ensemble's inputs as JSON fields and answers with text_output per SSE event.
PAYLOAD_TEMPLATE = '{"text_input": {{ text|tojson }}, "max_tokens": {{ max_tokens }}, "stream": true}'
AGREEMENT = 0.10
COMPARED = {"ttft_ms": ("time_to_first_token", "TTFT"), "itl_ms": ("inter_token_latency", "ITL"), "e2e_ms": ("request_latency", "E2E")}


def run_aiperf(aiperf: str, http_url: str, tokenizer_dir: Path, point, work: Path) -> dict:
    """AIPerf against the server with the load point's prompts; its profile_export_aiperf.json."""
    (work / "prompts.jsonl").write_text("".join(json.dumps({"text": r.prompt, "output_length": r.max_new_tokens}) + "\n" for r in point.measured))
    (work / "triton_generate.jinja").write_text(PAYLOAD_TEMPLATE)
    command = [aiperf, "profile", "--model", "ensemble", "--endpoint-type", "template", "--url", f"http://{http_url}",
               "--custom-endpoint", "/v2/models/ensemble/generate_stream", "--streaming",
               "--extra-inputs", "payload_template:triton_generate.jinja", "--extra-inputs", "response_field:text_output",
               "--input-file", "prompts.jsonl", "--custom-dataset-type", "single_turn", "--dataset-sampling-strategy", "sequential",
               "--concurrency", str(point.load["concurrency"]), "--request-count", str(len(point.measured)),
               "--warmup-request-count", str(len(point.warmup)), "--tokenizer", str(tokenizer_dir),
               "--output-artifact-dir", "artifacts", "--no-server-metrics", "--no-gpu-telemetry"]
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}  # with it set, AIPerf takes the folder for a hub id
    result = subprocess.run(command, cwd=work, capture_output=True, text=True, env=env, timeout=3600)
    export = work / "artifacts" / "profile_export_aiperf.json"
    if result.returncode != 0 or not export.is_file():
        raise SystemExit(f"aiperf failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return {"command": shlex.join(command), **json.loads(export.read_text())}


def compare(ours: dict, theirs: dict) -> dict:
    rows = {}
    for key, (metric, name) in COMPARED.items():
        for stat, their_stat in (("mean", "avg"), ("p50", "p50")):
            rows[f"{name} {stat} (ms)"] = (ours[key].get(stat), theirs[metric].get(their_stat))
    rows["output tokens/s"] = (ours["output_tokens_per_s"], theirs["output_token_throughput"]["avg"])
    rows["requests/s"] = (ours["requests_per_s"], theirs["request_throughput"]["avg"])
    rows["output tokens per request"] = (ours["output_tokens_per_request"], theirs["output_sequence_length"]["avg"])
    return {name: {"minitron": a, "aiperf": b, "difference": (a - b) / b if a is not None and b else None} for name, (a, b) in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", required=True, type=Path, help="a CPU engine directory (minitron build --profile cpu-fp32)")
    parser.add_argument("--aiperf", required=True, help="the aiperf executable of its own venv")
    parser.add_argument("--workload", default="cpu-crosscheck")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default="builtin:python-docs")
    args = parser.parse_args()

    manifest = read_manifest(args.engine)
    tokenizer_dir = args.engine / manifest.tokenizer_dir
    workload = load_workload(args.workload)
    points = draw_requests(workload, read_tokenizer(tokenizer_dir), DataConfig(spec=args.data))
    rows = []
    with serving(args.engine, ServeConfig(threads=args.threads)) as server, tempfile.TemporaryDirectory(prefix="aiperf-") as scratch:
        send = TritonRunner.sender(server.endpoints.grpc, "ensemble")
        for index, point in enumerate(points):
            print(f"load point {point.load}: minitron bench (gRPC)", flush=True)
            ours = run_load_point(send, point)
            print(f"load point {point.load}: aiperf (HTTP/SSE)", flush=True)
            work = Path(scratch) / str(index)
            work.mkdir()
            theirs = run_aiperf(args.aiperf, server.endpoints.http, tokenizer_dir, point, work)
            rows.append({"load": point.load, "comparison": compare(ours, theirs), "harness": ours["harness"], "aiperf_command": theirs["command"],
                         "aiperf_version": theirs.get("aiperf_version")})
    payload = {"command": shlex.join([sys.executable, *sys.argv]), "engine": str(args.engine), "workload": workload.model_dump(mode="json"),
               "threads": args.threads, "machine": machine(), "agreement_target": AGREEMENT, "load_points": rows}
    write_results("aiperf_crosscheck", payload, format_markdown(payload))
    print(format_markdown(payload))


def format_markdown(payload: dict) -> str:
    lines = ["# `minitron bench` against AIPerf on the same Triton server", "",
             f"Command: `{payload['command']}` (AIPerf {payload['load_points'][0]['aiperf_version']}, from its own venv). Engine "
             f"`{payload['engine']}`, {payload['threads']} engine thread(s), workload `{payload['workload']['name']}`; "
             f"machine: {payload['machine']['platform']}, {payload['machine']['date']}.", "",
             "minitron streams over gRPC and counts one token per streamed response; AIPerf streams over HTTP (SSE from Triton's "
             "generate_stream) and re-tokenizes the text. Target: within 10%.", ""]
    for row in payload["load_points"]:
        lines += [f"## {row['load']}", "", "| metric | minitron bench | AIPerf | difference |", "|---|---|---|---|"]
        for name, values in row["comparison"].items():
            diff = values["difference"]
            flag = "" if diff is None or abs(diff) <= AGREEMENT else " (over 10%)"
            fmt = lambda v: "–" if v is None else f"{v:,.2f}"  # noqa: E731
            lines.append(f"| {name} | {fmt(values['minitron'])} | {fmt(values['aiperf'])} | "
                         f"{'–' if diff is None else f'{diff:+.1%}'}{flag} |")
        harness = row["harness"]
        lines += ["", f"Harness overhead (its own code per token, measured): {harness['seconds_per_token'] * 1e6:.1f} µs, "
                      f"{harness['fraction_of_itl']:.3%} of the mean ITL.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
