"""Chunked logit losses against their whole-batch definitions, and the top-k KL on hand-made distributions."""

import math

import pytest
import torch
import torch.nn.functional as F

from toolchain.distill import TokenKLLoss
from toolchain.losses import HiddenStatesHead, chunked_next_token_nll, chunked_token_mean, next_token_nll, restore_lm_head, top_k_kl
from toolchain.modelopt_compat import modelopt


def head_and_hidden(batch=3, seq=10, hidden=12, vocab=50, seed=0):
    """Final hidden states and an lm_head (its logits are hidden @ weight.T), both requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, seq, hidden, generator=generator).requires_grad_()
    linear = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(vocab, hidden, generator=generator))
    return states, linear


def logits_pair(batch=3, seq=10, vocab=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, vocab, generator=generator).mul(3)
    teacher = torch.randn(batch, seq, vocab, generator=generator).mul(3)
    return student, teacher


@pytest.mark.parametrize("chunk_tokens", [1, 7, 30, 1000])
def test_chunked_kl_equals_modelopts_whole_batch_kl_in_value_and_gradients(chunk_tokens):
    states, linear = head_and_hidden()
    teacher = torch.randn(3, 10, 50, generator=torch.Generator().manual_seed(5)).mul(3)
    reference = modelopt("distill").LogitsDistillationLoss(temperature=2.0, reduction="none")(linear(states), teacher).mean()
    expected = torch.autograd.grad(reference, [states, linear.weight])
    chunked = TokenKLLoss(temperature=2.0, chunk_tokens=chunk_tokens, student_head=HiddenStatesHead(linear))(states, teacher)
    grads = torch.autograd.grad(chunked * 3, [states, linear.weight])  # an upstream factor (the loss weight) reaches the gradients
    assert chunked.item() == pytest.approx(reference.item(), rel=1e-5)
    for grad, reference_grad in zip(grads, expected):
        torch.testing.assert_close(grad, 3 * reference_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk_tokens", [3, 1000])
def test_chunked_kl_from_both_sides_hidden_states_equals_the_whole_batch_kl(chunk_tokens):
    """The teacher's head fused too: its logits are formed chunk by chunk from its hidden states, never whole."""
    states, linear = head_and_hidden()
    teacher_states, teacher_linear = head_and_hidden(seed=7)
    reference = modelopt("distill").LogitsDistillationLoss(temperature=2.0, reduction="none")(linear(states), teacher_linear(teacher_states)).mean()
    expected = torch.autograd.grad(reference, [states, linear.weight])
    chunked = TokenKLLoss(2.0, chunk_tokens, HiddenStatesHead(linear), HiddenStatesHead(teacher_linear))(states, teacher_states)
    grads = torch.autograd.grad(chunked, [states, linear.weight, teacher_states, teacher_linear.weight], allow_unused=True)
    assert chunked.item() == pytest.approx(reference.item(), rel=1e-5)
    for grad, reference_grad in zip(grads, expected):
        torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-6)
    assert grads[2] is None and grads[3] is None  # nothing flows into the teacher


def test_chunked_next_token_nll_equals_the_whole_batch_one():
    states, linear = head_and_hidden()
    input_ids = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(1))
    reference = next_token_nll(linear(states), input_ids)
    expected = torch.autograd.grad(reference, [states, linear.weight])
    chunked = chunked_next_token_nll(states, linear.weight, input_ids, chunk_tokens=4)
    grads = torch.autograd.grad(chunked, [states, linear.weight])
    assert chunked.item() == pytest.approx(reference.item(), rel=1e-5)
    for grad, reference_grad in zip(grads, expected):
        torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-6)


