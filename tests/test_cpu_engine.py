"""The CPU engine (onnxruntime-genai) on a tiny random Llama: built once per module, compared with transformers.

The engine tests run on both batching modes: in-flight (our scheduler on onnxruntime) and static (onnxruntime-genai's Engine).
"""

import json
import queue
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import save_tiny_model

from toolchain.cpu_engine import FINISHED, CpuEngine, InvalidRequest, Submission, build_cpu_engine
from toolchain.cpu_inflight import InflightScheduler, inflight_session
from toolchain.errors import UserError

pytest.importorskip("onnxruntime_genai", reason="needs the cpu-engine extra: pip install -e '.[cpu-engine]'")

PROMPTS = [[1, 40, 41, 42], [1, 100, 7], [1, 5, 6, 7, 8, 9, 10], [1, 300]]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer_dir):
    return save_tiny_model(tmp_path_factory.mktemp("cpu-engine") / "model", tokenizer_dir)


@pytest.fixture(scope="module")
def fp32_engine_dir(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu-engine-build") / "fp32"
    build_cpu_engine(tiny_checkpoint, out, "fp32")
    return out


@pytest.fixture(scope="module", params=["inflight", "static"])
def engine(fp32_engine_dir, request):
    with CpuEngine(fp32_engine_dir, threads=1, max_batch_size=4, batching=request.param) as engine:
        yield engine


def transformers_greedy(checkpoint, prompt, new_tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    output = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=2, pad_token_id=2)
    tokens = output[0, len(prompt):].tolist()
    return tokens[:tokens.index(2)] if 2 in tokens else tokens  # the engine does not emit the EOS token


def test_build_writes_onnxruntime_genai_folder(fp32_engine_dir):
    config = json.loads((fp32_engine_dir / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 4
    assert (fp32_engine_dir / "model.onnx").is_file() and (fp32_engine_dir / "tokenizer.json").is_file()


def test_greedy_tokens_equal_transformers_for_32_new_tokens(engine, tiny_checkpoint):
    for prompt in PROMPTS[:2]:
        assert list(engine.generate(prompt, max_new_tokens=32)) == transformers_greedy(tiny_checkpoint, prompt, 32)


def test_concurrent_requests_are_batched_and_each_gets_its_own_tokens(engine):
    alone = [list(engine.generate(prompt, max_new_tokens=20)) for prompt in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda prompt: list(engine.generate(prompt, max_new_tokens=20)), PROMPTS))
    assert together == alone


def test_text_prompt_streams_and_decodes(engine):
    prompt = "Document 3. the model reads"
    assert engine.encode(prompt)
    tokens = []
    for token in engine.generate(prompt, max_new_tokens=5):
        tokens.append(token)
    assert 1 <= len(tokens) <= 5
    assert isinstance(engine.decode(tokens), str)


def test_streamed_text_pieces_join_to_the_decoded_text(engine):
    rng = torch.Generator().manual_seed(0)
    for _ in range(20):  # random ids: invalid UTF-8 byte runs included
        tokens = torch.randint(3, 384, (12,), generator=rng).tolist()
        pieces = list(engine.stream_text(iter(tokens)))
        assert len(pieces) in (len(tokens), len(tokens) + 1) and "".join(pieces) == engine.decode(tokens)


def test_end_id_stops_generation_before_that_token(engine):
    full = list(engine.generate(PROMPTS[0], max_new_tokens=16))
    stop = full[5]
    assert list(engine.generate(PROMPTS[0], max_new_tokens=16, end_id=stop)) == full[:full.index(stop)]


def test_seeded_sampling_repeats_and_closing_early_frees_the_engine(engine):
    first = list(engine.generate(PROMPTS[1], max_new_tokens=12, temperature=1.0, top_k=50, seed=7))
    assert first == list(engine.generate(PROMPTS[1], max_new_tokens=12, temperature=1.0, top_k=50, seed=7))
    stream = engine.generate(PROMPTS[1], max_new_tokens=200)
    next(stream)
    stream.close()  # cancels the request
    assert len(list(engine.generate(PROMPTS[1], max_new_tokens=3))) == 3


def test_inflight_prefill_in_chunks_and_joins_give_the_static_tokens(fp32_engine_dir):
    """Prompts fed two tokens per step beside the others' decode, requests of different lengths joining and leaving."""
    with CpuEngine(fp32_engine_dir, threads=1, max_batch_size=1) as static:
        expected = [list(static.generate(prompt, max_new_tokens=4 + 7 * i)) for i, prompt in enumerate(PROMPTS)]
    steps = []
    with CpuEngine(fp32_engine_dir, threads=1, max_batch_size=3, batching="inflight", max_num_tokens=2, on_step=steps.append) as engine:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(lambda i: list(engine.generate(PROMPTS[i], max_new_tokens=4 + 7 * i)), range(len(PROMPTS))))
    assert together == expected
    assert sum(step.new_tokens for step in steps) == sum(map(len, expected))
    assert max(step.batch_size for step in steps) <= 3 and max(step.prefill_tokens for step in steps) <= 2


def queued_scheduler(engine_dir, prompts, new_tokens, max_num_tokens):
    """An in-flight scheduler (no engine thread) with `prompts` all waiting at once, and their submissions."""
    decoder = json.loads((engine_dir / "genai_config.json").read_text())["model"]["decoder"]
    scheduler = InflightScheduler(inflight_session(engine_dir / decoder["filename"], decoder["hidden_size"], threads=1), max_batch_size=4,
                                  max_num_tokens=max_num_tokens, kv_cache_tokens=4 * 256, head_dim=decoder["head_size"], eos_token_ids=(2,),
                                  inbox=queue.Queue())
    submissions = [Submission(np.array(prompt), tokens, 0.0, 0, 1.0, None) for prompt, tokens in zip(prompts, new_tokens)]
    for submission in submissions:
        scheduler.inbox.put(submission)
    scheduler.take_inbox(block=False)
    return scheduler, submissions


def run_to_end(scheduler, submissions) -> tuple[list, list[list[int]]]:
    steps = []
    while scheduler.waiting or scheduler.prefilling or scheduler.running:
        steps.append(scheduler.step())
    tokens = []
    for submission in submissions:
        events = list(submission.events.queue)
        assert events[-1] is FINISHED
        tokens.append(events[:-1])
    return steps, tokens


def test_inflight_waiting_prompts_are_prefilled_together_in_one_forward(fp32_engine_dir):
    """Prompts of different lengths, right-padded in one prefill, decode together and each gets its tokens as if alone."""
    new_tokens = [4 + 5 * i for i in range(len(PROMPTS))]
    with CpuEngine(fp32_engine_dir, threads=1, max_batch_size=1) as static:
        expected = [list(static.generate(prompt, max_new_tokens=tokens)) for prompt, tokens in zip(PROMPTS, new_tokens)]
    steps, tokens = run_to_end(*queued_scheduler(fp32_engine_dir, PROMPTS, new_tokens, max_num_tokens=64))
    assert tokens == expected
    assert steps[0].prefill_tokens == sum(map(len, PROMPTS)) and steps[0].batch_size == len(PROMPTS)
    assert all(step.prefill_tokens == 0 for step in steps[1:])


def test_inflight_prefill_batch_fits_the_token_budget_left_by_the_decode_rows(fp32_engine_dir):
    """Budget 10: prompts of 4 and 3 tokens (padded 2 x 4), then the 7-token one beside 2 decode rows, then the 2-token one.

    The third asks for 70 tokens: joining, it grows the running batch's cache buffer past its first 64 positions.
    """
    new_tokens = [8, 8, 70, 8]
    with CpuEngine(fp32_engine_dir, threads=1, max_batch_size=1) as static:
        expected = [list(static.generate(prompt, max_new_tokens=tokens)) for prompt, tokens in zip(PROMPTS, new_tokens)]
    steps, tokens = run_to_end(*queued_scheduler(fp32_engine_dir, PROMPTS, new_tokens, max_num_tokens=10))
    assert tokens == expected
    assert [step.prefill_tokens for step in steps[:3]] == [7, 7, 2] and [step.batch_size for step in steps[:3]] == [2, 3, 4]


def test_inflight_kv_budget_refuses_what_it_cannot_hold(fp32_engine_dir):
    with pytest.raises(UserError, match="kv_cache_tokens 100 cannot hold one request of max_input_len 200"):
        CpuEngine(fp32_engine_dir, threads=1, batching="inflight", max_input_len=200, kv_cache_tokens=100)
    with CpuEngine(fp32_engine_dir, threads=1, batching="inflight", max_input_len=16, kv_cache_tokens=40) as engine:
        with pytest.raises(InvalidRequest, match="exceed the KV-cache budget of 40 tokens"):
            list(engine.generate(PROMPTS[0], max_new_tokens=50))
        assert len(list(engine.generate(PROMPTS[0], max_new_tokens=8))) == 8


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=[]), "empty prompt"),
    (dict(prompt=[1, 2], max_new_tokens=0), "max_tokens must be positive"),
    (dict(prompt=[1, 2], max_new_tokens=300), "above the engine limit"),
    (dict(prompt=[1] * 300), "more than the engine's max_input_len"),
    (dict(prompt=[1, 999]), "token ids must lie in"),
    (dict(prompt=[1, 2], top_p=0.0), "top_p"),
])
def test_bad_requests_are_refused_by_name(engine, kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        engine.generate(**{"max_new_tokens": 4, **kwargs})


def test_int4_engine_builds_and_runs(tiny_checkpoint, tmp_path):
    build_cpu_engine(tiny_checkpoint, tmp_path / "int4", "int4")
    assert "MatMulNBits" in (tmp_path / "int4" / "model.onnx").read_bytes().decode("latin-1")
    tokens = {}
    for batching in ("static", "inflight"):  # in flight, the LM head is a MatMulNBits behind the sampled-position Gather
        with CpuEngine(tmp_path / "int4", threads=1, batching=batching) as engine:
            tokens[batching] = list(engine.generate(PROMPTS[0], max_new_tokens=8))
    assert 1 <= len(tokens["static"]) <= 8 and tokens["inflight"] == tokens["static"]


def test_config_the_builder_cannot_read_is_one_line_error(tiny_checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "width-pruned"
    shutil.copytree(tiny_checkpoint, bad)
    config = json.loads((bad / "config.json").read_text())
    config.update(num_attention_heads=3, num_key_value_heads=3, head_dim=16)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="not a multiple of num_attention_heads 3") as error:
        build_cpu_engine(bad, tmp_path / "out", "fp32")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_builder_failure_becomes_one_line_error(tiny_checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "mismatched"
    shutil.copytree(tiny_checkpoint, bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 96  # the weights say 128
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="model builder failed") as error:
        build_cpu_engine(bad, tmp_path / "out", "fp32")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_engine_dir_without_engine_is_refused(tmp_path):
    with pytest.raises(UserError, match="not an onnxruntime-genai engine folder"):
        CpuEngine(tmp_path)
