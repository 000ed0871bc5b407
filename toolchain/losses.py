"""Losses shared by training, evaluation and importance: next-token negative log-likelihood of packed rows.

Position t of a packed row predicts token t+1, so the last position of a row predicts nothing.
"""

import torch
import torch.nn.functional as F


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each position's prediction of the next token, in float32: mean (a loss) or sum (for exact totals)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten().to(logits.device), reduction=reduction)