def test_chunked_mean_without_gradient_is_only_the_value():
    states, linear = head_and_hidden()
    target = torch.randn(3, 10, 50)
    with torch.no_grad():
        value = chunked_token_mean(states, linear.weight, lambda logits, t: (logits - t).square().sum(-1), target, chunk_tokens=4)
        expected = (linear(states) - target).square().sum(-1).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_kd_step_of_a_tiny_model_equals_the_whole_batch_losses(make_tiny_model):
    """Through ModelOpt's distillation model (chunks of 5 tokens): loss and every student gradient agree with ModelOpt's
    whole-batch logit KL plus the whole-batch LM loss on a plain copy of the student; the exported student gets its lm_head back."""
    from transformers import AutoModelForCausalLM

    from toolchain.distill import build_distillation
    from toolchain.settings import DistillConfig

    teacher_dir, student_dir = make_tiny_model("teacher", seed=0), make_tiny_model("student", seed=1, num_hidden_layers=2)
    input_ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(2))
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)

    plain = AutoModelForCausalLM.from_pretrained(student_dir).train()
    logits = plain(input_ids=input_ids).logits
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids).logits
    kl = modelopt("distill").LogitsDistillationLoss(temperature=1.0, reduction="none")(logits, teacher_logits).mean()
    lm_loss = next_token_nll(logits, input_ids)
    ((kl * 2 + lm_loss) / 3).backward()  # logit weight 1, LM weight 0.5: their weighted mean

    config = DistillConfig(steps=1, loss_chunk_tokens=5, lm_loss_weight=0.5)
    student = AutoModelForCausalLM.from_pretrained(student_dir).train()
    model, compute_loss = build_distillation(teacher, student, config, [])
    assert isinstance(teacher.lm_head, HiddenStatesHead)  # the teacher's logits, too, exist only chunk by chunk
    losses = compute_loss(model, input_ids)
    losses["loss"].backward()
    assert losses["logit_kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert losses["lm_loss"].item() == pytest.approx(lm_loss.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(((kl * 2 + lm_loss) / 3).item(), rel=1e-5)
    expected = dict(plain.named_parameters())
    trained = {name: p for name, p in student.named_parameters() if not name.startswith("_teacher_model.")}
    assert trained.keys() == expected.keys()
    for name, parameter in trained.items():
        torch.testing.assert_close(parameter.grad, expected[name].grad, rtol=1e-4, atol=1e-6)

    exported = restore_lm_head(modelopt("distill").export(model))
    assert type(exported.lm_head) is torch.nn.Linear
    torch.testing.assert_close(exported(input_ids=input_ids).logits, logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(restore_lm_head(teacher)(input_ids=input_ids).logits, teacher_logits)


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
    student, teacher = student[0], teacher[0]
    log_p = F.log_softmax(teacher / 2.0, -1)
    order = log_p.argsort(-1, descending=True)
    everything = top_k_kl(student, order, log_p.gather(-1, order), torch.full((6,), -math.inf), temperature=2.0)
    torch.testing.assert_close(everything, full_kl(student, teacher, 2.0), rtol=1e-5, atol=1e-6)
    top = order[:, :5]
    rest = torch.log1p(-log_p.gather(-1, top).exp().sum(-1))
    partial = top_k_kl(student, top, log_p.gather(-1, top), rest, temperature=2.0)
    assert (partial <= full_kl(student, teacher, 2.0) + 1e-6).all() and (partial > 0).all()


def test_top_k_kl_with_sampled_tail_matches_its_definition_on_hand_made_distributions():
    p = [0.5, 0.3, 0.15, 0.05]
    q = [0.1, 0.2, 0.3, 0.4]
    student_logits = torch.tensor([[math.log(x) for x in q]])
    # top-2 (tokens 0 and 1), then 3 tail samples (2, 3, 2), each standing for 0.2 / 3 of the mass
    indices = torch.tensor([[0, 1, 2, 3, 2]])
    loss = top_k_kl(student_logits, indices, torch.log(torch.tensor([[p[i] for i in indices[0]]])), torch.tensor([math.log(0.2)]), tail_samples=3)
    by_hand = 0.5 * math.log(0.5 / 0.1) + 0.3 * math.log(0.3 / 0.2) + 0.2 / 3 * (2 * math.log(0.15 / 0.3) + math.log(0.05 / 0.4))
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_kl_with_a_sampled_tail_is_unbiased_in_value_and_gradient(temperature):
    """Averaged over every possible tail draw (m = 1, token j with probability p_j / r), loss and gradient are the full KL's."""
    student, teacher = logits_pair(batch=1, seq=4, vocab=12)
    student, teacher = student[0].requires_grad_(), teacher[0]
    log_p = F.log_softmax(teacher / temperature, -1)
    order = log_p.argsort(-1, descending=True)
    top, tail = order[:, :3], order[:, 3:]
    rest = log_p.gather(-1, tail).logsumexp(-1)
    expected_loss, expected_grad = torch.zeros(4), torch.zeros_like(student)
    for column in range(tail.shape[1]):
        drawn = torch.cat([top, tail[:, column : column + 1]], dim=-1)
        chance = (log_p.gather(-1, drawn[:, -1:]).squeeze(-1) - rest).exp()  # of drawing this tail token, per position
        loss = top_k_kl(student, drawn, log_p.gather(-1, drawn), rest, temperature=temperature, tail_samples=1)
        (grad,) = torch.autograd.grad((loss * chance).sum(), student)
        expected_loss, expected_grad = expected_loss + loss.detach() * chance, expected_grad + grad
    full = full_kl(student, teacher, temperature)
    (full_grad,) = torch.autograd.grad(full.sum(), student)
    torch.testing.assert_close(expected_loss, full.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(expected_grad, full_grad, rtol=1e-5, atol=1e-6)


def test_chunked_kl_of_given_logits_equals_the_whole_batch_kl():
    """Without a fused head (under FSDP the student outputs logits): the chunks are of the logits themselves."""
    student, teacher = logits_pair()
    student.requires_grad_()
    reference = modelopt("distill").LogitsDistillationLoss(temperature=1.0, reduction="none")(student, teacher).mean()
    (expected,) = torch.autograd.grad(reference, student)
    chunked = TokenKLLoss(temperature=1.0, chunk_tokens=7, student_head=None)(student, teacher)
    (grad,) = torch.autograd.grad(chunked, student)
    assert chunked.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7)
