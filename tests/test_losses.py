"""Chunked logit losses against their whole-batch definitions, and the top-k KL on hand-made distributions."""

import math

import pytest
import torch
import torch.nn.functional as F

from toolchain.distill import TokenKLLoss
from toolchain.losses import chunked_next_token_nll, chunked_token_mean, next_token_nll, top_k_kl
from toolchain.modelopt_compat import modelopt


def logits_pair(batch=3, seq=10, vocab=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, vocab, generator=generator, dtype=torch.float64).float().mul(3).requires_grad_()
    teacher = torch.randn(batch, seq, vocab, generator=generator).mul(3)
    return student, teacher


@pytest.mark.parametrize("chunk_tokens", [1, 7, 30, 1000])
def test_chunked_kl_equals_modelopts_whole_batch_kl_in_value_and_gradient(chunk_tokens):
    student, teacher = logits_pair()
    reference = modelopt("distill").LogitsDistillationLoss(temperature=2.0, reduction="none")(student, teacher).mean()
    (expected_grad,) = torch.autograd.grad(reference, student)
    chunked = TokenKLLoss(temperature=2.0, chunk_tokens=chunk_tokens)(student, teacher)
    (grad,) = torch.autograd.grad(chunked * 3, student)  # an upstream factor (the loss weight) reaches the gradient
    assert chunked.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(grad, 3 * expected_grad, rtol=1e-5, atol=1e-8)


def test_chunked_next_token_nll_equals_the_whole_batch_one():
    student, _ = logits_pair(vocab=40)
    input_ids = torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(1))
    reference = next_token_nll(student, input_ids)
    (expected_grad,) = torch.autograd.grad(reference, student)
    chunked = chunked_next_token_nll(student, input_ids, chunk_tokens=4)
    (grad,) = torch.autograd.grad(chunked, student)
    assert chunked.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-8)


def test_chunked_mean_without_gradient_is_only_the_value():
    student, teacher = logits_pair()
    with torch.no_grad():
        value = chunked_token_mean(student, lambda s, t: (s - t).square().sum(-1), teacher, chunk_tokens=4)
    assert value.item() == pytest.approx((student - teacher).square().sum(-1).mean().item(), rel=1e-6)


def test_chunked_kd_trains_a_tiny_model_exactly_like_the_whole_batch_loss(make_tiny_model):
    """Through ModelOpt's distillation model: loss and every student gradient agree for chunked and unchunked logit KL."""
    from transformers import AutoModelForCausalLM

    from toolchain.distill import build_distillation
    from toolchain.settings import DistillConfig

    teacher_dir, student_dir = make_tiny_model("teacher", seed=0), make_tiny_model("student", seed=1, num_hidden_layers=2)
    input_ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(2))
    results = []
    for chunk_tokens in (5, 10_000):
        config = DistillConfig(steps=1, loss_chunk_tokens=chunk_tokens, lm_loss_weight=0.5)
        student = AutoModelForCausalLM.from_pretrained(student_dir).train()
        model, compute_loss = build_distillation(AutoModelForCausalLM.from_pretrained(teacher_dir), student, config, [])
        losses = compute_loss(model, input_ids)
        losses["loss"].backward()
        results.append((losses, {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}))
    (chunked, chunked_grads), (whole, whole_grads) = results
    for name in ("loss", "logit_kl", "lm_loss"):
        assert chunked[name].item() == pytest.approx(whole[name].item(), rel=1e-6), name
    assert chunked_grads.keys() == whole_grads.keys() and len(whole_grads) > 5
    for name in whole_grads:
        torch.testing.assert_close(chunked_grads[name], whole_grads[name], rtol=1e-4, atol=1e-7)


def full_kl(student_logits, teacher_logits, temperature=1.0):
    log_q = F.log_softmax(student_logits / temperature, -1)
    log_p = F.log_softmax(teacher_logits / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2


def test_top_k_kl_matches_its_definition_on_hand_made_distributions():
    p = [0.5, 0.3, 0.15, 0.05]
    q = [0.1, 0.2, 0.3, 0.4]
    student_logits = torch.tensor([[math.log(x) for x in q]])
    # top-2 of the teacher (tokens 0 and 1), rest mass 0.2 against the student's 0.7 on tokens 2 and 3
    loss = top_k_kl(student_logits, torch.tensor([[0, 1]]), torch.tensor([[math.log(0.5), math.log(0.3)]]), torch.tensor([math.log(0.2)]))
    by_hand = 0.5 * math.log(0.5 / 0.1) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.7)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    # the order of the k tokens does not matter; a token the student gives more than the teacher lowers nothing below 0
    swapped = top_k_kl(student_logits, torch.tensor([[1, 0]]), torch.tensor([[math.log(0.3), math.log(0.5)]]), torch.tensor([math.log(0.2)]))
    assert swapped.item() == pytest.approx(by_hand, rel=1e-6)
    # k = vocabulary (no rest, log-mass -inf): the full KL
    full = top_k_kl(student_logits, torch.tensor([[2, 0, 3, 1]]), torch.log(torch.tensor([[0.15, 0.5, 0.05, 0.3]])), torch.tensor([-math.inf]))
    assert full.item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-6)
    # equal distributions: 0
    same = top_k_kl(torch.log(torch.tensor([p])), torch.tensor([[0, 1]]), torch.log(torch.tensor([[0.5, 0.3]])), torch.tensor([math.log(0.2)]))
    assert abs(same.item()) < 1e-6


def test_top_k_kl_is_the_full_kl_at_k_equal_vocabulary_with_temperature_and_a_lower_bound_below():
    student, teacher = logits_pair(batch=1, seq=6, vocab=30)
    student, teacher = student[0].detach(), teacher[0]
    log_p = F.log_softmax(teacher / 2.0, -1)
    order = log_p.argsort(-1, descending=True)
    everything = top_k_kl(student, order, log_p.gather(-1, order), torch.full((6,), -math.inf), temperature=2.0)
    torch.testing.assert_close(everything, full_kl(student, teacher, 2.0), rtol=1e-5, atol=1e-6)
    top = order[:, :5]
    rest = torch.log1p(-log_p.gather(-1, top).exp().sum(-1))
    partial = top_k_kl(student, top, log_p.gather(-1, top), rest, temperature=2.0)
    assert (partial <= full_kl(student, teacher, 2.0) + 1e-6).all() and (partial > 0).all()
