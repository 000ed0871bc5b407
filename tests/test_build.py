"""`minitron build`: TensorRT-LLM profiles stop at a validated checkpoint + exact build command; CPU profiles build and run."""

import json
import shlex
import subprocess

import pytest
import yaml

from toolchain.backends.tensorrt_llm import check_engine_dir, finish_trtllm_build, trtllm_build_command
from toolchain.build import build
from toolchain.engine_profile import PROFILES_DIR, load_profile, shipped_profile_names
from toolchain.errors import UserError
from toolchain.manifest import read_manifest
from toolchain.paths import current_umask
from toolchain.settings import DataConfig
from toolchain.trtllm_checkpoint import validate_checkpoint

# Tiny model every shipped profile accepts: INT4-AWQ-able widths, a context as long as the largest profile's.
PROFILE_READY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                     max_position_embeddings=16384)


def write_profile(tmp_path, base: str, **changes):
    data = yaml.safe_load((PROFILES_DIR / f"{base}.yaml").read_text())
    data.update(changes, name=f"test-{base}")
    path = tmp_path / f"test-{base}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", shipped_profile_names())
def test_every_shipped_profile_plans_on_a_model_it_fits(make_tiny_model, tmp_path, name):
    result = build(load_profile(name), str(make_tiny_model(**PROFILE_READY)), tmp_path / "engine", DataConfig(), dry_run=True)
    assert result.dry_run and not result.built and not (tmp_path / "engine").exists()
    if load_profile(name).backend == "tensorrt-llm":
        assert result.command.startswith("trtllm-build --checkpoint_dir checkpoint --output_dir engine")


def test_trtllm_profile_writes_checkpoint_command_and_manifest(make_tiny_model, corpus_jsonl, tmp_path, cli):
    model = make_tiny_model(**PROFILE_READY)
    profile = write_profile(tmp_path, "h100-fp8", tp=2, max_batch_size=4, max_input_len=512, max_seq_len=1024, max_num_tokens=1024,
                            calibration_samples=4)
    out = tmp_path / "engine"
    result = cli("build", "--profile", profile, "--model", model, "--out", out, "--data", corpus_jsonl, "--seq-len", "64")
    assert result.returncode == 0, result.stderr
    assert "engine NOT built" in result.stdout and "tensorrt_llm is not installed" in result.stdout and "docker/" in result.stdout

    report = validate_checkpoint(out / "checkpoint", json.loads((model / "config.json").read_text()))
    assert (report.quant_algo, report.kv_cache_quant_algo, report.tp, report.dtype) == ("FP8", "FP8", 2, "bfloat16")

    script = (out / "build.sh").read_text()
    assert subprocess.run(["bash", "-n", out / "build.sh"]).returncode == 0
    command = shlex.split(script.strip().splitlines()[-1])
    flags = dict(zip(command[1::2], command[2::2]))
    assert command[0] == "trtllm-build" and flags["--checkpoint_dir"] == "checkpoint" and flags["--output_dir"] == "engine"
    assert (flags["--max_batch_size"], flags["--max_input_len"], flags["--max_seq_len"], flags["--max_num_tokens"]) == ("4", "512", "1024", "1024")
    assert (flags["--use_fp8_context_fmha"], flags["--kv_cache_type"], flags["--workers"]) == ("enable", "paged", "2")
    build_config = json.loads((out / "build_config.json").read_text())
    assert build_config["trtllm_build"] == command and build_config["runtime"]["kv_cache_free_gpu_mem_fraction"] == 0.9

    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["backend"], manifest["built"], manifest["model_dir"], manifest["profile"]["tp"]) == ("tensorrt-llm", False, "engine", 2)
    assert (out / "tokenizer" / "tokenizer.json").is_file()

    # What docker/build_and_serve.sh does after build.sh ran on a GPU machine: check the engine, mark it built.
    with pytest.raises(UserError, match="lacks engine/"):
        finish_trtllm_build(out)
    (out / "engine").mkdir()
    (out / "engine" / "config.json").write_text(json.dumps({"pretrained_config": {}, "build_config": {}}))
    (out / "engine" / "rank0.engine").write_bytes(b"plan")
    with pytest.raises(UserError, match="lacks rank1.engine"):
        finish_trtllm_build(out)
    (out / "engine" / "rank1.engine").write_bytes(b"plan")
    finish_trtllm_build(out)
    assert read_manifest(out).built and read_manifest(out).source_fingerprint == manifest["source_fingerprint"]


def test_build_command_follows_the_profile():
    profile = load_profile("a100-bf16").model_copy(update={"tp": 2, "pp": 2})
    command = trtllm_build_command(profile)
    assert command[command.index("--workers") + 1] == "4"
    assert command[command.index("--use_fp8_context_fmha") + 1] == "disable"


