"""Shapes of a model before and after pruning: target validation, the pruned config, parameter counts.

Nothing here touches weights: configs are checked as transformers would check them and parameter counts
come from a model built on the meta device, so the logic runs on an 8B config in a second. Not here:
which channels to keep (importance.py) or how tensors are cut (slicing.py).
"""

import copy
from dataclasses import asdict, dataclass

from toolchain.errors import UserError, setting
from toolchain.models import head_dim
from toolchain.settings import PRUNE_TARGETS, PruneConfig


@dataclass(frozen=True)
class ModelShape:
    """The axes Minitron prunes; every decoder layer has the same shape."""

    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_layers: int

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        heads = config.num_attention_heads
        return cls(
            hidden_size=config.hidden_size,
            ffn_hidden_size=config.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim(config),
            num_layers=config.num_hidden_layers,
        )

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def to_dict(self) -> dict:
        return asdict(self)


# PruneConfig targets that name a ModelShape axis (drop_layers is the explicit form of num_layers).
SHAPE_TARGETS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_key_value_heads", "num_layers")


def parse_layer_list(spec: str, num_layers: int) -> list[int]:
    """'16-31' or '3,5,7-9' (0-based, inclusive ranges) → sorted unique layer indices within the model."""
    layers: set[int] = set()
    for part in (p.strip() for p in str(spec).split(",")):
        try:
            if "-" in part:
                start, end = (int(x) for x in part.split("-", 1))
            else:
                start = end = int(part)
        except ValueError:
            raise UserError(f"{setting('prune.drop_layers')} {spec!r} is not a list of layers; write e.g. 16-31 or 3,5,7-9 (0-based)") from None
        if start > end:
            raise UserError(f"{setting('prune.drop_layers')} range {part!r} runs backwards; write the lower index first")
        if start < 0 or end >= num_layers:
            raise UserError(f"{setting('prune.drop_layers')} {spec!r} is out of range: the model has layers 0-{num_layers - 1}")
        layers.update(range(start, end + 1))
    if len(layers) >= num_layers:
        raise UserError(f"{setting('prune.drop_layers')} {spec!r} drops all {num_layers} layers; keep at least one")
    return sorted(layers)


def check_target(name: str, value: int | None, original: int) -> None:
    if value is not None and value > original:
        raise UserError(f"{setting('prune.' + name)} {value} is larger than the model's {original}; pruning can only shrink a model")


def nearest_multiples(value: int, factor: int, limit: int) -> list[int]:
    """The multiples of `factor` closest to `value` (below and above), within (0, limit]."""
    below = (value // factor) * factor
    candidates = [m for m in (below, below + factor) if 0 < m <= limit]
    return candidates or [factor]


def target_shape(original: ModelShape, prune: PruneConfig) -> tuple[ModelShape, list[int] | None]:
    """Validate the targets against the model and return the pruned shape and the explicit layers to drop.

    Query heads are pruned equally in every GQA group, key-value heads as whole groups (with their query
    heads): without a head target, dropping groups keeps the same heads per group.
    """
    if not prune.targets():
        raise UserError(f"no pruning target: set at least one of {', '.join(setting('prune.' + name) for name in PRUNE_TARGETS)}")
    targets, drop_layers = prune.targets(), prune.drop_layers
    for name in SHAPE_TARGETS:
        check_target(name, targets.get(name), getattr(original, name))
    kv_heads = targets.get("num_key_value_heads") or original.num_key_value_heads
    heads = targets.get("num_attention_heads") or kv_heads * original.heads_per_group
    if heads % kv_heads:
        valid = nearest_multiples(heads, kv_heads, original.num_attention_heads)
        raise UserError(f"{heads} attention heads are not divisible by {kv_heads} key-value heads; GQA needs a multiple, "
                        f"e.g. {setting('prune.num_attention_heads')} {' or '.join(map(str, valid))}")
    if heads // kv_heads > original.heads_per_group:
        raise UserError(f"{heads} attention heads over {kv_heads} key-value heads needs {heads // kv_heads} query heads per group, "
                        f"but the model has {original.heads_per_group}; use at most {kv_heads * original.heads_per_group} heads")
    hidden = targets.get("hidden_size") or original.hidden_size
    if hidden % heads:
        valid = nearest_multiples(hidden, heads, original.hidden_size)
        raise UserError(f"hidden size {hidden} is not a multiple of {heads} attention heads, which transformers 5.x refuses; "
                        f"use {setting('prune.hidden_size')} {' or '.join(map(str, valid))}, or prune heads too")
    layers = targets.get("num_layers") or original.num_layers
    dropped = None
    if drop_layers:
        dropped = parse_layer_list(drop_layers, original.num_layers)
        if targets.get("num_layers") is not None and layers != original.num_layers - len(dropped):
            raise UserError(f"{setting('prune.drop_layers')} {drop_layers} leaves {original.num_layers - len(dropped)} layers but "
                            f"{setting('prune.num_layers')} is {layers}; give one of them, or make them agree")
        layers = original.num_layers - len(dropped)
    shape = ModelShape(hidden_size=hidden, ffn_hidden_size=targets.get("ffn_hidden_size") or original.ffn_hidden_size,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=original.head_dim, num_layers=layers)
    return shape, dropped


def pruned_config(config, shape: ModelShape, kept_layers: list[int]):
    """A copy of `config` with the pruned shape; head_dim is always explicit and RoPE settings are untouched."""
    new = copy.deepcopy(config)
    new.hidden_size = shape.hidden_size
    new.intermediate_size = shape.ffn_hidden_size
    new.num_attention_heads = shape.num_attention_heads
    new.num_key_value_heads = shape.num_key_value_heads
    new.head_dim = shape.head_dim
    new.num_hidden_layers = shape.num_layers
    if getattr(config, "layer_types", None) is not None:
        new.layer_types = [config.layer_types[i] for i in kept_layers]
    check_config(new)
    return new


def check_config(config) -> None:
    """Run transformers' own validation of the config class, as from_pretrained will."""
    try:
        type(config)(**config.to_dict())
    except (ValueError, TypeError) as exc:
        raise UserError(f"transformers refuses the pruned config: {str(exc).strip().splitlines()[-1].strip()}; choose other targets") from None
