"""The benchmark harness of `minitron bench` (entry and CLI: harness.py), one module per job.

workloads.py  the workload model (YAML files in benchmarks/workloads/) and its seeded requests
load.py       sending a load point's requests (closed or open loop) and timing every token
metrics.py    TTFT, ITL, E2E, throughputs of a load point, as trtllm-bench/genai-perf/AIPerf name them
runners.py    the backends: torch, cpu-engine, triton, trtllm (torch_engine.py: batched transformers generate)
bound.py      bytes and FLOPs per token from a config, the roofline, this CPU measured
projection.py teacher and students projected onto the engine profiles' GPUs
report.py, plots.py   results.md and the PNGs

metrics, load, bound, projection and torch_engine need only torch and transformers (benchmarks/gpu_check.py
imports them on a bare GPU machine); this package's import pulls in nothing.
"""