def test_engine_dir_check(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"version": "1.2.1", "pretrained_config": {}, "build_config": {}}))
    (tmp_path / "rank0.engine").write_bytes(b"x")
    check_engine_dir(tmp_path, world_size=1)
    with pytest.raises(UserError, match="lacks rank1.engine"):
        check_engine_dir(tmp_path, world_size=2)
    (tmp_path / "config.json").write_text(json.dumps({"pretrained_config": {}}))
    with pytest.raises(UserError, match="lacks build_config"):
        check_engine_dir(tmp_path, world_size=1)


@pytest.mark.slow
@pytest.mark.parametrize("profile, context, limits, own_limits", [
    ("cpu-fp32", 2048, (2048, 1024), None),
    ("cpu-int4", 256, (256, 128), {"max_seq_len": 2048, "max_input_len": 1024}),  # a model shorter than the profile: fitted
])
def test_cpu_profile_builds_a_runnable_engine(make_tiny_model, tmp_path, profile, context, limits, own_limits):
    model = make_tiny_model(max_position_embeddings=context)
    out = tmp_path / "engine"
    result = build(load_profile(profile), str(model), out, DataConfig())
    assert result.built and result.smoke_text is not None
    manifest = read_manifest(out)
    assert (manifest.backend, manifest.model_dir, manifest.smoke_text) == ("onnxruntime-genai", "engine", result.smoke_text)
    assert (manifest.max_seq_len, manifest.max_input_len) == limits == (manifest.profile["max_seq_len"], manifest.profile["max_input_len"])
    assert manifest.profile_limits == own_limits
    assert (out / "engine" / "genai_config.json").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine", "model"]  # no temporary directories left
    assert out.stat().st_mode & 0o777 == 0o777 & ~current_umask()


def test_a_profile_longer_than_the_model_is_fitted_to_it(make_tiny_model, tmp_path, cli):
    profile = write_profile(tmp_path, "a100-bf16", max_input_len=1024, max_seq_len=4096, max_num_tokens=2048)
    result = cli("build", "--profile", profile, "--model", make_tiny_model(), "--out", tmp_path / "engine", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "max_seq_len 4096 -> 256 (the model's max_position_embeddings) and max_input_len 1024 -> 64" in result.stderr
    assert "limits fitted to the model: max_seq_len 4096 -> 256, max_input_len 1024 -> 64" in result.stdout
    assert "--max_input_len 64 --max_seq_len 256 --max_num_tokens 2048" in result.stdout
    assert not (tmp_path / "engine").exists()


@pytest.mark.parametrize("profile_changes, args, message", [
    (None, ["--profile", "h900"], "unknown engine profile 'h900'"),
    ({"tp": 3, "max_num_tokens": 256, "max_input_len": 128, "max_seq_len": 256}, [], "tp=3 does not divide the 4 attention heads"),
    ({"max_input_len": 512, "max_seq_len": 256}, [], "max_input_len 512 > max_seq_len 256"),
    ({"max_input_len": 128, "max_seq_len": 256, "max_num_tokens": 256}, ["--out", "file"], "is a file; name a directory"),
    ({"max_input_len": 128, "max_seq_len": 256, "max_num_tokens": 256}, ["--out", "file/engine"], "lies below"),
])
def test_bad_builds_are_one_line_errors_and_write_nothing(make_tiny_model, tmp_path, cli, profile_changes, args, message):
    model = make_tiny_model()
    (tmp_path / "file").write_text("keep")
    profile = ["--profile", write_profile(tmp_path, "a100-bf16", **profile_changes)] if profile_changes else []
    args = [str(tmp_path / arg) if arg.startswith("file") else arg for arg in args]
    result = cli("build", "--model", model, "--out", tmp_path / "engine", *profile, *args)
    assert result.returncode == 2 and message in result.stderr and result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "engine").exists() and not any(p.name.startswith((".engine", ".file")) for p in tmp_path.iterdir())
    assert (tmp_path / "file").read_text() == "keep"


def test_int4_awq_profile_on_narrow_model_is_refused(make_tiny_model, tmp_path, cli):
    profile = write_profile(tmp_path, "l4-int4-awq", max_input_len=128, max_seq_len=256, max_num_tokens=256)
    result = cli("build", "--profile", profile, "--model", make_tiny_model(), "--out", tmp_path / "engine")
    assert result.returncode == 2 and "INT4-AWQ needs every Linear's in_features to be a multiple of 128" in result.stderr
    assert not (tmp_path / "engine").exists()


def test_refuses_non_empty_out(make_tiny_model, tmp_path, cli):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "keep").write_text("x")
    result = cli("build", "--profile", "cpu-fp32", "--model", make_tiny_model(max_position_embeddings=2048), "--out", out, "--dry-run")
    assert result.returncode == 2 and "not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep"]
