"""Bad input across the CLI, as a new user types it: one line naming the problem and the fix, exit 2, no traceback,
and nothing the user had on disk changed (outputs, previous runs, unrelated files: byte for byte).

Every case is a real `python -m toolchain ...` subprocess. The cases run concurrently (most fail before any model
loads, so their cost is the import), and one report lists every case that misbehaved.
"""

import hashlib
import json
import re
import shutil
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, save_tiny_model, write_engine_manifest


@dataclass
class Case:
    name: str
    args: list
    message: str
    env: dict = field(default_factory=dict)
    keep: list = field(default_factory=list)  # paths (files or folders) that must come out byte-identical


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path.parent)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir, corpus_jsonl):
    """Models, a previous run, a user's folder and files, a fake engine: what a user's disk holds before the bad command."""
    root = tmp_path_factory.mktemp("bad-input")
    model = save_tiny_model(root / "model", tokenizer_dir)
    (root / "notes.txt").write_text("the user's notes\n")
    user_folder = root / "user-folder"
    user_folder.mkdir()
    (user_folder / "thesis.txt").write_text("unrelated and precious\n")
    previous_run = root / "previous-run"  # what `minitron run` or `minitron distill` left: a finished output
    previous_run.mkdir()
    (previous_run / "run.json").write_text(json.dumps({"toolchain": "0.1.0", "recipe": "tiny"}))
    (previous_run / "summary.md").write_text("# results of an hour\n")
    shutil.copytree(model, previous_run / "model")

    more_layers = save_tiny_model(root / "more-layers", tokenizer_dir)  # config says 6 layers, weights hold 4
    config = json.loads((more_layers / "config.json").read_text())
    (more_layers / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 6}))
    no_layer_count = save_tiny_model(root / "no-layer-count", tokenizer_dir)
    config.pop("num_hidden_layers")
    (no_layer_count / "config.json").write_text(json.dumps(config))
    list_config = save_tiny_model(root / "list-config", tokenizer_dir)
    (list_config / "config.json").write_text("[1, 2, 3]")

    engine = root / "engine"  # an engine directory as `minitron build` writes it (the engine itself is not needed to refuse)
    for part in ("engine", "tokenizer"):
        (engine / part).mkdir(parents=True)
    write_engine_manifest(engine, "cpu-fp32", "onnxruntime-genai", "engine")
    used_repository = root / "used-repository"
    used_repository.mkdir()
    (used_repository / "mine.txt").write_text("keep\n")

    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny", "output_dir": str(root / "runs" / "tiny"), "teacher": {"model": str(model)},
        "compute": {"dtype": "float32", "device": "cpu"}, "data": {"spec": str(corpus_jsonl), "seq_len": 32},
        "students": [{"name": "width", "prune": {"ffn_hidden_size": 64}}], "distill": {"steps": 1}, "engine": {"profile": None},
    }))
    broken_recipe = root / "broken.yaml"
    broken_recipe.write_text("name: broken\nstudents:\n  - name: a\n    prune: {num_layers: 2\n")
    return {"root": root, "model": model, "corpus": corpus_jsonl, "notes": root / "notes.txt", "user_folder": user_folder,
            "previous_run": previous_run, "more_layers": more_layers, "no_layer_count": no_layer_count, "list_config": list_config,
            "engine": engine, "used_repository": used_repository, "recipe": recipe, "broken_recipe": broken_recipe}


