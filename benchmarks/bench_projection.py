"""Llama-3.1-8B against the published Llama-3.1-Minitron-4B-Width and -Depth shapes, projected onto every GPU profile, beside NVIDIA's published figures.

    python benchmarks/bench_projection.py

Configs only (benchmarks/configs/, meta device, no weights). For each shipped GPU engine profile and
each published benchmark shape (workloads gpu-128-128, gpu-128-2048, gpu-2048-128): batch-1 decode
tokens/s, TTFT, the largest batch whose KV cache fits beside the weights and the output throughput
there, and at the profile's own max_batch_size; every number is a roofline projection
(toolchain/bench/projection.py), not a measurement. Then the projected speedups beside the published
1.8x (width) / 2.7x (depth), the projected 8B H100 FP8 throughput beside NVIDIA's 26,933 output
tokens/s (TensorRT-LLM perf overview, 128/128), and the projected FP8/BF16 ratio on H200 beside
ModelOpt's published 1.41x (batch 1) / 1.30x (batch 64) at 2048/128 (REFERENCE §7).
Writes benchmarks/results/projection_8b.{json,md}.
"""

import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from toolchain.bench.harness import config_of, projection_profiles  # noqa: E402
from toolchain.bench.projection import project  # noqa: E402
from toolchain.bench.workloads import load_workload  # noqa: E402
from toolchain.engine_profile import load_profile  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
MODELS = {"8B": "llama-3.1-8b", "4B-Width": "llama-3.1-minitron-4b-width", "4B-Depth": "llama-3.1-minitron-4b-depth"}
SHAPES = ("gpu-128-128", "gpu-128-2048", "gpu-2048-128")
PUBLISHED_SPEEDUP = {"4B-Width": 1.8, "4B-Depth": 2.7}  # TensorRT-LLM throughput over Llama-3.1-8B (NVIDIA's Minitron blog; REFERENCE §7)
PUBLISHED_H100_FP8_128_128 = 26_933  # output tokens/s, Llama-3.1-8B, TP1, TensorRT-LLM perf overview v0.14
PUBLISHED_FP8_OVER_BF16 = {1: 1.41, 64: 1.30}  # H200, ISL 2048, OSL 128 (ModelOpt benchmark)


def main() -> None:
    configs = {label: config_of(str(CONFIGS / folder)) for label, folder in MODELS.items()}
    profiles = projection_profiles(None)
    runs = {}
    for shape in SHAPES:
        workload = load_workload(shape)
        input_len, output_len = workload.expected_lengths()
        levels = sorted({1, *workload.concurrency, *(profile.max_batch_size for profile in profiles)})
        runs[shape] = project(configs, profiles, input_len, output_len, levels)
    h200_bf16 = load_profile("h200-fp8", {"quantization": "none", "kv_cache.dtype": "auto", "plugins.use_fp8_context_fmha": False})
    h200_bf16.name = "h200-bf16"
    precision = project({"8B": configs["8B"]}, [load_profile("h200-fp8"), h200_bf16], 2048, 128, [1, 64])
    payload = {"command": shlex.join(["python", *sys.argv]), "configs": {label: str(CONFIGS / folder) for label, folder in MODELS.items()},
               "published": {"speedup_vs_8b": PUBLISHED_SPEEDUP, "h100_fp8_128_128_output_tokens_per_s": PUBLISHED_H100_FP8_128_128,
                             "h200_fp8_over_bf16_2048_128": PUBLISHED_FP8_OVER_BF16},
               "projections": runs, "h200_fp8_vs_bf16": precision}
    write_results("projection_8b", payload, format_markdown(payload))
    print(format_markdown(payload))


def rows(payload: dict, profile: str, model: str, key: str) -> list:
    return [payload["projections"][shape]["profiles"][profile]["models"][model][key] for shape in SHAPES]


