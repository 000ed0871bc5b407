"""Shared fixtures: a tokenizer trained on the fly, tiny random Llama/Mistral/Qwen2 checkpoints, small corpora.

Everything is generated here, nothing is downloaded. Caches go to a per-session temporary directory.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY_VOCAB = 384


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Point MINITRON_CACHE at a fresh directory for the whole session (subprocesses inherit it)."""
    cache = tmp_path_factory.mktemp("minitron-cache")
    previous = os.environ.get("MINITRON_CACHE")
    os.environ["MINITRON_CACHE"] = str(cache)
    os.environ.setdefault("MINITRON_PROGRESS", "0")
    yield cache
    if previous is None:
        os.environ.pop("MINITRON_CACHE", None)
    else:
        os.environ["MINITRON_CACHE"] = previous


def corpus_documents(count: int = 400) -> list[str]:
    """Deterministic English-like documents with learnable structure (repeated phrases, counting)."""
    subjects = ["the model", "a student", "the teacher", "every layer", "the engine", "a tokenizer", "the server", "one batch"]
    verbs = ["reads", "writes", "prunes", "distills", "serves", "measures", "packs", "exports"]
    objects = ["the weights", "a sequence", "the logits", "ten tokens", "the cache", "a checkpoint", "the data", "its heads"]
    documents = []
    for i in range(count):
        sentences = [
            f"{subjects[(i + j) % 8]} {verbs[(i * 3 + j) % 8]} {objects[(i * 5 + j) % 8]} number {i % 17 + j}."
            for j in range(4 + i % 5)
        ]
        documents.append(f"Document {i}. " + " ".join(sentences))
    return documents


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained on the test corpus, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus_documents(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")
    out = tmp_path_factory.mktemp("tokenizer")
    wrapped.save_pretrained(out)
    return out


def tiny_config(architecture: str = "llama", **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                  tie_word_embeddings=False)
    common.update(overrides)
    config_class, arch_name = {"llama": (LlamaConfig, "LlamaForCausalLM"), "mistral": (MistralConfig, "MistralForCausalLM"),
                               "qwen2": (Qwen2Config, "Qwen2ForCausalLM")}[architecture]
    config = config_class(**common)
    config.architectures = [arch_name]
    return config


def save_tiny_model(directory: Path, tokenizer_dir: Path, architecture: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a random tiny checkpoint (config, safetensors, tokenizer) that from_pretrained loads."""
    import shutil

    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(architecture, **overrides), dtype=torch.float32)
    if architecture == "qwen2":  # random biases, so bias handling is visible in every test
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.02)
    model.save_pretrained(directory, safe_serialization=True)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, directory / file.name)
    return directory


@pytest.fixture
def make_tiny_model(tmp_path, tokenizer_dir):
    """Factory: make_tiny_model(name="m", architecture="llama", **config_overrides) -> checkpoint dir."""
    def make(name: str = "model", architecture: str = "llama", seed: int = 0, **overrides) -> Path:
        return save_tiny_model(tmp_path / name, tokenizer_dir, architecture, seed, **overrides)
    return make


@pytest.fixture
def tiny_model(make_tiny_model) -> Path:
    return make_tiny_model()


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": doc, "id": i}) + "\n" for i, doc in enumerate(corpus_documents())))
    return path


def write_engine_manifest(engine_dir: Path, profile_name: str, backend: str, model_dir: str, built: bool = True, **limits) -> None:
    """The manifest `minitron build` would write for an engine directory assembled by a test."""
    from toolchain.engine_profile import load_profile
    from toolchain.manifest import write_manifest

    profile = load_profile(profile_name)
    write_manifest(engine_dir, backend=backend, profile_name=profile.name, profile=profile.model_dump(mode="json"),
                   source_model="tiny", source_fingerprint="0" * 16, model_dir=model_dir, built=built,
                   max_batch_size=limits.get("max_batch_size", profile.max_batch_size),
                   max_input_len=limits.get("max_input_len", profile.max_input_len),
                   max_seq_len=limits.get("max_seq_len", profile.max_seq_len), seconds=0.0)


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `minitron ...` in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "toolchain", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def cli():
    return run_cli


def data_settings(corpus, seq_len: int = 32, **overrides):
    """The data section of a test: a corpus file, short sequences."""
    from toolchain.settings import DataConfig

    return DataConfig(spec=str(corpus), seq_len=seq_len, **overrides)


def cpu():
    """The compute section of a test: float32 on the CPU."""
    from toolchain.settings import ComputeConfig

    return ComputeConfig(dtype="float32", device="cpu")
