"""Budgets of `minitron search`: parsing, tolerance, the survivors that cannot grow, the nearest miss, spreading."""

import pytest

from toolchain.errors import UserError
from toolchain.prune.shapes import ModelShape
from toolchain.search_budget import nearest_miss, parse_budget, spread, survivors
from toolchain.search_space import Architecture, enumerate_shapes, parameter_count


@pytest.mark.parametrize("text, kind, value, relative", [
    ("params=4.5B", "params", 4.5e9, False), ("params=50%", "params", 0.5, True), ("non_embedding=50%", "non_embedding", 0.5, True),
    ("memory=9GiB", "memory", 9 * 2**30, False), ("memory=512MB", "memory", 512e6, False), ("speedup=1.8x", "speedup", 1.8, False),
    ("latency=20ms", "latency", 0.02, False), ("params=135000000", "params", 135e6, False),
])
def test_budgets_parse(text, kind, value, relative):
    budget = parse_budget(text)
    assert (budget.kind, budget.relative) == (kind, relative) and budget.value == pytest.approx(value)


@pytest.mark.parametrize("text, message", [
    ("flops=3T", "unknown budget kind 'flops'"), ("params=lots", "cannot read"), ("speedup=50%", "cannot read"),
    ("memory=9", "cannot read"), ("latency=0ms", "must be positive"),
])
def test_bad_budgets_name_the_forms(text, message):
    with pytest.raises(UserError, match=message):
        parse_budget(text)


def test_tolerance_and_direction():
    params, speedup = parse_budget("params=4.5B"), parse_budget("speedup=1.8x")
    assert params.meets(4.54e9, params.limit(None), 0.01) and not params.meets(4.6e9, params.limit(None), 0.01)
    assert speedup.meets(1.79, 1.8, 0.01) and not speedup.meets(1.7, 1.8, 0.01)
    assert parse_budget("params=50%").limit(8e9) == 4e9


SMOL = ModelShape(hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64, num_layers=30)
SMOL_ARCH = Architecture(vocab_size=49152, tied_embeddings=True, qkv_bias=False)


def test_survivors_are_within_the_budget_and_cannot_grow():
    shapes = enumerate_shapes(SMOL, 64, 128, 1, 0.5, search_heads=False)
    count = lambda shape: parameter_count(shape, SMOL_ARCH)["non_embedding"]  # noqa: E731
    budget = parse_budget("non_embedding=50%")
    limit = budget.limit(count(SMOL))
    kept = survivors(shapes, count, budget, limit, 0.01)
    assert kept and all(count(shape) <= 1.01 * limit for shape in kept)
    within = {shape for shape in shapes if count(shape) <= 1.01 * limit}
    for shape in kept:  # no single step up stays within
        for axis, step in (("hidden_size", 64), ("ffn_hidden_size", 128), ("num_layers", 1)):
            bigger = ModelShape(**{**shape.to_dict(), axis: getattr(shape, axis) + step})
            assert bigger not in within
    depth_only = ModelShape(576, 1536, 9, 3, 64, 15)
    assert depth_only in kept  # 15 of 30 layers is half (the final norm a hair over, within 1%); 16 is over


def test_no_candidate_meets_the_budget_names_the_nearest():
    shapes = enumerate_shapes(SMOL, 64, 128, 1, 0.5, search_heads=False)
    count = lambda shape: parameter_count(shape, SMOL_ARCH)["total"]  # noqa: E731
    budget = parse_budget("params=10M")
    assert survivors(shapes, count, budget, budget.limit(None), 0.01) == []
    nearest, value = nearest_miss(shapes, count, budget, budget.limit(None))
    assert value == min(count(shape) for shape in shapes) and nearest.num_layers == 15


def test_spread_keeps_the_ends_and_evenly_spaced_picks():
    values = list(range(10))
    assert spread(values, 4, key=float) == [0, 3, 6, 9]
    assert spread(values, 20, key=float) == values