@pytest.fixture(scope="module")
def http2_port():
    """A port that answers like a gRPC server (HTTP/2 SETTINGS frame, then close), as `generate --protocol http` meets it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def answer():
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                connection.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")

    threading.Thread(target=answer, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cases(w: dict, http2_port: int) -> list[Case]:
    model, corpus, root = w["model"], w["corpus"], w["root"]
    data = ["--data", corpus, "--seq-len", "32"]
    unwritable = "/proc/minitron-bad-input/out"  # refuses new files even for root
    below_file = w["notes"] / "out"
    return [
        # data loss: nothing of the user's is touched, and a bad command is refused before anything is deleted
        Case("run into a user's folder", ["run", w["recipe"], "--out", w["user_folder"]], "holds no run of this toolchain", keep=[w["user_folder"]]),
        Case("run with a target larger than the model over a finished run", ["run", w["recipe"], "--out", w["previous_run"],
             "--set", "students.width.prune.ffn_hidden_size=4096"], "students.width.prune.ffn_hidden_size 4096 is larger than the model's 128",
             keep=[w["previous_run"]]),
        Case("distill --overwrite with a bad count over a finished run", ["distill", "--teacher", model, "--student", model, "--out",
             w["previous_run"], "--overwrite", "--steps", "1", "--eval-batches", "-1", *data], "invalid --eval-batches", keep=[w["previous_run"]]),
        *(Case(f"{command} --out naming a file{' with --overwrite' * over}", [command, *args, "--out", w["notes"], *(["--overwrite"] * over)],
               "is a file; name a directory", keep=[w["notes"]])
          for command, args in (("prune", ["--model", model, "--ffn-hidden-size", "64", *data]),
                                ("build", ["--profile", "cpu-fp32", "--model", model]),
                                ("export", [model, "--format", "hf"]),
                                ("quantize", [model, "--format", "fp8", *data]),
                                ("distill", ["--teacher", model, "--student", model, "--steps", "1", *data]),
                                ("finetune", ["--model", model, "--steps", "1", *data]))
          for over in (False, True)),
        Case("a corrupt config: more layers than the weights hold", ["eval", w["more_layers"], *data],
             "do not match its config.json: tensors 18 missing"),
        Case("a config without num_hidden_layers", ["eval", w["no_layer_count"], *data], "lacks num_hidden_layers"),
        Case("a config.json that is a JSON list", ["eval", w["list_config"], *data], "holds a JSON list, not an object"),
        Case("prune without a target", ["prune", "--model", model, "--out", root / "p", *data], "no pruning target: set at least one of --hidden-size"),
        Case("bench with every request failing", ["bench", f"127.0.0.1:{closed_port()}", "--tokenizer", model, "--data", corpus,
             "--input-len", "8", "--output-len", "2", "--requests", "2", "--concurrency", "1"], "2 of 2 requests to"),
        # output locations that cannot be written: refused before any work
        *(Case(f"{command} --out in a directory that refuses files", [command, *args, "--out", unwritable], "refuses new files")
          for command, args in (("prune", ["--model", model, "--ffn-hidden-size", "64", *data]), ("export", [model, "--format", "hf"]),
                                ("build", ["--profile", "cpu-fp32", "--model", model]),
                                ("distill", ["--teacher", model, "--student", model, "--steps", "1", *data]),
                                ("run", [w["recipe"]]),
                                ("bench", [f"127.0.0.1:{closed_port()}", "--tokenizer", model, "--data", corpus]))),
        Case("--out below a file", ["export", model, "--format", "hf", "--out", below_file], "lies below", keep=[w["notes"]]),
        Case("MINITRON_CACHE is a file", ["eval", model, *data], "MINITRON_CACHE", env={"MINITRON_CACHE": str(w["notes"])}, keep=[w["notes"]]),
        # counts, validated where they are declared
        Case("eval batch size 0", ["eval", model, *data, "--eval-batch-size", "0"], "invalid --eval-batch-size: Input should be greater than 0"),
        Case("eval batches -1", ["eval", model, *data, "--eval-batches", "-1"], "invalid --eval-batches"),
        Case("eval batches 0 evaluates nothing", ["eval", model, *data, "--eval-batches", "0"], "nothing was evaluated (--eval-batches 0)"),
        Case("quantize eval batches -1", ["quantize", model, "--format", "fp8", "--out", root / "q", "--eval-batches", "-1"], "invalid --eval-batches"),
        Case("finetune eval batches -1", ["finetune", "--model", model, "--out", root / "f", "--steps", "1", "--eval-batches", "-1"], "invalid --eval-batches"),
        Case("a negative learning rate", ["distill", "--teacher", model, "--student", model, "--out", root / "d", "--steps", "1", "--lr", "-1e-4"],
             "invalid --lr: Input should be greater than 0"),
        Case("prune calibration samples 0", ["prune", "--model", model, "--out", root / "p", "--ffn-hidden-size", "64", "--calibration-samples", "0"],
             "invalid --calibration-samples"),
        Case("serve a port above 65535", ["serve", "--engine", w["engine"], "--grpc-port", "70000"], "invalid --grpc-port"),
        Case("serve on an address that is not this machine's", ["serve", "--engine", w["engine"], "--host", "999.1.1.1"], "cannot bind --host 999.1.1.1"),
        Case("generate over http at a gRPC port", ["generate", "--url", f"127.0.0.1:{http2_port}", "--protocol", "http", "--prompt", "hi"],
             "--protocol grpc"),
        Case("generate at a port nothing listens on", ["generate", "--url", f"127.0.0.1:{closed_port()}", "--prompt", "hi"], "is the server running"),
        # hints that name what the user can actually do
        Case("serve --repo-only on a used folder", ["serve", "--engine", w["engine"], "--repo-only", w["used_repository"]], "new or empty directory",
             keep=[w["used_repository"]]),
        Case("validate-checkpoint on a Hugging Face folder", ["validate-checkpoint", model], "is a Hugging Face checkpoint"),
        Case("a recipe whose YAML is broken", ["validate", w["broken_recipe"]], "not valid YAML at line 5, column 1"),
        Case("a recipe whose teacher does not exist", ["validate", w["recipe"], "--teacher", root / "missing"], "neither a directory nor a built-in model"),
        Case("run has no --overwrite", ["run", w["recipe"], "--overwrite"], "unrecognized arguments: --overwrite"),
    ]


def run_case(case: Case) -> str | None:
    """None if the case behaved; otherwise what went wrong."""
    before = {path: tree_digest(Path(path)) for path in case.keep}
    result = run_cli(*case.args, env=case.env, timeout=300)
    # progress log lines (INFO ...) may precede the error; the error itself must be one line
    lines = [line for line in result.stderr.strip().splitlines() if not re.match(r"(INFO|DEBUG) [\w.]+: ", line)]
    problems = []
    if result.returncode != 2:
        problems.append(f"exit {result.returncode}")
    if "Traceback" in result.stderr:
        problems.append("a traceback")
    if case.message not in result.stderr:
        problems.append(f"no {case.message!r}")
    if len(lines) > 2:
        problems.append(f"{len(lines)} lines")
    problems += [f"{path} changed" for path, digest in before.items() if tree_digest(Path(path)) != digest]
    return f"{case.name}: {', '.join(problems)}; stderr: {result.stderr.strip()[-400:]!r}" if problems else None


@pytest.mark.slow
def test_every_bad_input_is_one_line_exit_2_and_loses_nothing(world, http2_port):
    all_cases = cases(world, http2_port)
    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [failure for failure in pool.map(run_case, all_cases) if failure]
    assert not failures, "\n".join(failures)
    assert not (world["root"] / "runs").exists() and not list(world["root"].glob(".*.tmp-*"))
