"""`minitron finetune`: LM-loss training of a model on the data, Minitron's teacher correction.

Minitron first fine-tunes the teacher on the distillation data, so the teacher's distribution matches
the data the student will be distilled on. Same loop, checkpoints and outputs as `minitron distill`
(`toolchain.training`), with the next-token cross-entropy as the only loss and no teacher. Training a
randomly initialised model this way gives the from-scratch baseline of the distillation benchmark.
"""

import json
from pathlib import Path

from toolchain.data import check_seq_len
from toolchain.distributed import distributed_context, prepare_data_on_ranks
from toolchain.evaluate import evaluate_model
from toolchain.losses import next_token_nll
from toolchain.models import load_model, load_tokenizer, model_fingerprint, resolve_model_dir
from toolchain.settings import ComputeConfig, DataConfig, EvalConfig, TrainingConfig
from toolchain.training import TrainingTask, prepare_student, publish_run_dir, run_identity, train, working_dir, write_final_model


def finetune(model: str, out: Path, training: TrainingConfig, data: DataConfig, compute: ComputeConfig, evaluation: EvalConfig,
             resume: bool = False, overwrite: bool = False, resume_hint: str = "continue with --resume") -> dict:
    """Train `model` with the LM loss on the train split of `data` into `out`; returns the final metrics.

    The final eval (eval split) runs unless `evaluation.max_batches` is 0. With `overwrite`, an
    existing output is replaced only once the new run is complete.
    """
    out = Path(out)
    work = working_dir(out, overwrite)
    model_dir = resolve_model_dir(model)
    tokenizer = load_tokenizer(model_dir)
    with distributed_context(compute.device) as runtime:
        torch_model = load_model(model_dir, dtype=compute.dtype, device=str(runtime.device))
        check_seq_len(data.seq_len, torch_model.config)
        packed = prepare_data_on_ranks(data, tokenizer, runtime)
        prepare_student(torch_model, training)

        def compute_loss(wrapped, input_ids):
            return {"loss": next_token_nll(wrapped(input_ids=input_ids, use_cache=False).logits, input_ids)}

        identity = run_identity(training, runtime.world_size, stage="finetune", model=model_fingerprint(model_dir),
                                data=packed.directory.name)
        task = TrainingTask(torch_model, compute_loss, torch_model.config)
        result = train(task, packed.split("train"), training, work, identity, runtime, resume=resume, overwrite=overwrite,
                       description="finetune", resume_hint=resume_hint)
        trained = result.model.eval()
        metrics = evaluate_model(trained, packed.split("eval"), evaluation) if evaluation.max_batches != 0 else None
        summary = {"model": str(model), "data": data.spec, "out": str(out), "steps": result.steps, "tokens": result.tokens,
                   "train_seconds": result.seconds, "final_train": result.last, "eval": metrics}
        write_final_model(work, trained, tokenizer, {"eval.json": json.dumps(summary, indent=2) + "\n"}, runtime)
        publish_run_dir(out, work, runtime)
    return summary


def print_training_summary(summary: dict, as_json: bool) -> None:
    """The whole summary as JSON, or the few numbers a person reads after a run (distill and finetune)."""
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    rows = {"out": summary["out"], "steps": summary["steps"], "tokens": summary["tokens"], "train seconds": f"{summary['train_seconds']:.1f}",
            "final train loss": f"{summary['final_train'].get('loss', float('nan')):.4f}"}
    evaluation = summary["eval"]
    if evaluation is not None:
        rows["eval perplexity"] = f"{evaluation['perplexity']:.3f}"
        if "kl" in evaluation:
            rows.update({"teacher perplexity": f"{evaluation['teacher_perplexity']:.3f}", "KL(teacher || student)": f"{evaluation['kl']:.4f}",
                         "top-1 agreement": f"{evaluation['top1_agreement']:.2%}"})
    width = max(len(key) for key in rows)
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")


def add_run_flags(parser) -> None:
    """Flags of a training subcommand that are not settings: how to treat an existing run in --out, and the output format."""
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest intact checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --out (the old one is kept until the new one is complete)")
    parser.add_argument("--json", action="store_true", help="print the final metrics as JSON")


def configure_parser(parser) -> None:
    from toolchain.cli_args import add_recipe_source, add_section_flags

    parser.add_argument("--model", required=True, help="model to fine-tune: a local Hugging Face directory or a built-in name")
    parser.add_argument("--out", required=True, type=Path, help="run directory: the fine-tuned model, train_log.jsonl, eval.json, checkpoints/")
    add_run_flags(parser)
    add_recipe_source(parser)
    for section in ("training", "data", "compute", "eval"):
        add_section_flags(parser, section)


def command(args) -> int:
    from toolchain.cli_args import sections_from_args

    training, data, compute, evaluation = sections_from_args(args, "training", "data", "compute", "eval")
    summary = finetune(args.model, args.out, training, data, compute, evaluation, resume=args.resume, overwrite=args.overwrite)
    print_training_summary(summary, args.json)
    return 0
