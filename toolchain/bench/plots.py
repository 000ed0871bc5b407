"""Small PNG plots of a benchmark's results.json, written next to it.

- throughput_latency.png: output tokens/s against median end-to-end latency, one line per model
  over the load points (each point labelled with its load);
- speedup.png: each student's measured speedup over the teacher against the load, with its roofline
  bound dashed in the same colour;
- latency_distributions.png: TTFT and ITL of every request, one box per model and load point.

Only results.json is read, so the plots can be redrawn from a committed result.
"""

from pathlib import Path

PLOT_FILES = ("throughput_latency.png", "speedup.png", "latency_distributions.png")


def load_label(load: dict) -> str:
    return f"c={load['concurrency']}" if "concurrency" in load else f"{load['request_rate']:g}/s"


def load_value(load: dict) -> float:
    return load.get("concurrency", load.get("request_rate"))


def write_plots(results: dict, out: Path) -> list[str]:
    """Write the PNGs into `out`; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    sweep = "concurrent clients" if "concurrency" in models[0]["load_points"][0]["load"] else "requests per second (Poisson)"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    for index, model in enumerate(models):
        points = [p for p in model["load_points"] if p["e2e_ms"]]
        axes.plot([p["e2e_ms"]["p50"] for p in points], [p["output_tokens_per_s"] for p in points], "o-", color=colors[index % len(colors)],
                  label=model["label"])
        for point in points:
            axes.annotate(load_label(point["load"]), (point["e2e_ms"]["p50"], point["output_tokens_per_s"]), fontsize=7,
                          textcoords="offset points", xytext=(3, 3))
    axes.set(xlabel="end-to-end latency p50 (ms)", ylabel="output tokens/s", title=f"Throughput against latency ({results['backend']})")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    save(figure, out / PLOT_FILES[0])

    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    for index, model in enumerate(models[1:], start=1):
        color = colors[index % len(colors)]
        points = [p for p in model["load_points"] if p.get("speedup", {}).get("output_tokens_per_s")]
        x = [load_value(p["load"]) for p in points]
        axes.plot(x, [p["speedup"]["output_tokens_per_s"] for p in points], "o-", color=color, label=f"{model['label']} measured")
        bounded = [(value, p["speedup"]["bound"]) for value, p in zip(x, points) if p["speedup"].get("bound")]
        if bounded:
            axes.plot(*zip(*bounded), "--", color=color, label=f"{model['label']} bound (roofline)")
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set(xlabel=sweep, ylabel=f"speedup over {models[0]['label']} (output tokens/s)", title="Students against the teacher")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    save(figure, out / PLOT_FILES[1])

    figure, (ttft_axes, itl_axes) = plt.subplots(2, 1, figsize=(7, 6), dpi=100)
    labels, ttft, itl = [], [], []
    for model in models:
        for point in model["load_points"]:
            labels.append(f"{model['label']}\n{load_label(point['load'])}")
            ttft.append(point["samples"]["ttft_ms"] or [float("nan")])
            itl.append(point["samples"]["itl_ms"] or [float("nan")])
    for axes, values, name in ((ttft_axes, ttft, "TTFT (ms)"), (itl_axes, itl, "inter-token latency (ms)")):
        axes.boxplot(values, tick_labels=labels, showfliers=True)
        axes.set_ylabel(name)
        axes.tick_params(axis="x", labelsize=7)
        axes.grid(alpha=0.3, axis="y")
    ttft_axes.set_title("Latency distributions, every request")
    save(figure, out / PLOT_FILES[2])
    return list(PLOT_FILES)


def save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(figure)
