"""Losses shared by training, evaluation, importance and distillation.

Next-token negative log-likelihood of packed rows: position t of a row predicts token t+1, so the last
position of a row predicts nothing.

Logit losses in chunks of tokens (`chunked_token_mean`): a per-token loss of the student's logits is
computed from its final hidden states and its `lm_head` weight a few hundred tokens at a time, with its
gradient, so neither the student's [batch, seq, vocab] logits nor any softmax, log-softmax, pointwise
product or gradient of that size ever exists; per chunk, [chunk, vocab] does. At Llama-3's 128,256-token
vocabulary and 4,096-token sequences one float32 [seq, vocab] copy is 2 GiB per sequence, so this
decides what fits on a GPU.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each position's prediction of the next token, in float32: mean (a loss) or sum (for exact totals)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten().to(logits.device), reduction=reduction)


class ChunkedTokenMean(torch.autograd.Function):
    """Mean over tokens of `token_loss(hidden_chunk @ weight.T, *target_chunks)`, chunk by chunk, gradients computed in the forward
    (`weight` None: `hidden` are the logits already, e.g. under FSDP, whose sharded head weight the loss cannot use).

    For each chunk the logits are formed, the loss is differentiated with respect to them on the spot
    (a small local graph), and that gradient is turned into the gradients of the hidden states
    ([tokens, hidden]) and of the weight ([vocab, hidden]) before the next chunk; the backward only
    scales them. The matmuls are those of an ordinary lm_head forward and backward: nothing is recomputed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, token_loss, chunk_tokens, *targets):
        lead = hidden.dim() - 1
        flat = hidden.reshape(-1, hidden.shape[-1])
        targets = [target.flatten(0, lead - 1) if lead > 1 else target for target in targets]
        tokens = flat.shape[0]
        needs_hidden, needs_weight = ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(flat) if needs_hidden else None
        grad_weight = torch.zeros_like(weight) if needs_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, tokens, chunk_tokens):
            end = min(start + chunk_tokens, tokens)
            chunk = flat[start:end]
            logits = (chunk @ weight.T if weight is not None else chunk).detach().float().requires_grad_(needs_hidden or needs_weight)
            with torch.enable_grad():
                loss = token_loss(logits, *(target[start:end] for target in targets)).sum()
            if needs_hidden or needs_weight:
                grad_logits = torch.autograd.grad(loss, logits)[0]
                if weight is None:
                    grad_hidden[start:end] = grad_logits
                else:
                    grad_logits = grad_logits.to(weight.dtype)
                    if needs_hidden:
                        grad_hidden[start:end] = grad_logits @ weight
                    if needs_weight:
                        grad_weight.addmm_(grad_logits.T, chunk.to(grad_weight.dtype))
                del grad_logits
            total += loss.detach()
        for grad in (grad_hidden, grad_weight):
            if grad is not None:
                grad.div_(tokens)
        ctx.grads, ctx.shape, ctx.targets = (grad_hidden, grad_weight), hidden.shape, len(targets)
        return total / tokens

    @staticmethod
    def backward(ctx, grad_output):
        (grad_hidden, grad_weight), ctx.grads = ctx.grads, None
        scale = grad_output.to(torch.float32)
        grad_hidden = grad_hidden.mul_(scale).view(ctx.shape) if grad_hidden is not None else None
        grad_weight = grad_weight.mul_(scale) if grad_weight is not None else None
        return (grad_hidden, grad_weight, None, None, *([None] * ctx.targets))


def chunked_token_mean(hidden: torch.Tensor, weight: torch.Tensor | None, token_loss: Callable[..., torch.Tensor], *targets: torch.Tensor,
                       chunk_tokens: int = 128) -> torch.Tensor:
    """Mean over the tokens of `hidden` ([..., hidden]) of `token_loss` on the logits `hidden @ weight.T`; `targets` share the leading dims.

    `token_loss(logits_chunk [n, vocab] float32, *target_chunks)` returns the loss of each of the n tokens.
    Equal to `token_loss(hidden @ weight.T, *targets).mean()` in value and gradients, with [chunk_tokens, vocab] temporaries.
    """
    return ChunkedTokenMean.apply(hidden, weight, token_loss, chunk_tokens, *targets)


