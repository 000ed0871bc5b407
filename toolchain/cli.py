"""`minitron`: one command, a table from subcommand to the module that implements it.

Each module listed in COMMANDS defines `configure_parser(parser)` (its flags) and `command(args)`
(calls the stage's one public entry function and prints the result). A module is imported only when
its subcommand runs, so `minitron --help` does not import torch.
"""

import importlib
import logging
import os
import signal
import sys

from toolchain import __version__
from toolchain.cli_args import ArgumentParser, flag_of
from toolchain.errors import UserError, settings_named_by

COMMANDS = {
    "models": ("toolchain.models", "list the built-in models, whether each is available and where it is cached"),
    "eval": ("toolchain.evaluate", "perplexity on the eval split; with --teacher also KL and top-1 agreement"),
    "recipes": ("toolchain.recipes", "list the built-in recipes; `recipes show NAME` prints one to copy and edit"),
    "validate": ("toolchain.recipe", "validate a recipe, check its teacher, data and engine profile, and print the resolved plan"),
    "prune": ("toolchain.prune", "Minitron structured pruning (width and depth) of a Hugging Face checkpoint"),
    "finetune": ("toolchain.finetune", "LM-loss fine-tuning of a model on the data (Minitron's teacher correction)"),
    "distill": ("toolchain.distill", "knowledge distillation of a student from a teacher with ModelOpt"),
    "quantize": ("toolchain.quantize", "ModelOpt FP8 / INT8-SmoothQuant / INT4-AWQ quantization"),
    "export": ("toolchain.export", "export a model as a HF unified, TensorRT-LLM or ONNX checkpoint"),
    "validate-checkpoint": ("toolchain.trtllm_checkpoint", "check a TensorRT-LLM checkpoint directory"),
    "build": ("toolchain.build", "quantize, export and build an engine as an engine profile says"),
    "serve": ("toolchain.serve", "serve an engine through a real Triton Inference Server"),
    "generate": ("toolchain.generate", "generate text from a running Triton server"),
    "search": ("toolchain.search", "architecture search under a parameter, memory, speedup or latency budget, with the Pareto front"),
    "bench": ("toolchain.bench.harness", "students against their teacher on any backend: latency, throughput, the physical bound, GPU projections"),
    "run": ("toolchain.pipeline", "run a recipe end to end: teacher, students, distillation, export, engine"),
}


def build_parser(argv: list[str]) -> ArgumentParser:
    """All subcommands with their help; only the one named in argv gets its flags (and imports its module)."""
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = ArgumentParser(prog="minitron", description="Minitron pruning, distillation and deployment of Llama-family models.")
    parser.add_argument("--version", action="version", version=f"minitron-toolchain {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        subparser.set_defaults(module_name=module_name)
        if name == chosen:
            importlib.import_module(module_name).configure_parser(subparser)
    return parser


def interrupt_on_sigterm(signum, frame) -> None:
    """SIGTERM takes the Ctrl-C path: temporary outputs are removed and training writes a checkpoint."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.subcommand is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, interrupt_on_sigterm)
    module = importlib.import_module(args.module_name)
    try:
        with settings_named_by(flag_of):
            return module.command(args) or 0
    except UserError as exc:
        print(f"minitron {args.subcommand}: error: {str(exc).replace(chr(10), ' | ')}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print(f"minitron {args.subcommand}: interrupted{getattr(module, 'INTERRUPT_HINT', '')}", file=sys.stderr)
        return 130
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
