"""`minitron search` on the built-in teacher at half its non-embedding parameters: does it beat the main job's students?

    python benchmarks/bench_search_smollm2.py [--out runs/bench-search-smollm2]

The main job's recipe (smollm2-135m-minitron: its data, importance, distillation and eval settings)
with a search in place of its fixed targets: budget non_embedding=50% of SmolLM2-135M, hidden sizes
in multiples of 48 (576 = 12 x 48; 64 would leave only 512 and 448 and miss the main job's 432), FFN
in multiples of 128, the teacher's 9 heads kept. With the heads kept, the best width-only survivor is
the main job's width student (hidden 432, FFN 768, 30 layers) and the best depth-only one its depth
student (15 layers), so both are candidates beside the searched shapes. Every candidate is pruned
from one importance pass and distilled for the recipe's 16,384 tokens (the main job's budget), then
ranked by KL(teacher ‖ student) on the eval split; each candidate's CPU engine (cpu-fp32) is built
and its batch-1 decode speed measured against the teacher's in one harness run (1 thread).

Writes benchmarks/results/search_smollm2.{json,md,png}. Resumable: rerun to continue (finished
candidates are kept in --out).
"""

import argparse
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine, write_results  # noqa: E402

from toolchain.recipe import load_recipe  # noqa: E402
from toolchain.search import format_candidates, search  # noqa: E402
from toolchain.settings import SearchConfig  # noqa: E402

RECIPE = "smollm2-135m-minitron"
SETTINGS = SearchConfig(budget="non_embedding=50%", profile="cpu-fp32", hidden_multiple=48, ffn_multiple=128, search_heads=False,
                        max_candidates=4, tokens=16384, workload="cpu-demo", threads=1)
SAME_SPEED = 0.95  # a searched candidate "matches" a fixed student's speed at 95% of it or more (measured speeds are noisy)


def beaten_by(report: dict, fixed_kind: str) -> list[dict]:
    """Searched candidates at least as fast as the fixed student (within SAME_SPEED) with a lower KL."""
    candidates = report["candidates"]
    fixed = next(c for c in candidates if c["kind"] == fixed_kind)
    return [c for c in candidates if c["kind"] == "searched" and c["speed"]["speedup"] >= SAME_SPEED * fixed["speed"]["speedup"]
            and c["kl"] < fixed["kl"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-search-smollm2"))
    args = parser.parse_args()
    recipe = load_recipe(RECIPE)
    report = search(recipe.teacher.model, args.out, SETTINGS, recipe.importance, recipe.distill, recipe.data, recipe.compute, recipe.eval)
    shutil.copyfile(args.out / "pareto.png", RESULTS_DIR / "search_smollm2.png")
    verdicts = {kind: [c["id"] for c in beaten_by(report, kind)] for kind in ("width-only", "depth-only")}
    both = sorted(set(verdicts["width-only"]) & set(verdicts["depth-only"]))
    command = "python " + shlex.join(["benchmarks/bench_search_smollm2.py", *sys.argv[1:]])
    lines = [f"Command: `{command}` (the main job's recipe {RECIPE}, with a search in place of its fixed targets: "
             f"`{SETTINGS.model_dump(exclude_defaults=True)}`). Speedups are measured: each candidate's CPU engine against the teacher's, "
             "batch 1, in one harness run. KL and perplexity after the same short distillation as the main job's students.", "",
             format_candidates(report).replace("# Search under", "## Candidates: search under", 1), "![Pareto front](search_smollm2.png)", "",
             "## Does the search beat the main job's students?", ""]
    for kind, student in (("width-only", "width"), ("depth-only", "depth")):
        found = verdicts[kind]
        lines.append(f"- Against the main job's {student} student (`{kind}`): "
                     + (f"beaten on KL at {SAME_SPEED:.0%} or more of its speed by {', '.join(f'`{c}`' for c in found)}." if found
                        else "no searched candidate has a lower KL at 95% or more of its speed."))
    lines.append(f"- Beats both: {', '.join(f'`{c}`' for c in both)}." if both else "- No searched candidate beats both at equal speed.")
    write_results("search_smollm2", {"command": command, "machine": machine(), "settings": SETTINGS.model_dump(mode="json"), "report": report,
                                     "beaten_by": verdicts, "beats_both": both},
                  "# Search at half of SmolLM2-135M's non-embedding parameters\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
