"""The search space: closed-form parameter counts, valid uniform shapes, the published Minitron shapes inside it."""

import pytest
from conftest import tiny_config
from test_prune import llama_3_1_8b_config

from toolchain.models import parameter_counts
from toolchain.prune.shapes import ModelShape, pruned_config
from toolchain.search_space import Architecture, axis_values, enumerate_shapes, parameter_count


@pytest.mark.parametrize("architecture,tied", [("llama", False), ("llama", True), ("qwen2", False), ("mistral", False)])
def test_closed_form_counts_equal_the_meta_model(architecture, tied):
    config = tiny_config(architecture, tie_word_embeddings=tied)
    original = ModelShape.from_config(config)
    for shape in enumerate_shapes(original, 16, 32, 1, 0.5, search_heads=True)[::7]:
        assert parameter_count(shape, Architecture.from_config(config)) == parameter_counts(pruned_config(config, shape, list(range(shape.num_layers))))


def test_axis_values_are_multiples_and_keep_the_teacher_size():
    assert axis_values(576, 64, 0.5) == [320, 384, 448, 512, 576]
    assert axis_values(1536, 128, 0.5) == list(range(768, 1537, 128))
    assert axis_values(100, 64, 0.1) == [64, 100]


def test_every_shape_is_valid_for_transformers_and_gqa():
    original = ModelShape(hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64, num_layers=30)
    shapes = enumerate_shapes(original, 32, 64, 1, 0.5, search_heads=True)
    assert original in shapes and len(shapes) == len(set(shapes))
    for shape in shapes:
        assert shape.hidden_size % shape.num_attention_heads == 0 and shape.num_attention_heads % shape.num_key_value_heads == 0
        assert shape.heads_per_group <= 3 and 15 <= shape.num_layers <= 30 and shape.head_dim == 64
    assert {(s.num_attention_heads, s.num_key_value_heads) for s in shapes} == {(k * g, k) for k in (1, 2, 3) for g in (1, 2, 3)}
    assert not any(s.num_attention_heads == 9 and s.hidden_size % 9 for s in shapes)


def test_llama_3_1_8b_space_holds_the_published_4b_shapes():
    """Meta-free: the space of the real Llama-3.1-8B config contains 4B-Width and 4B-Depth at 4.5B parameters (arXiv 2408.11796)."""
    config = llama_3_1_8b_config()
    original = ModelShape.from_config(config)
    shapes = enumerate_shapes(original, 128, 128, 1, 0.5, search_heads=True)
    assert len(shapes) > 100_000
    width = ModelShape(3072, 9216, 32, 8, 128, 32)
    depth = ModelShape(4096, 14336, 32, 8, 128, 16)
    assert width in shapes and depth in shapes
    architecture = Architecture.from_config(config)
    assert parameter_count(width, architecture)["total"] == 4_512_746_496
    assert parameter_count(depth, architecture)["total"] == 4_540_469_248
