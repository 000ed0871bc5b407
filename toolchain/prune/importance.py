"""How much each prunable unit matters, and which units to keep.

Width (Minitron, arXiv 2407.14679 §2.2): one forward pass over calibration data with hooks that keep only
running sums, so memory does not grow with the calibration set:
- MLP neurons: the input of `down_proj` (the gated activation) per layer;
- attention heads: each head's slice of the input of `o_proj` (its attention output), the per-channel
  scores reduced by an L2 norm over head_dim; a key-value group scores the L2 norm of its query heads;
- embedding channels: the outputs of every RMSNorm in the decoder layers, summed over layers.
Each sequence is first reduced over its tokens (`sequence_aggregation`: mean of |x|, L2 norm, variance),
then the per-sequence values over the batch (`batch_aggregation`: mean, root mean square = L2 up to a
constant, variance). The papers' best combination, and ModelOpt's implementation, is L2 over the batch
of the mean over the sequence. Baselines: weight magnitude and seeded random scores.

Depth: block importance (1 - cosine similarity of a layer's input and output, collected in the same
pass), or the LM loss on calibration data with a layer, or a contiguous block of layers, removed.

Under torchrun every rank reads its own shard of the calibration rows and the sums are all-reduced, so
the scores equal a single-process run up to float rounding. Not here: cutting tensors (slicing.py).
"""

import json
import math
from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from toolchain.data import iterate_batches
from toolchain.errors import UserError
from toolchain.losses import next_token_nll
from toolchain.models import head_dim
from toolchain.progress import progress_bar

IMPORTANCE_FORMAT = "minitron-importance-2"
WIDTH_SCORES = ("hidden", "ffn", "heads")


def decoder_layers(model) -> nn.ModuleList:
    return model.model.layers


def aggregate_sequence(x: torch.Tensor, how: str) -> torch.Tensor:
    """[batch, seq, channels] → [batch, channels]."""
    x = x.float()
    if how == "mean":
        return x.abs().mean(dim=1)
    if how == "l2":
        return torch.linalg.vector_norm(x, dim=1)
    if how == "var":
        return x.var(dim=1, unbiased=False)
    raise ValueError(f"unknown sequence aggregation {how!r}")


def aggregate_batch(total: torch.Tensor, total_squares: torch.Tensor, count: float, how: str) -> torch.Tensor:
    """Per-sequence values (given as their sum and sum of squares over `count` sequences) → one score."""
    mean = total / count
    if how == "mean":
        return mean
    if how == "l2":
        return (total_squares / count).sqrt()
    if how == "var":
        return (total_squares / count - mean.pow(2)).clamp_min(0)
    raise ValueError(f"unknown batch aggregation {how!r}")


