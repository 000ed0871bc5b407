"""Latency and throughput of one load point, from the token timeline of each request, named as trtllm-bench, genai-perf and AIPerf name them.

A request's timeline is when it was sent, when each piece of its answer arrived and how many tokens
each piece held. From it: time to first token (TTFT), inter-token latency (ITL: the time between the
first and the last token over the tokens after the first, per request, as genai-perf and AIPerf
define it), end-to-end latency (E2E), and per load point request throughput, output tokens/s and
output tokens/s per user (1 / ITL, averaged over requests, as AIPerf reports it), and by Little's law
the mean number of requests in flight and in their decode phase (what the bound takes as the batch).
Each latency has
mean, p50, p90, p95, p99 (nearest rank, the definition those tools use for small samples), min and
max. Pure Python: no framework, no clock of its own (callers pass perf_counter times), so GPU
scripts that carry only torch can import it.
"""

import math
import statistics
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 95, 99)


@dataclass
class RequestRecord:
    """The timeline of one request: send time, arrival time and token count of every piece, and an error if it failed."""

    sent: float
    input_tokens: int
    arrivals: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    finished: float | None = None
    error: str | None = None

    def add(self, at: float, tokens: int) -> None:
        self.arrivals.append(at)
        self.tokens.append(tokens)

    @property
    def answered(self) -> bool:
        return self.error is None and bool(self.arrivals)

    @property
    def output_tokens(self) -> int:
        return sum(self.tokens)

    def ttft(self) -> float:
        return self.arrivals[0] - self.sent

    def e2e(self) -> float:
        return (self.finished if self.finished is not None else self.arrivals[-1]) - self.sent

    def itl(self) -> float | None:
        """Seconds per token after the first; None for a one-token answer.

        The tokens of the first piece all arrived at the first token's time, so they are not counted
        as later tokens (a backend that streams chunks of several tokens reports fewer, larger gaps)."""
        later = self.output_tokens - self.tokens[0]
        return (self.arrivals[-1] - self.arrivals[0]) / later if later > 0 else None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else float("nan")


def summarize(values: list[float]) -> dict:
    """mean, p50, p90, p95, p99, min, max of `values`; empty for no values."""
    if not values:
        return {}
    return {"mean": statistics.fmean(values), **{f"p{q}": percentile(values, q) for q in PERCENTILES}, "min": min(values), "max": max(values)}


def overlap(start: float, end: float, window_start: float, window_end: float) -> float:
    return max(0.0, min(end, window_end) - max(start, window_start))


def load_point_metrics(records: list[RequestRecord], started: float, stopped: float, background: list[RequestRecord] = ()) -> dict:
    """The metrics of one load point: `records` of its measured requests, sent from `started` until `stopped` (perf_counter seconds).

    Latencies are over the answered measured requests; a failed request counts in `errors` and nowhere
    else. Throughputs and the Little's-law counts are over the window from `started` to `stopped` and
    take in `background`, requests that kept the load during it unmeasured (a closed loop's warm-up and
    load-keeping requests): every token that arrived inside the window; requests/s is that token rate
    over the measured requests' mean answer length (counting the answers that end inside the window
    would count the warm-ups a closed loop's clients were finishing when the window opened).
    `samples` keeps every measured request's values and its send time in the window (for plots).
    """
    answered = [record for record in records if record.answered]
    in_window = [*answered, *(record for record in background if record.answered)]
    wall = stopped - started
    output_tokens = [record.output_tokens for record in answered]
    window_tokens = sum(count for record in in_window for at, count in zip(record.arrivals, record.tokens) if started <= at <= stopped)
    itls = [record.itl() for record in answered]
    itl_values = [value for value in itls if value is not None]
    ms = lambda values: [value * 1e3 for value in values]  # noqa: E731
    ttft, e2e = [record.ttft() for record in answered], [record.e2e() for record in answered]
    in_flight = sum(overlap(record.sent, record.sent + record.e2e(), started, stopped) for record in in_window)
    decoding = sum(overlap(record.arrivals[0], record.arrivals[-1], started, stopped) for record in in_window)
    return {
        "requests": len(records),
        "errors": len(records) - len(answered),
        "error_examples": sorted({record.error for record in records if record.error})[:3],
        "duration_s": wall,
        "input_tokens_per_request": statistics.fmean([record.input_tokens for record in answered]) if answered else None,
        "output_tokens_per_request": statistics.fmean(output_tokens) if answered else None,
        "ttft_ms": summarize(ms(ttft)),
        "itl_ms": summarize(ms(itl_values)),
        "e2e_ms": summarize(ms(e2e)),
        "requests_per_s": window_tokens / statistics.fmean(output_tokens) / wall if wall > 0 and answered and any(output_tokens) else None,
        "output_tokens_per_s": window_tokens / wall if wall > 0 else None,
        "output_tokens_per_s_per_user": statistics.fmean([1 / value for value in itl_values if value > 0]) if itl_values else None,
        "mean_in_flight": in_flight / wall if wall > 0 else None,  # Little's law: the average number of requests sent and not yet answered
        "mean_decoding": decoding / wall if wall > 0 else None,  # ... between first and last token
        "samples": {"ttft_ms": ms(ttft), "itl_ms": ms(itl_values), "e2e_ms": ms(e2e), "output_tokens": output_tokens,
                    "sent_s": [record.sent - started for record in answered]},
    }
