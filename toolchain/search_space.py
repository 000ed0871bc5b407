"""The candidate architectures of `minitron search`: uniform shapes a teacher can be pruned to, and their sizes.

Every candidate keeps every layer the same shape (TensorRT-LLM rejects mixed widths) and is valid for
transformers (hidden divisible by the query heads) and for GQA (query heads a multiple of the key-value
heads, no more per group than the teacher has). Axis values are hardware-friendly multiples between
`min_fraction` of the teacher's size and the teacher's size (the teacher's own size is always one of
them). Parameters are counted in closed form, so the space of an 8B teacher (millions of shapes) is
enumerated in seconds; the formula equals `models.parameter_counts` (tested). Not here: which
candidates meet a budget and get distilled (toolchain/search.py).
"""

import math
from dataclasses import dataclass

from toolchain.prune.shapes import ModelShape


@dataclass(frozen=True)
class Architecture:
    """What a parameter count depends on besides the shape: vocabulary, tied embeddings, q/k/v biases (Qwen2)."""

    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, config) -> "Architecture":
        return cls(vocab_size=config.vocab_size, tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                   qkv_bias=bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2")


def parameter_count(shape: ModelShape, architecture: Architecture) -> dict[str, int]:
    """Total and non-embedding parameters of a Llama-layout model of `shape` (equal to `models.parameter_counts`)."""
    hidden, heads, kv_heads, width = shape.hidden_size, shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
    attention = 2 * hidden * heads * width + 2 * hidden * kv_heads * width + ((heads + 2 * kv_heads) * width if architecture.qkv_bias else 0)
    layer = attention + 3 * hidden * shape.ffn_hidden_size + 2 * hidden
    embedding = architecture.vocab_size * hidden * (1 if architecture.tied_embeddings else 2)
    non_embedding = shape.num_layers * layer + hidden
    return {"total": non_embedding + embedding, "non_embedding": non_embedding}


def shape_cost(shape: ModelShape, architecture: Architecture, precision):
    """What a token of a model of `shape` costs (bench.bound.ModelCost), from the closed-form counts (no meta model per shape)."""
    from toolchain.bench.bound import ModelCost

    counts = parameter_count(shape, architecture)
    head = architecture.vocab_size * shape.hidden_size
    return ModelCost(layers=shape.num_layers, attention_width=shape.num_attention_heads * shape.head_dim, kv_width=shape.num_key_value_heads * shape.head_dim,
                     layer_parameters=counts["non_embedding"], head_parameters=head, table_parameters=counts["total"] - counts["non_embedding"] - head,
                     precision=precision)


def axis_values(teacher: int, multiple: int, min_fraction: float) -> list[int]:
    """Multiples of `multiple` from `min_fraction` of the teacher's size up to it, and the teacher's size itself."""
    lowest = max(multiple, math.ceil(min_fraction * teacher / multiple) * multiple)
    return sorted({*range(lowest, teacher + 1, multiple), teacher})


def head_layouts(original: ModelShape, search_heads: bool) -> list[tuple[int, int]]:
    """(query heads, key-value heads) pairs: whole GQA groups kept or dropped, the same query heads per kept group."""
    if not search_heads:
        return [(original.num_attention_heads, original.num_key_value_heads)]
    return [(kv_heads * per_group, kv_heads) for kv_heads in range(1, original.num_key_value_heads + 1)
            for per_group in range(1, original.heads_per_group + 1)]


def enumerate_shapes(original: ModelShape, hidden_multiple: int, ffn_multiple: int, layer_step: int, min_fraction: float,
                     search_heads: bool) -> list[ModelShape]:
    """Every valid uniform shape of the space, the teacher's own shape included."""
    layers = sorted({*range(original.num_layers, max(1, math.ceil(min_fraction * original.num_layers)) - 1, -layer_step)})
    shapes = []
    for heads, kv_heads in head_layouts(original, search_heads):
        for hidden in axis_values(original.hidden_size, hidden_multiple, min_fraction):
            if hidden % heads:
                continue  # transformers refuses it (REFERENCE §6)
            for ffn in axis_values(original.ffn_hidden_size, ffn_multiple, min_fraction):
                shapes += [ModelShape(hidden, ffn, heads, kv_heads, original.head_dim, depth) for depth in layers]
    return shapes
