"""Importing NVIDIA ModelOpt here: its modules, without the warnings this toolchain has checked and expects.

ModelOpt 0.47 warns on import that transformers 5.x is untested; distillation, quantization and both
exports were checked with it (REFERENCE §2). Warnings ModelOpt raises during expected use are listed
once here, so every stage filters the same ones.
"""

import contextlib
import importlib
import warnings

UNTESTED_TRANSFORMERS = r".*transformers .* is not tested with current version of modelopt.*"
EXPECTED_WARNINGS = (
    UNTESTED_TRANSFORMERS,
    r".*do not sum to 1\.0.*",  # StaticLossBalancer without an LM loss: the KD weights are normalised by the caller
    r".*already has an intermediate output stored.*",  # gradient checkpointing re-runs ModelOpt's capture hooks in backward
)


@contextlib.contextmanager
def expected_modelopt_warnings():
    """Silence the ModelOpt warnings that expected use raises (and only those)."""
    with warnings.catch_warnings():
        for message in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


def modelopt(module: str):
    """`modelopt.torch.<module>` (distill, quantization, opt, export, utils), imported without its expected warnings."""
    with expected_modelopt_warnings():
        return importlib.import_module(f"modelopt.torch.{module}")
