"""Cost of a distillation micro-step against its parts, and peak memory against what must exist.

In one run, alternating in rounds so machine noise hits all alike (medians reported):
- KD step: the toolchain's step (ModelOpt distillation model: teacher forward + student forward,
  KL loss on logits in chunks of --loss-chunk-tokens tokens, student backward), exactly as `minitron distill` runs it;
- teacher forward alone (no grad) + student forward/backward alone (LM loss) on the same batch.
Target: the KD step within 10% of the sum of its parts.
Memory: peak during the KD step (CUDA: max allocated; CPU: peak RSS sampled every 2 ms) against the
teacher and student weights, the student's gradients and AdamW's two moment buffers. Two CPU measures:
the whole process (RSS above the process before any model loaded: also counts ModelOpt's and the
libraries' own memory) and the step alone (RSS above the RSS just before the step, after freed heap
memory is handed back with malloc_trim, added to what must exist). Measured without and with the
student's gradient checkpointing (memory only for the latter), for online KD and for KD from the teacher-logit
cache (the student alone against the teacher's top-k log-probs of the batch; what must exist is then the
student's weights, gradients and AdamW moments).

The student is a random-init copy of the teacher config sliced to --hidden-size / --ffn-hidden-size
(the smollm2 width student's shape) unless --student names a checkpoint; speed does not depend on weights.

    python benchmarks/bench_distill_speed.py [--teacher smollm2-135m] [--student DIR] [--rounds 3] [--threads 2]
"""

import argparse
import ctypes
import gc
import statistics
import sys
import threading
import time
from types import SimpleNamespace

import torch
from common import machine, pin_threads, write_results

from toolchain.data import iterate_batches, prepare_data
from toolchain.distill import build_distillation, cached_kd_loss_function, layer_mapping
from toolchain.losses import next_token_nll, pass_hidden_states, restore_lm_head
from toolchain.models import load_config, load_model, load_tokenizer
from toolchain.settings import DataConfig, DistillConfig
from toolchain.teacher_cache import teacher_entries
from toolchain.training import prepare_student


class PeakMemory:
    """Peak resident memory (CPU, sampled) or peak allocated memory (CUDA) inside a `with` block."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self.running = True
        self.peak = self.rss()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.running = False
            self.thread.join()

    def settled(self) -> int:
        """Current memory once freed heap memory is handed back to the system (CPU), so a peak above it is the step's own."""
        if self.device.type == "cpu":
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        return self.current()

    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else self.rss()


