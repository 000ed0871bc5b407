"""The training schedule follows the run's length unless set: warm-up share, decay to min_lr at the last step."""

import pytest

from toolchain.settings import DistillConfig
from toolchain.training import lr_factor, plan_training, rows_of_run


@pytest.mark.parametrize("tokens, steps, warmup", [(65536, 32, 2), (16384, 8, 0), (2_097_152, 1024, 51)])
def test_warm_up_and_decay_follow_the_token_budget_unless_set(tokens, steps, warmup):
    """The README's `minitron distill ... --tokens 65536` (global batch 8 x 256 tokens): 32 steps, 2 of warm-up, cosine to min_lr at the end."""
    config = DistillConfig(tokens=tokens, lr=3e-4, min_lr=3e-5)
    plan = plan_training(config, train_rows=4096, seq_len=256, world_size=1)
    assert plan.total_steps == steps and config.warmup_for(steps) == warmup
    factors = [lr_factor(step, steps, warmup, config) for step in range(steps + 1)]
    assert factors[warmup] == pytest.approx(1.0)  # the peak is reached when the warm-up ends
    assert all(a >= b for a, b in zip(factors[warmup:], factors[warmup + 1:]))  # then only decays
    assert factors[-1] == pytest.approx(0.1)  # min_lr / lr, reached at the end of the run
    assert sum(f > 0.5 for f in factors) >= steps // 3  # most of the run trains near its peak, not under a warm-up


def test_an_explicit_warm_up_is_kept_and_capped_by_the_run():
    assert DistillConfig(tokens=65536, warmup_steps=40).warmup_for(32) == 32
    assert DistillConfig(tokens=65536, warmup_steps=5).warmup_for(32) == 5


def test_rows_of_run_are_the_rows_the_loop_reads():
    from toolchain.training import global_batch_indices

    config = DistillConfig(steps=5, global_batch_size=8, seed=3)
    read = sorted({int(i) for step in range(5) for i in global_batch_indices(100, step, 8, 3)})
    assert rows_of_run(config, 100, 256, 1).tolist() == read
    assert rows_of_run(DistillConfig(steps=13, global_batch_size=8), 100, 256, 1).tolist() == list(range(100))  # beyond one epoch: all
