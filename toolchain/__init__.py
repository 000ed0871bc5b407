"""minitron-toolchain: Minitron pruning and distillation of Llama-family models, and their deployment."""

__version__ = "0.1.0"
