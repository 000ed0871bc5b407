"""results.md of a benchmark: the measured table, the students' speedups beside their bounds, the projection, the plots, the environment.

Formats a results dict (harness.py) and nothing else; `format_projection` is also what
`minitron bench --project` prints.
"""


def number(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def ratio(value) -> str:
    return "–" if value is None else f"{value:.2f}x"


def share(value) -> str:
    return "–" if value is None else f"{value:.0%}"


def load_text(load: dict) -> str:
    if "concurrency" in load:
        return f"{load['concurrency']} client{'s' if load['concurrency'] != 1 else ''}"
    return f"{load['request_rate']:g} req/s"


def milliseconds(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def pair(stats: dict, low: str = "p50", high: str = "p99") -> str:
    return f"{milliseconds(stats[low])} / {milliseconds(stats[high])}" if stats else "–"


def rate(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:,.0f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:,.0f} GFLOP/s"


def format_workload(results: dict) -> str:
    w = results["workload"]
    length = lambda value: str(value) if isinstance(value, int) else f"{value['distribution']} [{value['min']}, {value['max']}]"  # noqa: E731
    sweep = f"concurrency {w['concurrency']}" if w.get("concurrency") else f"Poisson arrivals at {w['request_rate']} req/s"
    return (f"workload `{w['name']}`: {length(w['input_len'])} prompt tokens, {length(w['output_len'])} new tokens (greedy), "
            f"{w['requests']} measured requests after {w['warmup']} warm-up (a closed loop: at least one per client) per load point, {sweep}, prompts {w['prompts']}, seed {w['seed']}")


def format_results(results: dict, plots_prefix: str = "") -> str:
    """The whole report; `plots_prefix` is prepended to the PNG links (a summary one folder up links `bench/…`)."""
    machine, env = results.get("bound_device"), results["environment"]
    lines = [f"Backend `{results['backend']}`, {format_workload(results)}.", ""]
    if results.get("command"):
        lines += [f"Produced by: `{results['command']}`", ""]
    lines += [f"Environment: {env['cpu']} ({env['cpu_count']} cores), {results['threads']} thread(s) per engine, "
              f"GPU {env['gpu'] or 'none'}, load average {env['load_average_1min']:.1f} before and {env['load_average_1min_after']:.1f} after "
              f"the run (other work on the machine slows every number); {', '.join(f'{k} {v}' for k, v in env['libraries'].items() if v)}.", ""]
    if machine:
        peaks = ", ".join(f"{k} {rate(v)}" for k, v in machine["peak_flops"].items())
        lines += [f"Bound device: {machine['name']}: {machine['bandwidth_gb_s']:.1f} GB/s, {peaks} ({machine['source']}).", ""]
    lines += ["| model | load | req/s | out tok/s | tok/s/user | TTFT p50 / p99 ms | ITL p50 / p99 ms | E2E p50 / p99 ms | errors | "
              "decode / roofline |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model in results["models"]:
        for point in model["load_points"]:
            bound = point.get("bound") or {}
            lines.append(f"| {model['label']} | {load_text(point['load'])} | {number(point['requests_per_s'], 2)} | "
                         f"{number(point['output_tokens_per_s'])} | {number(point['output_tokens_per_s_per_user'])} | {pair(point['ttft_ms'])} | "
                         f"{pair(point['itl_ms'])} | {pair(point['e2e_ms'])} | {point['errors']} | {share(bound.get('fraction'))} |")
    students = results["models"][1:]
    if students:
        lines += ["", f"Speedup over the teacher ({results['models'][0]['label']}): measured output tokens/s ratio, the roofline bound "
                      "(the teacher's roofline time per token over the student's, at each one's batch and context), the bytes-per-token "
                      "ratio (the teacher's bytes read per token over the student's, both at the student's batch and context), and the "
                      "fraction of the bound reached.", "",
                  "| student | load | speedup | bound | bytes ratio | of bound | TTFT p50 | E2E p50 |", "|---|---|---|---|---|---|---|---|"]
        for model in students:
            for point in model["load_points"]:
                s = point.get("speedup") or {}
                lines.append(f"| {model['label']} | {load_text(point['load'])} | {ratio(s.get('output_tokens_per_s'))} | {ratio(s.get('bound'))} | "
                             f"{ratio(s.get('bytes_ratio'))} | {share(s.get('fraction_of_bound'))} | {ratio(s.get('ttft_p50'))} | "
                             f"{ratio(s.get('e2e_p50'))} |")
    notes = [f"- {model['label']}: no bound: {model['no_bound_reason']}" for model in results["models"] if model.get("no_bound_reason")]
    harness = [point["harness"]["fraction_of_itl"] for model in results["models"] for point in model["load_points"]
               if point["harness"]["fraction_of_itl"] is not None]
    if harness:
        notes.append(f"- harness overhead (the client's and runner's own code per token, measured): at most {max(harness):.3%} of the mean ITL")
    if notes:
        lines += [""] + notes
    if results.get("projection"):
        lines += ["", format_projection(results["projection"])]
    if results.get("plots"):
        lines += [""] + [f"![{name}]({plots_prefix}{name})" for name in results["plots"]]
    return "\n".join(lines) + "\n"


def format_projection(projection: dict) -> str:
    lines = [f"Projected ({projection['label']}), at {projection['input_len']:g} prompt / {projection['output_len']:g} new tokens:", "",
             "| profile | model | precision | batch-1 tok/s | TTFT ms | max batch (KV fits) | tok/s at max batch | speedup batch 1 | "
             "speedup at max batch |", "|---|---|---|---|---|---|---|---|---|"]
    for name, profile in projection["profiles"].items():
        for label, row in profile["models"].items():
            speedup = row.get("speedup", {})
            lines.append(f"| {name} | {label} | {profile['precision']} | {number(row['batch1_decode_tokens_per_s'])} | {number(row['ttft_ms'], 2)} | "
                         f"{row['max_batch'] if row['max_batch'] is not None else '–'} | {number(row['output_tokens_per_s_at_max_batch'], 0)} | "
                         f"{ratio(speedup.get('batch1_decode'))} | {ratio(speedup.get('max_batch_throughput'))} |")
    sources = {profile["device"]["name"]: profile["device"]["source"] for profile in projection["profiles"].values()}
    lines += ["", "Devices: " + "; ".join(f"{name}: {source}" for name, source in sources.items()) + "."]
    return "\n".join(lines)