def chunked_next_token_nll(hidden: torch.Tensor, weight: torch.Tensor | None, input_ids: torch.Tensor, chunk_tokens: int = 128) -> torch.Tensor:
    """`next_token_nll` (mean) of the logits `hidden @ weight.T`, in chunks of tokens: the same value and gradients."""
    labels = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], dim=1).to(hidden.device)
    per_token = chunked_token_mean(hidden, weight, lambda logits, target: F.cross_entropy(logits, target, reduction="none"), labels,
                                   chunk_tokens=chunk_tokens)
    return per_token * (labels.numel() / (labels.numel() - labels.shape[0]))  # the mean over the positions that predict a token


class HiddenStatesHead(nn.Module):
    """Stands in for a causal LM's `lm_head` while it trains with chunked losses: passes the final hidden states
    through, so the model's "logits" output is [batch, seq, hidden]; the losses apply `weight` chunk by chunk.
    Holds the head's own weight parameter (same object, same state-dict key, tying kept)."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        if head.bias is not None:
            raise ValueError("chunked logit losses need an lm_head without bias")
        self.weight = head.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


def pass_hidden_states(model: nn.Module, enabled: bool = True) -> HiddenStatesHead | None:
    """Swap `model.lm_head` for a `HiddenStatesHead` (see there); `restore_lm_head` undoes it. Not `enabled`: the model
    keeps its head (its output is logits) and None is returned, which `head_weight` turns into the losses' "logits given"."""
    if enabled:
        model.lm_head = HiddenStatesHead(model.lm_head)
        return model.lm_head
    return None


def head_weight(head: HiddenStatesHead | None) -> torch.Tensor | None:
    """The weight the chunked losses form logits with (read at loss time), or None when the model outputs logits."""
    return head.weight if head is not None else None


def restore_lm_head(model: nn.Module) -> nn.Module:
    """Put back a plain bias-free nn.Linear around the same weight parameter."""
    head = model.lm_head
    if isinstance(head, HiddenStatesHead):
        linear = nn.Linear(head.weight.shape[1], head.weight.shape[0], bias=False, device="meta")
        linear.weight = head.weight
        model.lm_head = linear
    return model


def top_k_kl(student_logits: torch.Tensor, indices: torch.Tensor, log_probs: torch.Tensor, rest_log_mass: torch.Tensor,
             temperature: float = 1.0, tail_samples: int = 0) -> torch.Tensor:
    """Per-token KL(teacher ‖ student) from a sparse teacher: its top-k tokens, and the rest of the vocabulary.

    The teacher is given by `indices` [n, k + m], their log-probabilities `log_probs` [n, k + m] and the log of the
    probability r left outside the top-k `rest_log_mass` [n] (-inf when k covers the vocabulary), all at
    `temperature`. The first k entries are the teacher's top-k tokens. The rest is either one bin (m =
    `tail_samples` = 0), matched by the student's total probability outside the top-k:

        KL = sum_k p_k (log p_k - log q_k) + r (log r - log q_rest)

    the KL of the coarsened distributions, a lower bound of the full KL that leaves the shape of the student's
    tail free; or m tokens drawn from the teacher's distribution outside its top-k (with replacement), each
    standing for r/m of the probability:

        KL ≈ sum_k p_k (log p_k - log q_k) + (r/m) sum_j (log p_j - log q_j)

    an unbiased estimate of the full KL whose gradient, q minus those weights, is an unbiased estimate of the
    full gradient. Both are scaled by T² like the full KL and equal it when k is the vocabulary.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = log_probs.float()
    log_ratio = log_p - log_q.gather(-1, indices.long())
    top_k = log_p.shape[-1] - tail_samples
    kl = (log_p[..., :top_k].exp() * log_ratio[..., :top_k]).sum(-1)
    rest_log_mass = rest_log_mass.float()
    has_rest = torch.isfinite(rest_log_mass)
    if has_rest.any():
        safe_rest = torch.where(has_rest, rest_log_mass, torch.zeros_like(rest_log_mass))
        if tail_samples:
            rest = safe_rest.exp() * log_ratio[..., top_k:].mean(-1)
        else:
            log_q_rest = log_q.scatter(-1, indices.long(), float("-inf")).logsumexp(-1)
            rest = safe_rest.exp() * (safe_rest - log_q_rest)
        kl = kl + torch.where(has_rest, rest, torch.zeros_like(rest))
    return kl * temperature**2
