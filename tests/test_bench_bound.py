"""The physical bound and the GPU projection on known configs: Llama-3.1-8B against the published 4B-Width/4B-Depth shapes (toolchain/bench/bound.py, projection.py)."""

import json
import math
import shutil
from pathlib import Path

import pytest
from transformers import AutoConfig

from toolchain.bench.bound import Cost, Device, ModelCost, decode_bound, load_point_bound, measure_cpu, precision_of
from toolchain.bench.projection import profile_device, project
from toolchain.engine_profile import load_profile

CONFIGS = Path(__file__).resolve().parent.parent / "benchmarks" / "configs"
HEAD_8B, HEAD_WIDTH = 128256 * 4096, 128256 * 3072
LAYERS_8B, LAYERS_WIDTH, LAYERS_DEPTH = 6_979_588_096, 3_724_741_632, 3_489_796_096  # non-embedding parameters


@pytest.fixture(scope="module")
def configs():
    return {name: AutoConfig.from_pretrained(CONFIGS / folder) for name, folder in
            (("8B", "llama-3.1-8b"), ("4B-Width", "llama-3.1-minitron-4b-width"), ("4B-Depth", "llama-3.1-minitron-4b-depth"))}


def test_precisions():
    bf16 = precision_of("bfloat16")
    assert (bf16.linear_bytes, bf16.head_bytes, bf16.kv_bytes, bf16.compute) == (2, 2, 2, "bfloat16")
    fp8 = precision_of("bfloat16", "fp8", "fp8")
    assert (fp8.linear_bytes, fp8.head_bytes, fp8.kv_bytes, fp8.compute) == (1, 2, 1, "fp8")  # ModelOpt keeps the lm_head in bf16
    awq = precision_of("float16", "int4_awq")
    assert awq.linear_bytes == pytest.approx(0.5 + 2 / 128) and awq.compute == "float16" and awq.kv_bytes == 2
    assert precision_of("float32", "int4_rtn").head_bytes == pytest.approx(0.625)  # onnxruntime-genai quantizes the lm_head too
    assert precision_of("bfloat16", "int8_sq").compute == "int8"


def test_bytes_and_kv_per_token_of_the_published_shapes(configs):
    costs = {name: ModelCost.from_config(config, precision_of("bfloat16")) for name, config in configs.items()}
    assert costs["8B"].weight_bytes_read == (LAYERS_8B + HEAD_8B) * 2  # 15.0 GB: every layer and the lm_head, not the embedding table
    assert costs["8B"].weight_bytes_stored == 8_030_261_248 * 2
    assert costs["4B-Width"].weight_bytes_read == (LAYERS_WIDTH + HEAD_WIDTH) * 2
    assert costs["4B-Depth"].weight_bytes_read == (LAYERS_DEPTH + HEAD_8B) * 2
    assert costs["8B"].kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131_072
    assert costs["4B-Width"].kv_bytes_per_token == 131_072  # width pruning keeps every layer and KV head
    assert costs["4B-Depth"].kv_bytes_per_token == 65_536  # depth pruning halves the KV cache
    step = costs["8B"].decode_step(batch=4, context=1000)
    assert step.bytes == (LAYERS_8B + HEAD_8B) * 2 + 4 * 1001 * 131_072
    assert step.flops == 4 * (2 * (LAYERS_8B + HEAD_8B) + 4 * 32 * 4096 * 1000)
    prefill = costs["8B"].prefill(128)
    assert prefill.flops == 2 * LAYERS_8B * 128 + 2 * HEAD_8B + 2 * 32 * 4096 * 128 ** 2  # logits of the last token only
    fp8 = {name: ModelCost.from_config(config, precision_of("bfloat16", "fp8", "fp8")) for name, config in configs.items()}
    assert fp8["8B"].weight_bytes_read == LAYERS_8B + 2 * HEAD_8B and fp8["8B"].kv_bytes_per_token == 65_536
    # bytes per token at batch 1: the students' bound on CPU-like, bandwidth-bound decoding
    ratio = lambda a, b: costs[a].decode_step(1, 256).bytes / costs[b].decode_step(1, 256).bytes  # noqa: E731
    kv = 257 * 131_072
    assert ratio("8B", "4B-Width") == ((LAYERS_8B + HEAD_8B) * 2 + kv) / ((LAYERS_WIDTH + HEAD_WIDTH) * 2 + kv) == pytest.approx(1.819, abs=1e-3)
    assert ratio("8B", "4B-Depth") == ((LAYERS_8B + HEAD_8B) * 2 + kv) / ((LAYERS_DEPTH + HEAD_8B) * 2 + kv / 2) == pytest.approx(1.869, abs=1e-3)


def test_roofline_takes_the_slower_of_bytes_and_flops():
    device = Device("toy", bandwidth=100.0, peak_flops={"float32": 1000.0}, memory=None, source="test")
    assert device.seconds(Cost(bytes=50, flops=100), "float32") == 0.5 and device.bound_by(Cost(50, 100), "float32") == "bandwidth"
    assert device.seconds(Cost(bytes=50, flops=2000), "float32") == 2.0 and device.bound_by(Cost(50, 2000), "float32") == "compute"
    with pytest.raises(ValueError, match="has no fp8 peak"):
        device.seconds(Cost(1, 1), "fp8")


