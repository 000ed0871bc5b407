"""GPU check: the published Minitron shapes measured with the torch backend beside their projection, and one 8B -> 4B-Width distillation step.

    bash benchmarks/gpu_check.sh [OUT_DIR]          # on a GPU machine; needs only torch and transformers
    python benchmarks/gpu_check.py --tiny --out DIR # the same script on this CPU, scaled-down shapes (what the tests run)

Randomly initialised bfloat16 models of the Llama-3.1-8B, 4B-Width and 4B-Depth shapes
(benchmarks/configs/; decode speed does not depend on the weights' values) each answer 128-token
synthetic prompts with 128 new tokens through `minitron bench`'s torch backend (transformers
generate, KV cache, static batches) at batch 1 and batch 32; each load point is reported beside its
roofline projection on the GPU's data sheet (the engine profile whose target names this GPU) and the
fraction of the bound it reaches. Then one distillation step of the 4B-Width student from the 8B
teacher at sequence length 4096 (forward KL on logits, T=1, the loss of `minitron distill`, written
in plain torch since ModelOpt is not needed for it; AdamW; gradient checkpointing as in the 8B
recipes): time and peak memory. Imports only the harness modules that need torch and transformers,
so nothing else must be installed or carried. Stops starting new phases after --budget seconds;
writes gpu_check.json into --out.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from toolchain.bench.bound import Device, ModelCost, load_point_bound, precision_of  # noqa: E402
from toolchain.bench.load import BenchRequest, LoadPointRequests, run_load_point  # noqa: E402
from toolchain.bench.projection import project_model  # noqa: E402
from toolchain.bench.torch_engine import TorchEngine  # noqa: E402

MODELS = {"8B": "llama-3.1-8b", "4B-Width": "llama-3.1-minitron-4b-width", "4B-Depth": "llama-3.1-minitron-4b-depth"}
TINY = {"hidden_size": 256, "intermediate_size": 896, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 2048}


def load_config(name: str, tiny: bool):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(ROOT / "benchmarks" / "configs" / MODELS[name])
    if tiny:  # the same three-way relation at a size a CPU runs in seconds: width shrinks hidden and FFN by 3/4 and 9/14, depth halves the layers
        config.update(TINY)
        config.num_hidden_layers = 4 if name != "4B-Depth" else 2
        if name == "4B-Width":
            config.update({"hidden_size": 192, "intermediate_size": 576})
    return config


def gpu_device(tiny: bool) -> tuple[Device | None, str]:
    """The data sheet of the engine profile whose target names this GPU (CPU: none; the tiny run has no projection device)."""
    if tiny or not torch.cuda.is_available():
        return None, "no GPU: measured on the CPU, no projection"
    gpu = torch.cuda.get_device_name()
    for path in sorted((ROOT / "engines").glob("*.yaml")):
        profile = yaml.safe_load(path.read_text())
        sheet = profile.get("device")
        if sheet and profile["target"].lower() in gpu.lower():
            return Device(name=profile["target"], bandwidth=sheet["memory_bandwidth_gb_s"] * 1e9,
                          peak_flops={k: v * 1e12 for k, v in sheet["dense_tflops"].items()}, memory=sheet["memory_gb"] * 1e9,
                          source=f"{sheet['source']} (engines/{path.name})"), gpu
    return None, f"{gpu}: no engine profile gives its data sheet"


def build_model(config, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype on the device: no float32 copy of 8B parameters first
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def synthetic_requests(config, count: int, input_len: int, output_len: int, seed: int) -> list[BenchRequest]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (count, input_len), generator=generator)
    return [BenchRequest("", tuple(row.tolist()), output_len) for row in ids]


def measure(name: str, config, args, device: Device | None) -> dict:
    model = build_model(config, args.device, torch.bfloat16 if args.device == "cuda" else torch.float32)
    cost = ModelCost.from_config(config, precision_of("bfloat16" if args.device == "cuda" else "float32"))
    result = {"model": name, "parameters": cost.describe(), "load_points": []}
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    with TorchEngine(model, pad_token_id=0, eos_token_ids=eos, max_batch_size=max(args.batches)) as engine:
        for batch in args.batches:
            requests = synthetic_requests(config, 2 * batch if batch > 1 else args.batch1_requests, args.input_len, args.output_len, seed=batch)
            warmup = synthetic_requests(config, batch, args.input_len, 4, seed=1000 + batch)
            metrics = run_load_point(engine.send, LoadPointRequests({"concurrency": batch}, warmup, requests, None))
            metrics.pop("samples")
            point = {"batch": batch, "measured": metrics}
            if device is not None:
                point["bound"] = load_point_bound(cost, device, metrics, batch)
                projected = project_model(cost, device, args.input_len, args.output_len, [batch], kv_memory_fraction=0.9)
                point["projected"] = {"label": "projected: roofline of the data sheet, no measurement",
                                      "output_tokens_per_s": projected["output_tokens_per_s_at_concurrency"][str(batch)],
                                      "batch1_decode_tokens_per_s": projected["batch1_decode_tokens_per_s"], "ttft_ms": projected["ttft_ms"]}
            result["load_points"].append(point)
            print(f"{name} batch {batch}: {metrics['output_tokens_per_s']:.0f} output tok/s, ITL {metrics['itl_ms'].get('mean', 0):.1f} ms", flush=True)
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def distillation_step(args) -> dict:
    """Two KD steps of the 4B-Width student from the 8B teacher at seq --distill-seq: the second is the one reported (the first allocates)."""
    import torch.nn.functional as F

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    teacher = build_model(load_config("8B", args.tiny), args.device, dtype).requires_grad_(False)
    student = build_model(load_config("4B-Width", args.tiny), args.device, dtype).train()
    (getattr(student, "activation_checkpointing_enable", None) or student.gradient_checkpointing_enable)()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    ids = torch.randint(3, teacher.config.vocab_size, (1, args.distill_seq), device=args.device)
    steps = []
    for _ in range(2):
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids).logits
        student_logits = student(input_ids=ids).logits
        loss = F.kl_div(F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1), log_target=True,
                        reduction="batchmean") / args.distill_seq
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        steps.append({"seconds": time.perf_counter() - started, "loss": loss.item(),
                      "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if args.device == "cuda" else None})
    return {"teacher": "8B", "student": "4B-Width", "seq_len": args.distill_seq, "batch": 1, "optimizer": "AdamW (bf16 states)",
            "gradient_checkpointing": True, "loss": "forward KL(teacher || student) on logits, T=1", "first_step": steps[0], "step": steps[1],
            "tokens_per_s": args.distill_seq / steps[1]["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tiny", action="store_true", help="scaled-down shapes on the CPU: a dry run of the script here")
    parser.add_argument("--budget", type=float, default=420, help="seconds after which no new phase starts (gpu_check.sh kills at 480)")
    args = parser.parse_args()
    args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    args.input_len, args.output_len = (128, 128) if not args.tiny else (16, 8)
    args.batches, args.batch1_requests = ([1, 32], 4) if not args.tiny else ([1, 4], 2)
    args.distill_seq = 4096 if not args.tiny else 64
    started = time.perf_counter()
    device, gpu = gpu_device(args.tiny)
    results = {"command": " ".join(["python", *sys.argv]), "gpu": gpu, "tiny": args.tiny, "device": device.describe() if device else None,
               "workload": {"input_len": args.input_len, "output_len": args.output_len, "batches": args.batches, "prompts": "synthetic token ids"},
               "torch": torch.__version__, "cuda": torch.version.cuda, "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M"),
               "models": [], "skipped": []}
    for name in MODELS:
        if time.perf_counter() - started > args.budget:
            results["skipped"].append(f"{name}: over the {args.budget:.0f} s budget")
            continue
        results["models"].append(measure(name, load_config(name, args.tiny), args, device))
    teacher = {p["batch"]: p["measured"]["output_tokens_per_s"] for p in results["models"][0]["load_points"]} if results["models"] else {}
    for model in results["models"][1:]:
        for point in model["load_points"]:
            point["speedup"] = {"measured": point["measured"]["output_tokens_per_s"] / teacher[point["batch"]]}
            if "projected" in point:
                base = next(p for p in results["models"][0]["load_points"] if p["batch"] == point["batch"])["projected"]["output_tokens_per_s"]
                point["speedup"]["projected"] = point["projected"]["output_tokens_per_s"] / base
    if time.perf_counter() - started > args.budget:
        results["skipped"].append("distillation step: over the budget")
    else:
        results["distillation"] = distillation_step(args)
    results["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu_check_tiny.json" if args.tiny else "gpu_check.json"
    (args.out / name).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out / name} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
