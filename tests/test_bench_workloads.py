"""Benchmark workloads: every shipped one loads, seeded requests reproduce, bad workloads are one-line errors (toolchain/bench/workloads.py)."""

import pytest
import yaml
from conftest import data_settings

from toolchain.bench.workloads import WORKLOADS_DIR, LengthDistribution, draw_requests, load_workload, shipped_workload_names
from toolchain.errors import UserError
from toolchain.models import read_tokenizer

REQUIRED = ("cpu-smoke", "cpu-demo", "cpu-128-128", "cpu-poisson", "cpu-crosscheck", "gpu-128-128", "gpu-128-2048", "gpu-2048-128")


@pytest.mark.parametrize("name", shipped_workload_names())
def test_every_shipped_workload_loads_by_name_and_path(name):
    workload = load_workload(name)
    assert workload.name == name and workload.description
    assert load_workload(WORKLOADS_DIR / f"{name}.yaml") == workload
    assert workload.load_points()


def test_required_workloads_are_shipped():
    assert set(REQUIRED) <= set(shipped_workload_names())
    for name, shape in (("gpu-128-128", (128, 128)), ("gpu-128-2048", (128, 2048)), ("gpu-2048-128", (2048, 128))):
        workload = load_workload(name)
        assert workload.longest() == shape and workload.concurrency[0] == 1 and workload.concurrency[-1] >= 256


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return read_tokenizer(tokenizer_dir)


def test_seeded_requests_reproduce_and_fit_their_lengths(tokenizer, corpus_jsonl):
    workload = load_workload("cpu-poisson", {"requests": 6, "prompts": "synthetic", "input_len": {"distribution": "normal", "min": 8,
                                                                                                  "max": 40, "mean": 20, "stddev": 8}})
    first, again = draw_requests(workload, tokenizer), draw_requests(workload, tokenizer)
    assert first == again
    other = draw_requests(workload.model_copy(update={"seed": 1}), tokenizer)
    assert [r.prompt for r in other[0].measured] != [r.prompt for r in first[0].measured]
    assert [r.prompt for r in first[1].measured] != [r.prompt for r in first[0].measured]  # each load point its own prompts
    for point in first:
        assert len(point.warmup) == 1 and len(point.measured) == 6
        assert point.arrivals[0] == 0 and point.arrivals == sorted(point.arrivals)
        for request in point.warmup + point.measured:
            assert 8 <= len(request.prompt_ids) <= 40 and 32 <= request.max_new_tokens <= 96
            assert tokenizer(request.prompt)["input_ids"] == list(request.prompt_ids)  # what a server tokenizes is what is recorded
    # rate 0.25/s arrives more sparsely than 1/s
    assert first[0].arrivals[-1] > first[2].arrivals[-1]

    data = draw_requests(load_workload("cpu-smoke", {"prompts": "data"}), tokenizer, data_settings(corpus_jsonl))
    assert all(len(r.prompt_ids) == 32 and r.max_new_tokens == 16 for r in data[0].measured)
    assert any("Document" in r.prompt or "number" in r.prompt for r in data[0].measured)  # text of the corpus
    with pytest.raises(UserError, match="takes its prompts from the data"):
        draw_requests(load_workload("cpu-smoke", {"prompts": "data"}), tokenizer)


def test_length_distributions_stay_in_range():
    import numpy as np

    uniform = LengthDistribution(distribution="uniform", min=5, max=9)
    assert set(uniform.draw(np.random.default_rng(0), 500)) == set(range(5, 10))
    normal = LengthDistribution(distribution="normal", min=1, max=1000, mean=100, stddev=10)
    values = normal.draw(np.random.default_rng(0), 2000)
    assert 99 < sum(values) / len(values) < 101 and normal.expected() == 100


@pytest.mark.parametrize("overrides, message", [
    ({"input_len": -5}, "input_len: a length must be a positive number of tokens, got -5"),
    ({"output_len": 0}, "output_len: a length must be a positive number of tokens"),
    ({"concurrency": []}, "concurrency: List should have at least 1 item"),
    ({"concurrency": [1, 0]}, "every concurrency must be positive"),
    ({"request_rate": [-1.0]}, "every request rate must be positive"),
    ({"requests": 0}, "requests must be positive"),
    ({"requests": [4, 4, 4]}, "requests lists 3 counts for 2 load points"),
    ({"input_len": {"distribution": "uniform", "min": 9, "max": 3}}, "min 9 > max 3"),
    ({"input_len": {"distribution": "normal", "min": 1, "max": 3}}, "a normal distribution needs mean and stddev"),
    ({"prompts": "random"}, "prompts: Input should be 'synthetic' or 'data'"),
])
def test_bad_workloads_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match="invalid workload cpu-smoke") as caught:
        load_workload("cpu-smoke", overrides)
    assert message in str(caught.value) and "\n" not in str(caught.value)



def test_a_closed_loop_warms_up_with_one_request_per_client_at_least(tokenizer):
    """So no measured request meets the synchronized start of idle clients; an open loop keeps its warm-up count."""
    closed = draw_requests(load_workload("cpu-smoke", {"warmup": 2, "requests": 3, "input_len": 8, "output_len": 2, "concurrency": [1, 4]}), tokenizer)
    assert [len(point.warmup) for point in closed] == [2, 4] and [len(point.measured) for point in closed] == [3, 3]
    assert len({request.prompt for request in closed[1].warmup + closed[1].measured}) == 7  # warm-ups are requests of their own
    opened = draw_requests(load_workload("cpu-poisson", {"warmup": 1, "requests": 2, "prompts": "synthetic", "input_len": 8, "output_len": 2}), tokenizer)
    assert all(len(point.warmup) == 1 for point in opened)

def test_one_sweep_and_overriding_it(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"concurrency": [1], "request_rate": [1.0]}))
    with pytest.raises(UserError, match="exactly one sweep"):
        load_workload(both)
    neither = tmp_path / "neither.yaml"
    neither.write_text(yaml.safe_dump({"input_len": 8}))
    with pytest.raises(UserError, match="exactly one sweep"):
        load_workload(neither)
    assert load_workload("cpu-smoke", {"request_rate": [2.0]}).load_points() == [{"request_rate": 2.0}]  # replaces the concurrency sweep
    with pytest.raises(UserError, match="unknown workload 'cpu-nothing'; pass a YAML file or a built-in name"):
        load_workload("cpu-nothing")
    with pytest.raises(UserError, match="Extra inputs are not permitted"):
        load_workload("cpu-smoke", {"concurency": [2]})


def test_workload_flags_name_the_flag(cli, tiny_model):
    result = cli("bench", "--teacher", tiny_model, "--backend", "torch", "--input-len", "-1")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "invalid workload cpu-smoke: --input-len: a length must be a positive number of tokens" in result.stderr
