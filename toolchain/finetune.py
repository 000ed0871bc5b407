"""`minitron finetune`: LM-loss training of a model on the data, Minitron's teacher correction.

Minitron first fine-tunes the teacher on the distillation data, so the teacher's distribution matches
the data the student will be distilled on. Same loop, checkpoints and outputs as `minitron distill`
(`toolchain.training`), with the next-token cross-entropy as the only loss and no teacher. Training a
randomly initialised model this way gives the from-scratch baseline of the distillation benchmark.
"""

import json
from pathlib import Path

from toolchain.cli_args import add_data_arguments, add_model_arguments
from toolchain.data import check_seq_len
from toolchain.distributed import distributed_context, prepare_data_on_ranks
from toolchain.evaluate import evaluate_model
from toolchain.models import load_model, load_tokenizer, model_fingerprint, resolve_model_dir
from toolchain.recipe import TrainingConfig
from toolchain.training import (
    TrainingTask,
    add_training_arguments,
    config_from_args,
    lm_loss,
    prepare_student,
    print_summary,
    run_identity,
    train,
    write_final_model,
)


def finetune(
    model: str,
    data: str,
    out: Path,
    config: TrainingConfig,
    seq_len: int = 256,
    text_field: str = "text",
    dtype: str = "float32",
    device: str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    eval_batches: int | None = None,
) -> dict:
    """Train `model` with the LM loss on the train split of `data` into `out`; returns the final metrics.

    `config` is a TrainingConfig (a DistillConfig works too; its loss fields are not used).
    """
    out = Path(out)
    model_dir = resolve_model_dir(model)
    tokenizer = load_tokenizer(model_dir)
    config = TrainingConfig(**{name: getattr(config, name) for name in TrainingConfig.model_fields})
    with distributed_context(device) as runtime:
        torch_model = load_model(model_dir, dtype=dtype, device=str(runtime.device))
        check_seq_len(seq_len, torch_model.config)
        packed = prepare_data_on_ranks(data, tokenizer, seq_len, text_field, runtime)
        prepare_student(torch_model, config)

        def compute_loss(wrapped, input_ids):
            return {"loss": lm_loss(wrapped(input_ids=input_ids, use_cache=False).logits, input_ids)}

        identity = run_identity(config, runtime.world_size, stage="finetune", model=model_fingerprint(model_dir),
                                data=packed.directory.name, seq_len=seq_len)
        task = TrainingTask(torch_model, compute_loss, torch_model.config)
        result = train(task, packed.split("train"), config, out, identity, runtime, resume=resume, overwrite=overwrite, description="finetune")
        trained = result.model.eval()
        metrics = evaluate_model(trained, packed.split("eval"), max_batches=eval_batches)
        summary = {"model": str(model), "data": data, "out": str(out), "steps": result.steps, "tokens": result.tokens,
                   "train_seconds": result.seconds, "final_train": result.last, "eval": metrics}
        write_final_model(out, trained, tokenizer, {"eval.json": json.dumps(summary, indent=2) + "\n"}, runtime)
    return summary


def configure_parser(parser) -> None:
    parser.add_argument("--model", required=True, help="model to fine-tune: a local Hugging Face directory or a built-in name")
    parser.add_argument("--out", required=True, type=Path, help="run directory: the fine-tuned model, train_log.jsonl, eval.json, checkpoints/")
    add_data_arguments(parser)
    add_model_arguments(parser)
    add_training_arguments(parser)


def command(args) -> int:
    config = config_from_args(args, TrainingConfig)
    metrics = finetune(args.model, args.data, args.out, config, seq_len=args.seq_len, text_field=args.text_field,
                       dtype=args.dtype, device=args.device, resume=args.resume, overwrite=args.overwrite, eval_batches=args.eval_batches)
    print_summary(metrics, args.json)
    return 0
