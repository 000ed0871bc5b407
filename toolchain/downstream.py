"""Downstream tasks of EleutherAI's lm-evaluation-harness on a model, passed in-process (`minitron eval MODEL --tasks ...`).

The Minitron papers report MMLU, HellaSwag, Winogrande, ARC and others alongside perplexity; lm-eval
runs them. The model is loaded once by the toolchain (same dtype/device rules as every stage) and
handed to lm-eval's `HFLM` wrapper, so no second copy is loaded and local checkpoints need no hub.
Task datasets of the built-in tasks come from the Hugging Face Hub (a network is needed for them);
`--task-dir` adds local task YAML files, e.g. a multiple-choice task over a JSONL file, which run offline.
"""

import json
import time
from pathlib import Path

from toolchain.errors import UserError, setting
from toolchain.models import load_model, load_tokenizer, resolve_model_dir
from toolchain.settings import ComputeConfig, LmEvalConfig


def import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm-eval is not installed; install the extra: pip install 'minitron-toolchain[lm-eval]'") from None
    return lm_eval, HFLM, TaskManager


def task_manager(settings: LmEvalConfig):
    """lm-eval's task registry with the local task folder; unknown task names are refused before any model loads."""
    _, _, TaskManager = import_lm_eval()
    if settings.task_dir is not None and not Path(settings.task_dir).is_dir():
        raise UserError(f"{setting('lm_eval.task_dir')} {settings.task_dir} is not a directory")
    manager = TaskManager(include_path=settings.task_dir) if settings.task_dir else TaskManager()
    unknown = [task for task in settings.tasks if task not in manager.all_tasks]
    if unknown:
        raise UserError(f"lm-eval knows no task {', '.join(unknown)}; `lm-eval ls tasks` lists them, "
                        f"and {setting('lm_eval.task_dir')} adds local task YAML files")
    return manager


def run_tasks(model: str, settings: LmEvalConfig, compute: ComputeConfig) -> dict:
    """Run `settings.tasks` on `model`; returns {task: {metric: value}} with lm-eval's version and the seconds taken."""
    if not settings.tasks:
        raise UserError(f"no lm-eval task given; pass {setting('lm_eval.tasks')} NAME[,NAME...]")
    lm_eval, HFLM, _ = import_lm_eval()
    manager = task_manager(settings)
    model_dir = resolve_model_dir(model)
    torch_model = load_model(model_dir, dtype=compute.dtype, device=compute.device).eval()
    wrapped = HFLM(pretrained=torch_model, tokenizer=load_tokenizer(model_dir), batch_size=settings.batch_size)
    started = time.perf_counter()
    output = lm_eval.simple_evaluate(model=wrapped, tasks=list(settings.tasks), task_manager=manager, limit=settings.limit,
                                     num_fewshot=settings.num_fewshot, log_samples=False, verbosity="WARNING")
    results = {}
    for task, metrics in output["results"].items():
        results[task] = {name.removesuffix(",none"): value for name, value in metrics.items()
                         if name != "alias" and isinstance(value, (int, float)) and not isinstance(value, bool)}
    return {"model": str(model), "tasks": results, "limit": settings.limit, "num_fewshot": settings.num_fewshot,
            "lm_eval_version": getattr(lm_eval, "__version__", None), "seconds": time.perf_counter() - started}


def print_task_results(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{summary['model']}: lm-eval {summary['lm_eval_version']}, {summary['seconds']:.1f} s")
    print("| task | metric | value |")
    print("|---|---|---|")
    for task, metrics in summary["tasks"].items():
        for name, value in metrics.items():
            if not name.endswith("_stderr"):
                stderr = metrics.get(f"{name}_stderr")
                shown = f"{value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, float) else "")
                print(f"| {task} | {name} | {shown} |")