def sliced_student(teacher: str, hidden_size: int, ffn_hidden_size: int, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    config = load_config(teacher)
    config.hidden_size, config.intermediate_size = hidden_size, ffn_hidden_size
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def measured_step(memory: PeakMemory, step) -> tuple[float, int]:
    """Seconds of `step`, and how far memory rises above its settled level while it runs."""
    before = memory.settled()
    with memory:
        seconds = timed(step)
    return seconds, memory.peak - before


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--student", help="student checkpoint (default: a random-init slice of the teacher config)")
    parser.add_argument("--hidden-size", type=int, default=432)
    parser.add_argument("--ffn-hidden-size", type=int, default=768)
    parser.add_argument("--data", default="builtin:python-docs")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--loss-chunk-tokens", type=int, default=DistillConfig.model_fields["loss_chunk_tokens"].default)
    parser.add_argument("--teacher-cache-tail-samples", type=int, default=DistillConfig.model_fields["teacher_cache_tail_samples"].default)
    args = parser.parse_args()
    pin_threads(args.threads)

    memory = PeakMemory(torch.device(args.device))
    baseline = memory.current()
    teacher = load_model(args.teacher, device=args.device)
    student = load_model(args.student, device=args.device) if args.student else sliced_student(args.teacher, args.hidden_size, args.ffn_hidden_size, teacher.dtype).to(args.device)
    plain_student = load_model(args.student, device=args.device) if args.student else sliced_student(args.teacher, args.hidden_size, args.ffn_hidden_size, teacher.dtype).to(args.device)
    plain_student.train()
    config = DistillConfig(steps=1, loss_chunk_tokens=args.loss_chunk_tokens, teacher_cache_tail_samples=args.teacher_cache_tail_samples)
    distill_model, compute_loss = build_distillation(teacher, prepare_student(student, config), config, layer_mapping(list(range(student.config.num_hidden_layers)), teacher.config.num_hidden_layers))
    rows = prepare_data(DataConfig(spec=args.data, seq_len=args.seq_len), load_tokenizer(args.teacher)).split("train")
    input_ids = next(iterate_batches(rows, args.micro_batch_size)).to(args.device)
    parameters = [p for p in distill_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)

    def kd_step():
        compute_loss(distill_model, input_ids)["loss"].backward()

    @torch.no_grad()
    def teacher_forward():  # with its lm_head: the KD step forms the teacher's logits from its hidden states chunk by chunk
        (teacher(input_ids=input_ids, use_cache=False).logits @ teacher.lm_head.weight.T).sum().item()
        # ModelOpt's capture hook on the teacher's lm_head kept these logits; drop them so they do not count in the KD peak
        teacher.lm_head._intermediate_output = None

    def student_step():
        next_token_nll(plain_student(input_ids=input_ids, use_cache=False).logits, input_ids).backward()

    kd_step()  # warm-up, and creates the gradients
    optimizer.step()  # creates AdamW's moments, so they count in what must exist
    teacher_forward()
    student_step()
    # the plain copy only exists for the separate timing: free its gradients before measuring memory
    plain_student.zero_grad(set_to_none=True)
    kd_seconds, teacher_seconds, student_seconds = [], [], []
    peaks, step_increments = [], []
    for _ in range(args.rounds):
        distill_model.zero_grad(set_to_none=False)
        before = memory.settled()
        with memory:
            kd_seconds.append(timed(kd_step))
        peaks.append(memory.peak)
        step_increments.append(memory.peak - before)
        teacher_seconds.append(timed(teacher_forward))
        student_seconds.append(timed(student_step))
        plain_student.zero_grad(set_to_none=True)

    # the same step with the student's gradient checkpointing (HF's, as --gradient-checkpointing): memory only
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed_increments = []
    for _ in range(2):
        distill_model.zero_grad(set_to_none=False)
        checkpointed_increments.append(measured_step(memory, kd_step)[1])

    # KD from the teacher-logit cache: the plain student alone against the teacher's top-k of this batch (what the cache holds)
    restore_lm_head(teacher)
    with torch.no_grad():
        entries = teacher_entries(teacher, input_ids, config.teacher_cache_top_k, config.temperature, config.teacher_cache_tail_samples)
    targets = [torch.from_numpy(array).to(args.device) for array in entries]
    cache = SimpleNamespace(targets=lambda ids: targets, fingerprint={"tail_samples": config.teacher_cache_tail_samples})
    cached_loss = cached_kd_loss_function(cache, config, pass_hidden_states(plain_student))

    def cached_step():
        cached_loss(plain_student, input_ids)["loss"].backward()

    cached_step()  # creates the gradients
    cached_seconds, cached_increments = [], []
    for _ in range(args.rounds):
        plain_student.zero_grad(set_to_none=False)
        seconds, increment = measured_step(memory, cached_step)
        cached_seconds.append(seconds)
        cached_increments.append(increment)
    plain_student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cached_checkpointed_increments = []
    for _ in range(2):
        plain_student.zero_grad(set_to_none=False)
        cached_checkpointed_increments.append(measured_step(memory, cached_step)[1])

    tokens = input_ids.numel()
    kd, teacher_s, student_s = (statistics.median(x) for x in (kd_seconds, teacher_seconds, student_seconds))
    ratio = kd / (teacher_s + student_s)
    # the distillation model's parameters() include the frozen teacher's: the student's are those that train
    student_parameters = parameters
    must_exist = {
        "teacher_weights": tensor_bytes(teacher.parameters()),
        "student_weights": tensor_bytes(student_parameters),
        "student_gradients": tensor_bytes(p.grad for p in student_parameters),
        "adamw_moments": tensor_bytes(t for state in optimizer.state.values() for t in (state["exp_avg"], state["exp_avg_sq"])),
    }
    # the plain copy of the student used for the separate timing lives in memory too; it is not part of a KD run
    extra_copy = tensor_bytes(plain_student.parameters())
    required = sum(must_exist.values())
    peak = statistics.median(peaks) - baseline - extra_copy
    cached_required = sum(value for name, value in must_exist.items() if name != "teacher_weights")
    step_peak = {"online KD": required + statistics.median(step_increments),
                 "online KD, gradient checkpointing": required + min(checkpointed_increments[1:]),
                 "cached KD": cached_required + statistics.median(cached_increments),
                 "cached KD, gradient checkpointing": cached_required + min(cached_checkpointed_increments[1:])}
    step_required = {name: cached_required if name.startswith("cached") else required for name in step_peak}
    cached = statistics.median(cached_seconds)
    gib = 1024 ** 3
    payload = {
        "benchmark": "distillation step vs teacher forward + student forward/backward; peak memory vs must-exist state",
        "teacher": args.teacher, "student": args.student or f"random-init slice of {args.teacher}: hidden {args.hidden_size}, ffn {args.ffn_hidden_size}",
        "student_parameters": sum(p.numel() for p in student_parameters), "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "micro_batch": [args.micro_batch_size, args.seq_len], "tokens_per_step": tokens, "loss_chunk_tokens": args.loss_chunk_tokens, "rounds": args.rounds,
        "kd_step_seconds": kd_seconds, "teacher_forward_seconds": teacher_seconds, "student_forward_backward_seconds": student_seconds,
        "kd_over_parts": ratio, "target_kd_over_parts": 1.10, "within_target": ratio <= 1.10,
        "kd_tokens_per_second": tokens / kd, "cached_kd_step_seconds": cached_seconds, "cached_kd_tokens_per_second": tokens / cached,
        "memory_bytes": {**must_exist, "required_total": required, "peak_during_kd_step": peak, "peak_over_required": peak / required,
                         "activations_and_temporaries": peak - required, "target_peak_over_required": 1.5,
                         "step_alone_peak": step_peak, "step_alone_required": step_required,
                         "step_alone_peak_over_required": {name: value / step_required[name] for name, value in step_peak.items()}},
        "memory_measure": "CUDA max_memory_allocated" if args.device.startswith("cuda") else
                          "CPU resident set size sampled every 2 ms, minus the process before loading models and the separate-timing copy",
        "machine": machine(),
    }
    rows_md = [
        "| measure | median s | tokens/s |", "|---|---|---|",
        f"| KD step (ModelOpt teacher fwd + student fwd/bwd + KL in chunks of {args.loss_chunk_tokens} tokens) | {kd:.2f} | {tokens / kd:,.0f} |",
        f"| teacher forward alone | {teacher_s:.2f} | {tokens / teacher_s:,.0f} |",
        f"| student forward/backward alone (LM loss) | {student_s:.2f} | {tokens / student_s:,.0f} |",
        f"| sum of the parts | {teacher_s + student_s:.2f} | {tokens / (teacher_s + student_s):,.0f} |",
        f"| KD step from the teacher-logit cache (top-{config.teacher_cache_top_k} + {config.teacher_cache_tail_samples} tail samples, student alone) | {cached:.2f} | {tokens / cached:,.0f} |",
    ]
    memory_md = ["| memory | GiB |", "|---|---|"] + [f"| {name.replace('_', ' ')} | {value / gib:.3f} |" for name, value in must_exist.items()] + [
        f"| **required total** | {required / gib:.3f} |", f"| **peak during the KD step** | {peak / gib:.3f} |",
        f"| peak − required (activations, logits, temporaries) | {(peak - required) / gib:.3f} |"]
    markdown = "\n".join([
        "# Distillation speed and memory", "", f"Command: `{' '.join(['python benchmarks/bench_distill_speed.py', *sys.argv[1:]])}`", "",
        f"Teacher {args.teacher}; student {payload['student']} ({payload['student_parameters'] / 1e6:.1f}M parameters); "
        f"micro-batch {args.micro_batch_size} x {args.seq_len} tokens; {args.rounds} alternating rounds, medians; "
        f"{machine()['torch_threads']} torch threads on {machine()['cpu_count']} cores ({args.device}).", "",
        *rows_md, "",
        f"**KD step / (teacher forward + student forward/backward) = {ratio:.3f}** (target ≤ 1.10: {'met' if ratio <= 1.10 else 'NOT met'}).", "",
        *memory_md, "",
        f"Whole process: peak / required = {peak / required:.2f}. Memory measured as {payload['memory_measure']}.", "",
        "The step alone (what must exist + the step's own peak above the memory before it, freed heap handed back first; "
        "from the cache, what must exist is the student's weights, gradients and AdamW moments, no teacher):", "",
        "| KD step | required GiB | peak GiB | peak / required | target ≤ 1.5 |", "|---|---|---|---|---|",
        *[f"| {name} | {step_required[name] / gib:.3f} | {value / gib:.3f} | {value / step_required[name]:.2f} | "
          f"{'met' if value / step_required[name] <= 1.5 else 'NOT met'} |" for name, value in step_peak.items()],
    ])
    write_results("distill_speed", payload, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
