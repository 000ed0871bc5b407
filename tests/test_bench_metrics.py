"""Benchmark metrics from hand-made token timelines, and the load generator's closed and open loops (toolchain/bench/metrics.py, load.py)."""

import threading
import time

import pytest

from toolchain.bench.load import BenchRequest, LoadPointRequests, RequestFailed, run_load_point
from toolchain.bench.metrics import RequestRecord, load_point_metrics, percentile, summarize


def record(sent, arrivals, tokens=None, finished=None, error=None, input_tokens=10) -> RequestRecord:
    timeline = RequestRecord(sent=sent, input_tokens=input_tokens, finished=finished, error=error)
    for at, count in zip(arrivals, tokens or [1] * len(arrivals)):
        timeline.add(at, count)
    return timeline


def test_percentile_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, q) for q in (50, 90, 95, 99)] == [50.0, 90.0, 95.0, 99.0]
    assert percentile([3.0], 99) == 3.0
    assert summarize([1.0, 2.0, 3.0, 10.0]) == {"mean": 4.0, "p50": 2.0, "p90": 10.0, "p95": 10.0, "p99": 10.0, "min": 1.0, "max": 10.0}
    assert summarize([]) == {}


def test_one_request_timeline():
    timeline = record(0.0, [0.1, 0.15, 0.2, 0.25], finished=0.3)
    assert timeline.ttft() == pytest.approx(0.1)
    assert timeline.itl() == pytest.approx(0.05)  # 3 gaps after the first token over 0.15 s
    assert timeline.e2e() == pytest.approx(0.3)
    chunked = record(0.0, [0.1, 0.3], tokens=[3, 2])  # a backend that streams several tokens per piece
    assert chunked.output_tokens == 5 and chunked.itl() == pytest.approx(0.1)  # 0.2 s for the 2 tokens after the first piece
    assert record(0.0, [0.1]).itl() is None


def test_load_point_metrics_from_timelines():
    records = [record(0.0, [0.2, 0.3, 0.4], finished=0.4, input_tokens=8),      # TTFT 200, ITL 100, E2E 400
               record(0.1, [0.2, 0.25, 0.3, 0.35, 0.4], finished=0.5, input_tokens=12),  # TTFT 100, ITL 50, E2E 400
               record(0.2, [], error="refused")]
    metrics = load_point_metrics(records, started=0.0, stopped=1.0)
    assert (metrics["requests"], metrics["errors"], metrics["error_examples"]) == (3, 1, ["refused"])
    assert metrics["ttft_ms"]["mean"] == pytest.approx(150) and metrics["ttft_ms"]["p50"] == pytest.approx(100)
    assert metrics["itl_ms"]["mean"] == pytest.approx(75) and metrics["itl_ms"]["max"] == pytest.approx(100)
    assert metrics["e2e_ms"]["p99"] == pytest.approx(400)
    assert metrics["requests_per_s"] == pytest.approx(2.0) and metrics["output_tokens_per_s"] == pytest.approx(8.0)
    assert metrics["output_tokens_per_s_per_user"] == pytest.approx((10 + 20) / 2)  # 1 / ITL of each request, averaged
    assert metrics["input_tokens_per_request"] == pytest.approx(10) and metrics["output_tokens_per_request"] == pytest.approx(4)
    assert metrics["mean_in_flight"] == pytest.approx(0.8)  # Little's law: 0.8 s of requests in 1 s
    assert metrics["mean_decoding"] == pytest.approx(0.4)  # 0.2 s between first and last token, each
    assert metrics["samples"]["output_tokens"] == [3, 5]



def test_throughput_counts_the_unmeasured_requests_inside_the_window():
    measured = [record(1.0, [1.5, 2.0], finished=2.0), record(1.5, [2.5, 3.0], finished=3.0)]  # window 1.0 .. 3.0
    background = [record(0.0, [0.5, 1.2, 1.8], finished=1.8),  # a warm-up: 2 of its tokens and its end inside
                  record(2.5, [2.8, 3.5], finished=3.5)]  # keeps the load: 1 token inside, ends after
    metrics = load_point_metrics(measured, started=1.0, stopped=3.0, background=background)
    assert metrics["requests"] == 2 and metrics["e2e_ms"]["max"] == pytest.approx(1500)  # latencies: measured only
    assert metrics["output_tokens_per_s"] == pytest.approx((4 + 2 + 1) / 2.0)
    assert metrics["requests_per_s"] == pytest.approx(3.5 / 2)  # the token rate over the measured answers' 2 tokens
    assert metrics["mean_in_flight"] == pytest.approx((1.0 + 1.5 + 0.8 + 0.5) / 2.0)

def requests(count: int, tokens: int = 3) -> list[BenchRequest]:
    return [BenchRequest(f"prompt {i}", (1, 2, 3), tokens) for i in range(count)]


def test_closed_loop_keeps_the_concurrency_and_counts_failures():
    in_flight, most = 0, 0
    lock = threading.Lock()

    def send(request):
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        try:
            if request.prompt == "prompt 5":
                raise RequestFailed("no such model")
            for _ in range(request.max_new_tokens):
                time.sleep(0.01)
                yield 1
        finally:
            with lock:
                in_flight -= 1

    metrics = run_load_point(send, LoadPointRequests({"concurrency": 3}, requests(2), requests(9), None))
    assert most == 3
    assert (metrics["requests"], metrics["errors"], metrics["error_examples"]) == (9, 1, ["no such model"])
    assert metrics["output_tokens_per_request"] == 3 and metrics["load"] == {"concurrency": 3}
    harness = metrics["harness"]
    assert 0 < harness["seconds_per_token"] and 0 < harness["fraction_of_itl"] < 1


def test_open_loop_sends_at_the_arrival_times():
    sent = []
    origin = time.perf_counter()

    def send(request):
        sent.append(time.perf_counter() - origin)
        yield 1

    arrivals = [0.0, 0.1, 0.3, 0.35]
    metrics = run_load_point(send, LoadPointRequests({"request_rate": 10.0}, [], requests(4), arrivals))
    assert metrics["requests"] == 4 and metrics["errors"] == 0
    offsets = [at - sent[0] for at in sorted(sent)]
    assert offsets == pytest.approx(arrivals, abs=0.05)


def test_closed_loop_measures_at_full_concurrency_from_first_to_last_request():
    """No drain after the warm-up, no drain at the end: every measured request shares its whole life with concurrency - 1 others."""
    lives = []  # (prompt, start, end) of every request sent
    lock = threading.Lock()

    def send(request):
        start = time.perf_counter()
        try:
            for _ in range(request.max_new_tokens):
                time.sleep(0.01)
                yield 1
        finally:
            with lock:
                lives.append((request.prompt, start, time.perf_counter()))

    warmup = [BenchRequest(f"warm-up {i}", (1, 2, 3), 3) for i in range(3)]
    metrics = run_load_point(send, LoadPointRequests({"concurrency": 3}, warmup, requests(7, tokens=5), None))
    assert metrics["requests"] == 7 and metrics["errors"] == 0
    for prompt, start, end in (life for life in lives if life[0].startswith("prompt")):
        others = sum(max(0.0, min(end, e) - max(start, s)) for p, s, e in lives if p != prompt) / (end - start)
        assert others > 2 - 0.2, f"{prompt} ran beside {others:.2f} other requests on average, not 2"
    assert metrics["mean_in_flight"] == pytest.approx(3, abs=0.2)
    assert metrics["output_tokens_per_s"] == pytest.approx(3 / 0.01, rel=0.35)  # 3 streams of one token per 10 ms
