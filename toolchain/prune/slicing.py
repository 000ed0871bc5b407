"""Cut a Llama-layout model down to the kept channels, heads, neurons and layers.

Every kept layer gets the same shape (TensorRT-LLM rejects mixed widths), so the result is an ordinary
Hugging Face model of a smaller config: built on the meta device, filled with slices of the original
weights (strict: every parameter accounted for), kept layers renumbered 0..n-1 by construction. Embedding
channels are cut consistently in embeddings, lm_head (re-tied when tied), every RMSNorm and every
projection; q/k/v rows (and Qwen2's biases) follow the kept heads; RoPE buffers are copied untouched.
Not here: choosing what to keep (importance.py) or validating targets (shapes.py).
"""

import re
from dataclasses import asdict, dataclass

import torch

from toolchain.errors import UserError

LAYER_PARAMETER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# (rows, columns) of each parameter, as the axis whose kept indices select them; None keeps the dimension.
PARAMETER_AXES = {
    "model.embed_tokens.weight": (None, "hidden"),
    "lm_head.weight": (None, "hidden"),
    "model.norm.weight": ("hidden",),
    "input_layernorm.weight": ("hidden",),
    "post_attention_layernorm.weight": ("hidden",),
    "self_attn.q_proj.weight": ("q", "hidden"),
    "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("kv", "hidden"),
    "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.weight": ("kv", "hidden"),
    "self_attn.v_proj.bias": ("kv",),
    "self_attn.o_proj.weight": ("hidden", "q"),
    "self_attn.o_proj.bias": ("hidden",),
    "mlp.gate_proj.weight": ("ffn", "hidden"),
    "mlp.gate_proj.bias": ("ffn",),
    "mlp.up_proj.weight": ("ffn", "hidden"),
    "mlp.up_proj.bias": ("ffn",),
    "mlp.down_proj.weight": ("hidden", "ffn"),
    "mlp.down_proj.bias": ("hidden",),
}


@dataclass
class PrunePlan:
    """What survives: original indices, per kept layer where layers may differ (in the order of kept_layers)."""

    kept_layers: list[int]
    hidden: list[int]
    ffn: list[list[int]]
    heads: list[list[int]]
    kv_heads: list[list[int]]

    def to_dict(self) -> dict:
        return asdict(self)


def head_rows(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def source_name(name: str, kept_layers: list[int]) -> str:
    """The original parameter a pruned one is cut from: layer n of the result is layer kept_layers[n]."""
    match = LAYER_PARAMETER.match(name)
    if not match:
        return name
    return f"model.layers.{kept_layers[int(match.group(1))]}.{match.group(2)}"


def slice_parameter(name: str, tensor: torch.Tensor, plan: PrunePlan, head_dim: int) -> torch.Tensor:
    match = LAYER_PARAMETER.match(name)
    key = match.group(2) if match else name
    if key not in PARAMETER_AXES:
        raise UserError(f"cannot prune parameter {name}: the Llama/Mistral/Qwen2 layout has no such weight; this checkpoint is not supported")
    layer = int(match.group(1)) if match else None
    indices = {
        "hidden": plan.hidden,
        "ffn": plan.ffn[layer] if layer is not None else None,
        "q": head_rows(plan.heads[layer], head_dim) if layer is not None else None,
        "kv": head_rows(plan.kv_heads[layer], head_dim) if layer is not None else None,
    }
    for dim, axis in enumerate(PARAMETER_AXES[key]):
        if axis is not None:
            tensor = tensor.index_select(dim, torch.tensor(indices[axis], dtype=torch.long, device=tensor.device))
    return tensor


def slice_model(model, plan: PrunePlan, config):
    """A new model of `config` holding the kept slices of `model`'s weights (same dtype and device)."""
    from transformers import AutoModelForCausalLM

    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        pruned = AutoModelForCausalLM.from_config(config, dtype=dtype)
    original = model.state_dict()
    head_dim = config.head_dim
    state = {}
    for name in pruned.state_dict():
        source = source_name(name, plan.kept_layers)
        if source not in original:
            raise UserError(f"cannot prune: the pruned model expects {name}, which the original lacks; this checkpoint is not supported")
        state[name] = slice_parameter(name, original[source], plan, head_dim)
    pruned.load_state_dict(state, strict=True, assign=True)
    original_buffers = dict(model.named_buffers())
    for name, buffer in list(pruned.named_buffers()):  # non-persistent buffers (RoPE inverse frequencies)
        if buffer.is_meta:
            module_name, _, leaf = name.rpartition(".")
            pruned.get_submodule(module_name)._buffers[leaf] = original_buffers[source_name(name, plan.kept_layers)].clone()
    if getattr(config, "tie_word_embeddings", False):
        pruned.tie_weights()
    pruned.generation_config = model.generation_config
    return pruned.eval()
