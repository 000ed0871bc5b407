"""The `minitron` command itself: the subcommand table, and interruption leaving nothing half-written."""

import os
import signal
import subprocess
import sys
import time

from toolchain.cli import COMMANDS


def test_help_lists_every_stage(cli):
    result = cli("--help")
    assert result.returncode == 0
    for name in ("prune", "distill", "eval", "quantize", "export", "build", "serve", "generate", "bench", "run"):
        assert name in COMMANDS and name in result.stdout


def test_unknown_subcommand_exit_2(cli):
    result = cli("shrink")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_sigterm_removes_the_temporary_output(make_tiny_model, tmp_path):
    model = make_tiny_model(max_position_embeddings=2048)
    out = tmp_path / "engine"
    process = subprocess.Popen([sys.executable, "-m", "toolchain", "build", "--profile", "cpu-fp32", "--model", str(model), "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".engine.tmp-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the build finished before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted" in stderr
    assert not out.exists() and not list(tmp_path.glob(".engine.tmp-*"))