class ActivationRecorder:
    """Forward hooks that add each batch's aggregated activations to running sums (sum and sum of squares)."""

    def __init__(self, model, sequence_aggregation: str):
        config = model.config
        layers = decoder_layers(model)
        device = next(model.parameters()).device
        num_layers, heads, width = len(layers), config.num_attention_heads, head_dim(config)
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.sums = {
            "ffn": zeros(2, num_layers, config.intermediate_size),
            "attention": zeros(2, num_layers, heads * width),
            "hidden": zeros(2, 2 * num_layers, config.hidden_size),
            "block": zeros(num_layers),
            "counts": zeros(2),  # sequences, tokens
        }
        self.model = model
        self.sequence_aggregation = sequence_aggregation
        self.heads, self.head_dim = heads, width

    def add(self, name: str, index: int, activations: torch.Tensor) -> None:
        values = aggregate_sequence(activations.detach(), self.sequence_aggregation).double()
        self.sums[name][0, index] += values.sum(dim=0)
        self.sums[name][1, index] += values.pow(2).sum(dim=0)

    def add_block(self, index: int, layer_input: torch.Tensor, layer_output: torch.Tensor) -> None:
        a, b = layer_input.detach().float(), layer_output.detach().float()
        norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
        cosine = torch.linalg.vecdot(a, b) / norms.clamp_min(1e-8)  # 3x faster on CPU than F.cosine_similarity
        self.sums["block"][index] += (1 - cosine).double().sum()

    @contextmanager
    def hooks(self):
        handles = []
        for i, layer in enumerate(decoder_layers(self.model)):
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, args, i=i: self.add("ffn", i, args[0])))
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args, i=i: self.add("attention", i, args[0])))
            handles.append(layer.input_layernorm.register_forward_hook(lambda m, a, out, i=i: self.add("hidden", 2 * i, out)))
            handles.append(layer.post_attention_layernorm.register_forward_hook(lambda m, a, out, i=i: self.add("hidden", 2 * i + 1, out)))
            handles.append(layer.register_forward_hook(self.block_hook(i), with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def block_hook(self, index: int):
        def hook(module, args, kwargs, output):
            layer_input = args[0] if args else kwargs["hidden_states"]
            self.add_block(index, layer_input, output[0] if isinstance(output, tuple) else output)
        return hook

    def scores(self, batch_aggregation: str) -> dict[str, torch.Tensor]:
        sequences, tokens = self.sums["counts"].tolist()
        if sequences == 0:
            raise UserError("no calibration sequences reached the model; use more calibration data")
        ffn, attention, hidden = (aggregate_batch(self.sums[n][0], self.sums[n][1], sequences, batch_aggregation) for n in ("ffn", "attention", "hidden"))
        heads = torch.linalg.vector_norm(attention.view(attention.shape[0], self.heads, self.head_dim), dim=-1)
        return {
            "hidden": hidden.sum(dim=0).float().cpu(),
            "ffn": ffn.float().cpu(),
            "heads": heads.float().cpu(),
            "block_importance": (self.sums["block"] / tokens).float().cpu(),
        }


def all_reduce_sum(tensors) -> None:
    """Sum tensors over all ranks in place (no-op outside torch.distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


@torch.inference_mode()
def activation_importance(model, rows, batch_size: int, sequence_aggregation: str, batch_aggregation: str) -> dict[str, torch.Tensor]:
    """One forward pass over `rows` (this rank's shard) with hooks; scores reduced over all ranks."""
    device = next(model.parameters()).device
    recorder = ActivationRecorder(model, sequence_aggregation)
    with recorder.hooks(), progress_bar("importance", total=math.ceil(len(rows) / batch_size)) as bar:
        for input_ids in iterate_batches(rows, batch_size):
            model.model(input_ids=input_ids.to(device), use_cache=False)  # the decoder only: lm_head plays no part
            recorder.sums["counts"] += torch.tensor([input_ids.shape[0], input_ids.numel()], dtype=torch.float64, device=device)
            bar.update(1)
    all_reduce_sum(recorder.sums.values())
    return recorder.scores(batch_aggregation)


@torch.no_grad()
def magnitude_importance(model) -> dict[str, torch.Tensor]:
    """L2 norm of every weight that reads or writes a unit (a baseline that needs no data)."""
    heads, width = model.config.num_attention_heads, head_dim(model.config)
    hidden = model.get_input_embeddings().weight.float().pow(2).sum(dim=0)
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        hidden += model.get_output_embeddings().weight.float().pow(2).sum(dim=0)
    hidden += model.model.norm.weight.float().pow(2)
    ffn, head_scores = [], []
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        for reader in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            hidden += reader.weight.float().pow(2).sum(dim=0)
        for writer in (attn.o_proj, mlp.down_proj):
            hidden += writer.weight.float().pow(2).sum(dim=1)
        hidden += layer.input_layernorm.weight.float().pow(2) + layer.post_attention_layernorm.weight.float().pow(2)
        ffn.append(mlp.gate_proj.weight.float().pow(2).sum(1) + mlp.up_proj.weight.float().pow(2).sum(1) + mlp.down_proj.weight.float().pow(2).sum(0))
        q = attn.q_proj.weight.float().pow(2).sum(1).view(heads, width).sum(1)
        o = attn.o_proj.weight.float().pow(2).sum(0).view(heads, width).sum(1)
        head_scores.append(q + o)
    return {"hidden": hidden.sqrt().cpu(), "ffn": torch.stack(ffn).sqrt().cpu(), "heads": torch.stack(head_scores).sqrt().cpu()}


def random_importance(config, seed: int) -> dict[str, torch.Tensor]:
    """Seeded uniform scores with the shapes of the real ones (the baseline any method must beat)."""
    generator = torch.Generator().manual_seed(seed)
    layers = config.num_hidden_layers
    return {
        "hidden": torch.rand(config.hidden_size, generator=generator),
        "ffn": torch.rand(layers, config.intermediate_size, generator=generator),
        "heads": torch.rand(layers, config.num_attention_heads, generator=generator),
    }


@contextmanager
def captured_layer_inputs(model):
    """Record what the model passes each decoder layer (hidden states, mask, RoPE embeddings) in a forward pass."""
    inputs: dict[int, tuple] = {}

    def capture(index, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        inputs[index] = (hidden, args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})

    handles = [layer.register_forward_pre_hook(partial(capture, i), with_kwargs=True) for i, layer in enumerate(decoder_layers(model))]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def logits_without(model, inputs: dict[int, tuple], dropped: set[int]) -> torch.Tensor:
    """Logits of the model with `dropped` layers removed, resuming from the recorded input of the first dropped layer."""
    layers = decoder_layers(model)
    start = min(dropped)
    hidden = inputs[start][0]
    for index in range(start, len(layers)):
        if index in dropped:
            continue
        _, args, kwargs = inputs[index]
        output = layers[index](hidden, *args, **kwargs)
        hidden = output[0] if isinstance(output, tuple) else output
    return model.lm_head(model.model.norm(hidden))


@torch.inference_mode()
def layer_drop_losses(model, rows, batch_size: int, candidates: list[list[int]], description: str = "layer losses") -> tuple[float, list[float]]:
    """LM loss on `rows` of the full model and of the model without each candidate set of layers.

    One full pass per batch records every layer's input; each candidate then reruns only the layers after
    its first dropped one (about half the work of a full forward per candidate).
    """
    device = next(model.parameters()).device
    totals = torch.zeros(len(candidates) + 1, dtype=torch.float64, device=device)
    predicted = 0
    with progress_bar(description, total=math.ceil(len(rows) / batch_size)) as bar:
        for input_ids in iterate_batches(rows, batch_size):
            input_ids = input_ids.to(device)
            with captured_layer_inputs(model) as inputs:
                totals[0] += next_token_nll(model(input_ids=input_ids, use_cache=False).logits, input_ids, "sum").double()
            for i, dropped in enumerate(candidates, 1):
                totals[i] += next_token_nll(logits_without(model, inputs, set(dropped)), input_ids, "sum").double()
            predicted += input_ids.shape[0] * (input_ids.shape[1] - 1)
            bar.update(1)
    counts = torch.tensor([predicted], dtype=torch.float64, device=device)
    all_reduce_sum([totals, counts])
    losses = (totals / counts).tolist()
    return losses[0], losses[1:]


def lm_loss_scores(model, rows, batch_size: int, num_layers: int) -> tuple[float, torch.Tensor]:
    base, losses = layer_drop_losses(model, rows, batch_size, [[i] for i in range(num_layers)], "lm loss per layer")
    return base, torch.tensor(losses)


def contiguous_block_losses(model, rows, batch_size: int, num_layers: int, block: int) -> tuple[float, torch.Tensor]:
    candidates = [list(range(start, start + block)) for start in range(num_layers - block + 1)]
    base, losses = layer_drop_losses(model, rows, batch_size, candidates, f"lm loss per {block}-layer block")
    return base, torch.tensor(losses)


def top_indices(scores: torch.Tensor, k: int) -> list[int]:
    """The k highest-scoring indices, in ascending order (ties keep the lower index)."""
    order = torch.argsort(scores.float(), descending=True, stable=True)[:k]
    return sorted(order.tolist())


def select_heads(head_scores: torch.Tensor, groups: int, keep_groups: int, keep_per_group: int) -> tuple[list[int], list[int]]:
    """Kept key-value groups, and kept query heads (global indices) with the same count in every kept group.

    HF GQA maps query head h to key-value head h // heads_per_group, so groups are contiguous head ranges.
    """
    per_group = head_scores.numel() // groups
    by_group = head_scores.view(groups, per_group)
    kept_groups = top_indices(torch.linalg.vector_norm(by_group, dim=1), keep_groups)
    kept_heads = [g * per_group + j for g in kept_groups for j in top_indices(by_group[g], keep_per_group)]
    return kept_groups, kept_heads


def dropped_layers(method: str, scores: dict[str, torch.Tensor], num_layers: int, drop: int, seed: int) -> list[int]:
    """The `drop` layers a depth method removes (lowest block importance / smallest loss increase)."""
    if drop == 0:
        return []
    if method == "block_importance":
        return sorted(torch.argsort(scores["block_importance"], stable=True)[:drop].tolist())
    if method == "lm_loss":
        return sorted(torch.argsort(scores["lm_loss_without_layer"], stable=True)[:drop].tolist())
    if method == "lm_loss_contiguous":
        start = int(torch.argmin(scores[f"lm_loss_without_block{drop}"]))
        return list(range(start, start + drop))
    if method == "random":
        return sorted(torch.randperm(num_layers, generator=torch.Generator().manual_seed(seed))[:drop].tolist())
    raise ValueError(f"unknown depth method {method!r}")


def depth_score_names(method: str, drop: int) -> list[str]:
    """Which stored scores a depth method needs."""
    return {"block_importance": ["block_importance"], "lm_loss": ["lm_loss_without_layer"],
            "lm_loss_contiguous": [f"lm_loss_without_block{drop}"], "random": []}[method] if drop else []


def save_importance(path, scores: dict[str, torch.Tensor], metadata: dict) -> None:
    """Scores plus what they were computed from: the model and, per score, the settings that determine it (`scores.NAME.identity`)."""
    from safetensors.torch import save_file

    save_file({name: tensor.contiguous() for name, tensor in scores.items()}, str(path),
              metadata={"format": IMPORTANCE_FORMAT, "minitron": json.dumps(metadata, sort_keys=True)})


def read_importance(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Scores and metadata of an importance file written by `save_importance`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        scores = load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"importance file {path} does not exist; pass the importance.safetensors of an earlier prune run") from None
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise UserError(f"cannot read importance file {path}: {exc}; recompute it by leaving out --importance") from None
    if header.get("format") != IMPORTANCE_FORMAT:
        raise UserError(f"{path} is not an importance file of this toolchain version; recompute it by leaving out --importance")
    return scores, json.loads(header["minitron"])


def reusable_scores(path, fingerprint: str, shape: dict, wanted: dict[str, dict], refuse_mismatch: bool) -> tuple[dict, dict]:
    """The scores of an importance file that were computed on this model with the settings now wanted, and their records.

    `wanted` maps each needed score name to its identity (the settings that determine it). A score
    computed with other settings is refused (a user-given file: say which setting differs) or left out
    to be recomputed (`refuse_mismatch=False`); scores the file lacks are simply not returned.
    """
    scores, metadata = read_importance(path)
    if metadata.get("model_fingerprint") != fingerprint or metadata.get("shape") != shape:
        raise UserError(f"importance file {path} was computed on another model ({metadata.get('model')}, shape {metadata.get('shape')}); "
                        "recompute it for this model by leaving out --importance")
    records = metadata.get("scores", {})
    reused = {}
    for name, identity in wanted.items():
        if name not in scores:
            continue
        recorded = records.get(name, {}).get("identity", {})
        if recorded == identity:
            reused[name] = scores[name]
        elif refuse_mismatch:
            differing = sorted(key for key in set(recorded) | set(identity) if recorded.get(key) != identity.get(key))
            shown = ", ".join(f"{key} {recorded.get(key)!r} (asked: {identity.get(key)!r})" for key in differing)
            raise UserError(f"importance file {path} holds {name} scores computed with other settings: {shown}; ask for the same settings "
                            f"or leave out --importance to recompute them")
    return reused, {name: records[name] for name in reused}
