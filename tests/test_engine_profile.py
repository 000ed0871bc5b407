"""Engine profiles: every shipped one loads (also from a wheel install, with the benchmark workloads); self-contradicting ones are refused with the reason."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from toolchain.engine_profile import PROFILES_DIR, load_profile, shipped_profile_names
from toolchain.errors import UserError

REQUIRED = {"h100-fp8": ("tensorrt-llm", "H100", "fp8"), "h200-fp8": ("tensorrt-llm", "H200", "fp8"),
            "a100-bf16": ("tensorrt-llm", "A100", "none"), "l40s-fp8": ("tensorrt-llm", "L40S", "fp8"),
            "l4-int4-awq": ("tensorrt-llm", "L4", "int4_awq"), "cpu-fp32": ("onnxruntime-genai", "cpu", "none"),
            "cpu-int4": ("onnxruntime-genai", "cpu", "int4_rtn")}


@pytest.mark.parametrize("name", shipped_profile_names())
def test_every_shipped_profile_loads_by_name_and_path(name):
    profile = load_profile(name)
    assert profile.name == name
    assert load_profile(PROFILES_DIR / f"{name}.yaml") == profile
    assert profile.contradictions() == []


def test_required_profiles_are_shipped():
    for name, (backend, target, quantization) in REQUIRED.items():
        profile = load_profile(name)
        assert (profile.backend, profile.target, profile.quantization) == (backend, target, quantization)


# Data-sheet figures of the GPU profiles (dense Tensor Core peaks), as checked against NVIDIA's data sheets (REFERENCE §9).
DATA_SHEETS = {"h100-fp8": (80, 3350, {"bfloat16": 989, "fp8": 1979}), "h200-fp8": (141, 4800, {"bfloat16": 989, "fp8": 1979}),
               "a100-bf16": (80, 2039, {"bfloat16": 312}), "l40s-fp8": (48, 864, {"bfloat16": 362.05, "fp8": 733}),
               "l4-int4-awq": (24, 300, {"float16": 121, "fp8": 242.5})}


def test_gpu_profiles_carry_their_data_sheets():
    for name, (memory, bandwidth, peaks) in DATA_SHEETS.items():
        device = load_profile(name).device
        assert (device.memory_gb, device.memory_bandwidth_gb_s) == (memory, bandwidth) and "data sheet" in device.source
        assert {precision: device.dense_tflops[precision] for precision in peaks} == peaks
    assert load_profile("cpu-fp32").device is None


GPU_BASE = yaml.safe_load((PROFILES_DIR / "h100-fp8.yaml").read_text())
CPU_BASE = yaml.safe_load((PROFILES_DIR / "cpu-fp32.yaml").read_text())


def changed(base: dict, **changes) -> dict:
    data = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            data[section][field] = value
        else:
            data[key] = value
    return data


@pytest.mark.parametrize("data, reason", [
    (changed(GPU_BASE, max_input_len=9000), "max_input_len 9000 > max_seq_len 8192"),
    (changed(GPU_BASE, target="A100"), "FP8 on A100"),
    (changed(GPU_BASE, target="A100", quantization="int8_sq", kv_cache__dtype="fp8", plugins__use_fp8_context_fmha=False), "FP8 on A100"),
    (changed(GPU_BASE, target="TPUv5"), "unknown GPU target 'TPUv5'"),
    (changed(GPU_BASE, dtype="float32"), "dtype float32 on tensorrt-llm"),
    (changed(GPU_BASE, quantization="int4_rtn"), "quantization int4_rtn is not a TensorRT-LLM format"),
    (changed(GPU_BASE, quantization="none", plugins__use_fp8_context_fmha=False), "kv_cache.dtype fp8 is calibrated together"),
    (changed(GPU_BASE, max_num_tokens=None), "max_num_tokens is required"),
    (changed(GPU_BASE, kv_cache__type="continuous"), "use_paged_context_fmha needs context_fmha and a paged KV cache"),
    (changed(GPU_BASE, plugins__gpt_attention_plugin="disable"), "paged KV cache needs the gpt_attention_plugin"),
    (changed(GPU_BASE, kv_cache__tokens_per_block=48), "tokens_per_block 48 is not a power of two"),
    (changed(GPU_BASE, plugins__use_paged_context_fmha=False, plugins__use_fp8_context_fmha=False), "KV block reuse needs"),
    (changed(CPU_BASE, tp=2), "tp=2, pp=1 on a CPU engine"),
    (changed(CPU_BASE, target="H100"), "builds CPU engines, but target is 'H100'"),
    (changed(CPU_BASE, quantization="fp8"), "quantization fp8 is not an onnxruntime-genai format"),
    (changed(CPU_BASE, backend="openvino"), "backend: unknown backend 'openvino'; use one of tensorrt-llm, onnxruntime-genai"),
    (changed(CPU_BASE, dtype="bfloat16"), "dtype bfloat16 on CPU"),
    (changed(CPU_BASE, max_input_len=4096), "max_input_len 4096 > max_seq_len 2048"),
    (changed(CPU_BASE, max_batch_sise=4), "max_batch_sise: Extra inputs are not permitted"),
    ({k: v for k, v in GPU_BASE.items() if k != "device"}, "device is required for a H100 profile"),
    (changed(CPU_BASE, device=GPU_BASE["device"]), "a cpu profile takes no data-sheet figures"),
    (changed(GPU_BASE, device={**GPU_BASE["device"], "dense_tflops": {"bfloat16": 989}}), "device.dense_tflops lists no fp8 peak"),
    (changed(GPU_BASE, device={**GPU_BASE["device"], "dense_tflops": {"fp4": 10}}), "Input should be 'float16', 'bfloat16', 'fp8' or 'int8'"),
    (changed(GPU_BASE, device={**GPU_BASE["device"], "memory_bandwidth_gb_s": 0}), "memory_bandwidth_gb_s: Input should be greater than 0"),
    (changed(GPU_BASE, device={k: v for k, v in GPU_BASE["device"].items() if k != "source"}), "source: Field required"),
])
def test_contradicting_profiles_are_refused(tmp_path, data, reason):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match="invalid engine profile") as caught:
        load_profile(path)
    assert reason in str(caught.value) and "\n" not in str(caught.value)


def test_unknown_profile_names_and_files(tmp_path):
    with pytest.raises(UserError, match="unknown engine profile 'h900-fp4'.*h100-fp8"):
        load_profile("h900-fp4")
    with pytest.raises(UserError, match="does not exist"):
        load_profile(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must be a YAML mapping"):
        load_profile(tmp_path / "list.yaml")


def test_overrides_change_any_field_and_are_validated():
    profile = load_profile("h100-fp8", {"max_batch_size": 2, "kv_cache.dtype": "auto", "plugins.use_fp8_context_fmha": False})
    assert (profile.max_batch_size, profile.kv_cache.dtype, profile.plugins.use_fp8_context_fmha) == (2, "auto", False)
    assert profile.kv_cache.tokens_per_block == load_profile("h100-fp8").kv_cache.tokens_per_block  # the rest of the section stays
    assert load_profile("cpu-fp32", {"cpu_threads": 3}).cpu_threads == 3


@pytest.mark.parametrize("overrides, message", [
    ({"max_batch_size": 0}, "invalid engine profile cpu-fp32: profile.max_batch_size: Input should be greater than 0"),
    ({"kv_cache.dtype": "fp4"}, "profile.kv_cache.dtype: Input should be 'auto' or 'fp8'"),
    ({"max_batch_sise": 2}, "profile.max_batch_sise: Extra inputs are not permitted"),
    ({"max_batch_size.limit": 2}, "override max_batch_size.limit: max_batch_size is not a section"),
    ({"tp": 2}, "tp=2, pp=1 on a CPU engine"),
])
def test_bad_overrides_are_one_line_errors_naming_the_field(overrides, message):
    with pytest.raises(UserError) as caught:
        load_profile("cpu-fp32", overrides)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_profile_fields_are_flags_of_build_and_fields_of_a_recipe(make_tiny_model, cli, tmp_path):
    model = make_tiny_model(max_position_embeddings=2048)
    plan = cli("build", "--profile", "cpu-fp32", "--model", model, "--out", tmp_path / "e", "--dry-run", "--max-batch-size", "2", "--json")
    assert plan.returncode == 0, plan.stderr
    bad = cli("build", "--profile", "cpu-fp32", "--model", model, "--out", tmp_path / "e", "--dry-run", "--max-seq-len", "0")
    assert bad.returncode == 2 and "invalid engine profile cpu-fp32: --max-seq-len: Input should be greater than 0" in bad.stderr
    nested = cli("build", "--profile", "h100-fp8", "--model", model, "--out", tmp_path / "e", "--dry-run", "--kv-cache-tokens-per-block", "0")
    assert nested.returncode == 2 and "--kv-cache-tokens-per-block: Input should be greater than 0" in nested.stderr
    recipe = cli("validate", "smollm2-135m-minitron", "--teacher", model, "--set", "students=[]", "--set", "engine.overrides={max_batch_size: 0}")
    assert recipe.returncode == 2 and "engine.overrides.max_batch_size: Input should be greater than 0" in recipe.stderr


@pytest.mark.slow
def test_a_wheel_install_finds_the_shipped_profiles_and_workloads(tmp_path, tiny_model):
    """Build a wheel, install it (no dependencies) into a fresh venv; plan a build and project a shipped workload there, away from any checkout."""
    repository = Path(__file__).resolve().parent.parent
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repository / name, source)
    for name in ("engines", "benchmarks/workloads", "toolchain"):  # toolchain/engines and toolchain/workloads stay links, as in the repository
        shutil.copytree(repository / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    run = lambda *args, **kwargs: subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)  # noqa: E731
    wheel = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path / "dist", source)
    assert wheel.returncode == 0, wheel.stderr
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", "--without-pip", venv).returncode == 0
    install = run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index",
                  *(tmp_path / "dist").glob("*.whl"))
    assert install.returncode == 0, install.stderr
    # torch & co. from this environment's site-packages; PYTHONPATH does not run its .pth files, so no checkout is importable
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    where = run(venv / "bin" / "python", "-c", "import toolchain; print(toolchain.__file__)", env=env, cwd=tmp_path)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    plan = run(venv / "bin" / "minitron", "build", "--profile", "cpu-fp32", "--model", tiny_model, "--out", tmp_path / "engine",
               "--dry-run", env=env, cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "profile cpu-fp32 (onnxruntime-genai, cpu)" in plan.stdout and not (tmp_path / "engine").exists()
    projection = run(venv / "bin" / "minitron", "bench", "--project", "--workload", "gpu-128-2048", "--profile", "h200-fp8",
                     "--teacher", tiny_model, "--student", tiny_model, "--labels", "a,b", env=env, cwd=tmp_path)
    assert projection.returncode == 0, projection.stderr
    assert "at 128 prompt / 2048 new tokens" in projection.stdout and "| h200-fp8 | b |" in projection.stdout