def test_decode_bound_at_a_load_point(configs):
    cost = ModelCost.from_config(configs["8B"], precision_of("float32"))
    device = Device("cpu", bandwidth=20e9, peak_flops={"float32": 100e9}, memory=None, source="test")
    bound = decode_bound(cost, device, batch=1.4, context=192)
    step = cost.decode_step(1, 192)
    assert bound["batch"] == 1 and bound["bytes_per_token"] == step.bytes
    assert bound["tokens_per_s"] == pytest.approx(20e9 / step.bytes) and bound["bound_by"] == "bandwidth"


def test_load_point_bound_takes_the_decoding_requests_as_the_batch(configs):
    """Two clients of an engine that decodes one request at a time: two in flight, one decoding; the bound is batch 1's."""
    cost = ModelCost.from_config(configs["8B"], precision_of("float32"))
    device = Device("cpu", bandwidth=20e9, peak_flops={"float32": 100e9}, memory=None, source="test")
    point = {"itl_ms": {"mean": 2000.0}, "mean_in_flight": 1.95, "mean_decoding": 0.98, "input_tokens_per_request": 128,
             "output_tokens_per_request": 128}
    bound = load_point_bound(cost, device, point, max_batch=8)
    assert bound["batch"] == 1 and bound["decode_tokens_per_s"] == pytest.approx(0.5)
    assert bound["fraction"] == pytest.approx(0.5 / decode_bound(cost, device, 1, 192)["tokens_per_s"])
    assert load_point_bound(cost, device, {**point, "mean_decoding": 6.8}, max_batch=4)["batch"] == 4  # at most the engine's batch


def test_projection_onto_h100_fp8(configs):
    profile = load_profile("h100-fp8")
    device = profile_device(profile)
    assert (device.bandwidth, device.peak_flops["fp8"], device.memory) == (3.35e12, 1979e12, 80e9)
    result = project(configs, [profile], 128, 128, [1, 64])
    assert result["label"].startswith("projected")
    rows = result["profiles"]["h100-fp8"]["models"]
    teacher = rows["8B"]
    read = LAYERS_8B + 2 * HEAD_8B
    assert teacher["batch1_decode_tokens_per_s"] == pytest.approx(3.35e12 / (read + 193 * 65_536))  # context 128 + 128/2
    assert teacher["batch1_decode_bound_by"] == "bandwidth"
    stored = read + 2 * HEAD_8B  # the embedding table stays bf16 in memory
    assert teacher["max_batch"] == math.floor((80e9 - stored) * 0.9 / (65_536 * 256))
    assert rows["4B-Depth"]["max_batch"] == pytest.approx(2 * teacher["max_batch"], rel=0.05)  # half the KV cache, twice the sequences
    for student in ("4B-Width", "4B-Depth"):
        speedup = rows[student]["speedup"]
        assert 1.7 < speedup["batch1_decode"] < 1.85 and speedup["max_batch_throughput"] > 1.7
        assert rows[student]["output_tokens_per_s_at_max_batch"] > rows[student]["output_tokens_per_s_at_concurrency"]["64"]
    long = project(configs, [profile], 128, 2048, [1])["profiles"]["h100-fp8"]["models"]  # long answers: the KV cache dominates
    assert long["4B-Depth"]["speedup"]["max_batch_throughput"] > 1.5 * long["4B-Width"]["speedup"]["max_batch_throughput"]


def test_project_from_folders_holding_only_config(tmp_path, cli):
    for name in ("llama-3.1-8b", "llama-3.1-minitron-4b-width"):
        (tmp_path / name).mkdir()
        shutil.copy(CONFIGS / name / "config.json", tmp_path / name)
    result = cli("bench", "--project", "--profile", "h100-fp8,a100-bf16", "--workload", "gpu-128-128", "--teacher", tmp_path / "llama-3.1-8b",
                 "--student", tmp_path / "llama-3.1-minitron-4b-width", "--labels", "8B,width", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "Projected (projected: roofline upper bound" in result.stdout and "| a100-bf16 | width | bfloat16, KV bfloat16 |" in result.stdout
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(written["projection"]["profiles"]) == {"h100-fp8", "a100-bf16"}
    assert written["projection"]["profiles"]["h100-fp8"]["models"]["width"]["speedup"]["batch1_decode"] > 1.7
    for args, message in (([], "holds no config.json"), (["--profile", "tpu-v5"], "unknown engine profile 'tpu-v5'")):
        refused = cli("bench", "--project", "--teacher", tmp_path, *args)
        assert refused.returncode == 2 and message in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def test_measure_cpu():
    device = measure_cpu(threads=1)
    assert device.bandwidth > 1e9 and device.peak_flops["float32"] > 1e9 and device.memory > 1e9
    assert "1 torch threads" in device.source and "(1 thread)" in device.name
