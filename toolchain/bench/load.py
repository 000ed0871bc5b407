"""Sending a load point's requests to a model: closed loop (N clients) or open loop (Poisson arrivals), timing each token as it arrives.

`run_load_point(send, point)` takes a `send(request)` that returns an iterator over the pieces of the
answer as they arrive (each piece: how many tokens it holds) and raises RequestFailed when the
backend refuses or fails the request. Every request runs in its own client thread; the client takes
the time the moment a piece arrives, so TTFT and ITL are what a caller of that backend sees. A closed
loop measures steady state, as perf_analyzer does: its clients go from the warm-up requests straight
to the measured ones and keep sending (unmeasured) requests until the last measured one ends, so
every measured request meets the full concurrency, not the synchronized start of N idle clients nor
the drain of the last ones; the load point's throughput counts every token that arrives while the
measured requests run, theirs and the others'. The
time the client spends on its own bookkeeping per token is measured and reported (`harness`), so a
result says how much of a latency is the harness's. Pure Python, like metrics.py.
"""

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from toolchain.bench.metrics import RequestRecord, load_point_metrics


@dataclass(frozen=True)
class BenchRequest:
    """One request: the prompt as text (what a server receives) and as token ids (what it tokenizes it to), and its answer length."""

    prompt: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int


@dataclass(frozen=True)
class LoadPointRequests:
    """What one load point sends: unmeasured warm-up requests, the measured ones, and (open loop) their arrival times in seconds."""

    load: dict
    warmup: list[BenchRequest]
    measured: list[BenchRequest]
    arrivals: list[float] | None


class RequestFailed(RuntimeError):
    """A backend refused or failed one request (counted as an error of the load point, not raised)."""


Send = Callable[[BenchRequest], Iterator[int]]


class Client:
    """Runs requests through `send` and keeps their records (measured or not) and the harness's own time per measured token."""

    def __init__(self, send: Send):
        self.send = send
        self.lock = threading.Lock()
        self.records: list[RequestRecord] = []
        self.unmeasured: list[RequestRecord] = []  # warm-up and load-keeping requests: throughput, never latency
        self.harness_seconds = 0.0
        self.harness_tokens = 0

    def run(self, request, measured: bool = True) -> None:
        record = RequestRecord(sent=time.perf_counter(), input_tokens=len(request.prompt_ids))
        overhead = 0.0
        try:
            for tokens in self.send(request):
                arrived = time.perf_counter()
                record.add(arrived, tokens)
                overhead += time.perf_counter() - arrived
        except RequestFailed as exc:
            record.error = str(exc)
        record.finished = time.perf_counter()
        with self.lock:
            if not measured:
                self.unmeasured.append(record)
                return
            self.records.append(record)
            self.harness_seconds += overhead
            self.harness_tokens += record.output_tokens


def closed_loop(client: Client, warmup: list, measured: list, concurrency: int) -> None:
    """`concurrency` threads, each sending its next request when its last one is answered: the warm-up requests, then the
    measured ones, then warm-up (or measured) requests again, unmeasured, while any measured request is still running."""
    pending = deque([(request, False) for request in warmup] + [(request, True) for request in measured])
    keep_load = itertools.cycle(warmup or measured)
    running_measured = len(measured)
    lock = threading.Lock()

    def worker() -> None:
        nonlocal running_measured
        while True:
            with lock:
                if pending:
                    request, is_measured = pending.popleft()
                elif running_measured:
                    request, is_measured = next(keep_load), False
                else:
                    return
            client.run(request, is_measured)
            if is_measured:
                with lock:
                    running_measured -= 1

    threads = [threading.Thread(target=worker, name=f"bench-client-{i}") for i in range(min(concurrency, len(warmup) + len(measured)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def open_loop(client: Client, requests: list, arrivals: list[float]) -> None:
    """Each request is sent at its arrival time (seconds after the start), in a thread of its own, whatever is still running."""
    started = time.perf_counter()
    threads = []
    for request, arrival in zip(requests, arrivals):
        delay = started + arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=client.run, args=(request,), name="bench-arrival")
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()


def run_load_point(send: Send, point) -> dict:
    """Warm up, then measure one load point; returns its metrics (metrics.load_point_metrics) and `harness`.

    The measurement window runs from the first measured request's send to the last one's end."""
    concurrency = point.load.get("concurrency", 1)
    client = Client(send)
    if point.arrivals is None:
        closed_loop(client, point.warmup, point.measured, concurrency)
    else:
        if point.warmup:
            closed_loop(Client(send), point.warmup, [], concurrency)
        open_loop(client, point.measured, point.arrivals)
    started = min(record.sent for record in client.records)
    stopped = max(record.finished for record in client.records)
    metrics = {"load": dict(point.load), **load_point_metrics(client.records, started, stopped, client.unmeasured)}
    per_token = client.harness_seconds / client.harness_tokens if client.harness_tokens else None
    itl = metrics["itl_ms"].get("mean")
    metrics["harness"] = {"seconds_per_token": per_token,
                          "fraction_of_itl": per_token * 1e3 / itl if per_token is not None and itl else None}
    return metrics