def format_markdown(payload: dict) -> str:
    lines = ["# Llama-3.1-8B against the Minitron 4B shapes, projected onto the target GPUs", "",
             f"Command: `{payload['command']}`. Configs only (`benchmarks/configs/`), no weights, no GPU. **Every number below is a projection**: "
             "the roofline of bytes moved and FLOPs done per token (toolchain/bench/bound.py) on the data-sheet figures of each engine "
             "profile's GPU, at the precision that profile stores the model in (FP8 profiles: FP8 layers, bf16 lm_head and embeddings, FP8 KV "
             "cache). Real engines reach a fraction of these figures.", ""]
    for shape in SHAPES:
        projection = payload["projections"][shape]
        lines += [f"## {shape} ({projection['input_len']:g} prompt / {projection['output_len']:g} new tokens)", "",
                  "| profile | model | batch-1 tok/s | TTFT ms | max batch (KV fits) | tok/s at max batch | tok/s at profile batch | "
                  "speedup batch 1 | speedup at max batch |", "|---|---|---|---|---|---|---|---|---|"]
        for name, profile in projection["profiles"].items():
            batch = str(load_profile(name).max_batch_size)
            for label, row in profile["models"].items():
                speedup = row.get("speedup", {})
                ratio = lambda value: f"{value:.2f}x" if value else "–"  # noqa: E731
                lines.append(f"| {name} | {label} | {row['batch1_decode_tokens_per_s']:,.0f} | {row['ttft_ms']:.1f} | {row['max_batch']:,} | "
                             f"{row['output_tokens_per_s_at_max_batch']:,.0f} | {row['output_tokens_per_s_at_concurrency'][batch]:,.0f} (batch {batch}) | "
                             f"{ratio(speedup.get('batch1_decode'))} | {ratio(speedup.get('max_batch_throughput'))} |")
        lines.append("")
    lines += ["## Beside the published figures", "",
              "| student | published (TensorRT-LLM, vs 8B) | projected h100-fp8, batch 1 (3 shapes) | projected h100-fp8, max batch, per shape | "
              "mean of the 3 shapes |", "|---|---|---|---|---|"]
    for student, published in PUBLISHED_SPEEDUP.items():
        per_shape = [row["max_batch_throughput"] for row in rows(payload, "h100-fp8", student, "speedup")]
        batch1 = [row["batch1_decode"] for row in rows(payload, "h100-fp8", student, "speedup")]
        lines.append(f"| {student} | {published}x | {min(batch1):.2f}x - {max(batch1):.2f}x | "
                     f"{', '.join(f'{value:.2f}x' for value in per_shape)} | {statistics.fmean(per_shape):.2f}x |")
    teacher = payload["projections"]["gpu-128-128"]["profiles"]["h100-fp8"]["models"]["8B"]
    at_profile = teacher["output_tokens_per_s_at_concurrency"][str(load_profile("h100-fp8").max_batch_size)]
    lines += ["", f"Llama-3.1-8B on h100-fp8 at 128/128: projected {teacher['output_tokens_per_s_at_max_batch']:,.0f} output tokens/s at the "
                  f"memory-limited batch {teacher['max_batch']:,} and {at_profile:,.0f} at the profile's batch 64; NVIDIA published "
                  f"{PUBLISHED_H100_FP8_128_128:,} (TensorRT-LLM perf overview, H100 FP8, TP1), "
                  f"{PUBLISHED_H100_FP8_128_128 / teacher['output_tokens_per_s_at_max_batch']:.0%} of the projected bound.", ""]
    fp8, bf16 = (payload["h200_fp8_vs_bf16"]["profiles"][name]["models"]["8B"] for name in ("h200-fp8", "h200-bf16"))
    ratio1 = fp8["output_tokens_per_s_at_concurrency"]["1"] / bf16["output_tokens_per_s_at_concurrency"]["1"]
    ratio64 = fp8["output_tokens_per_s_at_concurrency"]["64"] / bf16["output_tokens_per_s_at_concurrency"]["64"]
    lines += [f"FP8 over BF16 for Llama-3.1-8B on H200 at 2048/128: projected {ratio1:.2f}x at batch 1 and {ratio64:.2f}x at batch 64; "
              f"ModelOpt published {PUBLISHED_FP8_OVER_BF16[1]}x and {PUBLISHED_FP8_OVER_BF16[64]}x.", ""]
    width = [row["max_batch_throughput"] for row in rows(payload, "h100-fp8", "4B-Width", "speedup")]
    depth = [row["max_batch_throughput"] for row in rows(payload, "h100-fp8", "4B-Depth", "speedup")]
    width_batch1 = [row["batch1_decode"] for row in rows(payload, "h100-fp8", "4B-Width", "speedup")]
    lines += ["## Where and why the projection differs from the published figures", "",
              "- **The projection is a ceiling.** It assumes every byte streams at the data sheet's peak bandwidth and every FLOP runs at "
              "the dense Tensor Core peak, with perfect overlap; kernel launches, sampling, scheduling and the serving path have no term "
              f"in it. NVIDIA's measured 8B FP8 throughput at 128/128 is {PUBLISHED_H100_FP8_128_128 / teacher['output_tokens_per_s_at_max_batch']:.0%} "
              f"of the projection at the memory-limited batch, and {PUBLISHED_H100_FP8_128_128 / at_profile:.1f}x the projection at the h100-fp8 "
              "profile's batch 64: the published run kept far more than 64 sequences in flight, and reached most of the ceiling.",
              f"- **Width: the projection matches the published 1.8x where the KV cache is small.** At batch 1 and at 128/128 the width "
              f"student projects to {min(width_batch1):.2f}-{width[0]:.2f}x, its parameter ratio. Width pruning keeps all 32 layers and all 8 "
              "KV heads, so its KV cache per token is the teacher's: with long answers or prompts the KV reads dominate and the projected "
              f"gain falls ({width[1]:.2f}x at 128/2048, {width[2]:.2f}x at 2048/128).",
              f"- **Depth: the published 2.7x is above every projection (at most {max(depth):.2f}x).** Depth pruning halves the KV cache "
              "(16 layers), so the depth student fits twice the sequences and reads half the KV per token, which the roofline credits at "
              "long contexts. What it cannot credit: a 16-layer model pays every fixed per-layer cost (kernel launches, norms, attention "
              "kernels, synchronisation) half as often, while the width student keeps 32 layers of smaller, less efficient GEMMs. Those per-layer "
              "costs in TensorRT-LLM, and any larger batch the published 4B runs used, must account for the gap between 2.7x and the projection.",
              f"- **FP8 over BF16.** FP8 halves the layers' weights and the KV cache but not the bf16 lm_head and embeddings, so the "
              f"projected gain is {ratio1:.2f}x at batch 1 and {ratio64:.2f}x at batch 64 (FP8 Tensor Cores have twice the bf16 peak), "
              f"against {PUBLISHED_FP8_OVER_BF16[1]}x and {PUBLISHED_FP8_OVER_BF16[64]}x published: FP8 GEMMs and attention do not reach "
              "twice the bf16 speed in practice, and quantize/dequantize steps cost time the roofline ignores.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
