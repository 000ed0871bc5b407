"""Losses shared by training, evaluation, importance and distillation.

Next-token negative log-likelihood of packed rows: position t of a row predicts token t+1, so the last
position of a row predicts nothing.

Logit losses in chunks of tokens (`chunked_token_mean`): a per-token loss of [tokens, vocab] logits is
computed a few hundred tokens at a time, and its gradient with it, so no softmax, log-softmax or
elementwise product over the whole [batch, seq, vocab] exists at once; only the logits themselves and
the one gradient buffer they need anyway do. At Llama-3's 128,256-token vocabulary and 4,096-token
sequences one float32 copy is 2 GiB per sequence, so this decides what fits on a GPU.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each position's prediction of the next token, in float32: mean (a loss) or sum (for exact totals)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten().to(logits.device), reduction=reduction)


def chunked_next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, chunk_tokens: int = 256) -> torch.Tensor:
    """`next_token_nll` (mean) in chunks of tokens: the same value and gradient without whole-batch float32 copies."""
    labels = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], dim=1).to(logits.device)
    per_token = chunked_token_mean(logits, lambda chunk, target: F.cross_entropy(chunk, target, reduction="none"), labels, chunk_tokens=chunk_tokens)
    return per_token * (labels.numel() / (labels.numel() - labels.shape[0]))  # the mean over the positions that predict a token


class ChunkedTokenMean(torch.autograd.Function):
    """Mean over tokens of `token_loss(logits_chunk, *target_chunks)`, chunk by chunk, gradient computed in the forward.

    Each chunk's loss is differentiated on the spot (a small local graph) and its gradient written into
    one buffer shaped like the logits; the backward only scales that buffer. So the peak is the logits,
    the teacher's target and that buffer, plus a chunk's temporaries.
    """

    @staticmethod
    def forward(ctx, logits, token_loss, chunk_tokens, *targets):
        lead = logits.dim() - 1
        flat = logits.reshape(-1, logits.shape[-1])
        targets = [target.flatten(0, lead - 1) if lead > 1 else target for target in targets]
        tokens = flat.shape[0]
        grad = torch.empty_like(flat) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, tokens, chunk_tokens):
            end = min(start + chunk_tokens, tokens)
            piece = flat[start:end].detach().float().requires_grad_(grad is not None)
            with torch.enable_grad():
                loss = token_loss(piece, *(target[start:end] for target in targets)).sum()
            if grad is not None:
                grad[start:end] = torch.autograd.grad(loss, piece)[0]
            total += loss.detach()
        if grad is not None:
            grad.div_(tokens)
        ctx.grad, ctx.shape, ctx.targets = grad, logits.shape, len(targets)
        return total / tokens

    @staticmethod
    def backward(ctx, grad_output):
        grad, ctx.grad = ctx.grad, None
        return (grad.mul_(grad_output.to(grad.dtype)).view(ctx.shape), None, None, *([None] * ctx.targets))


def chunked_token_mean(logits: torch.Tensor, token_loss: Callable[..., torch.Tensor], *targets: torch.Tensor, chunk_tokens: int = 256) -> torch.Tensor:
    """Mean of `token_loss` over the tokens of `logits` ([..., vocab]); `targets` are aligned on the same leading dims.

    `token_loss(logits_chunk [n, vocab] float32, *target_chunks)` returns the loss of each of the n tokens.
    Equal to `token_loss(logits, *targets).mean()` in value and gradient, with bounded temporaries.
    """
    return ChunkedTokenMean.apply(logits, token_loss, chunk_tokens, *targets)


def top_k_kl(student_logits: torch.Tensor, indices: torch.Tensor, log_probs: torch.Tensor, rest_log_mass: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL(teacher ‖ student) over k+1 bins: the teacher's top-k tokens and the rest of the vocabulary as one bin.

    The teacher is given by `indices` [n, k], their log-probabilities `log_probs` [n, k] and the log of the
    probability left to the other tokens `rest_log_mass` [n] (-inf when k covers the vocabulary), all at
    `temperature`. The student's bins are its probabilities of those k tokens and the sum of the rest:

        KL = sum_k p_k (log p_k - log q_k) + r (log r - log q_rest),   scaled by T² like the full KL.

    With k = vocabulary this is the full KL; for k < vocabulary it is the KL of the coarsened
    distributions, a lower bound of the full KL that is exact on the k tokens' share.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = log_probs.float()
    indices = indices.long()
    log_q_top = log_q.gather(-1, indices)
    top = (log_p.exp() * (log_p - log_q_top)).sum(-1)
    rest_log_mass = rest_log_mass.float()
    has_rest = torch.isfinite(rest_log_mass)
    if has_rest.any():
        log_q_rest = log_q.scatter(-1, indices, float("-inf")).logsumexp(-1)
        safe_rest = torch.where(has_rest, rest_log_mass, torch.zeros_like(rest_log_mass))
        rest = torch.where(has_rest, safe_rest.exp() * (safe_rest - log_q_rest), torch.zeros_like(rest_log_mass))
        top = top + rest
    return top * temperature**2
