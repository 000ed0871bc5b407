"""Benchmark workloads: what is asked of every model, declared once in a YAML file, and the seeded requests drawn from it.

A workload says how long prompts and answers are (fixed, or drawn per request from a seeded
distribution), how many requests each load point measures after how many unmeasured warm-up ones,
the load points (a sweep of concurrent clients, or of Poisson arrival rates), the seed, and where
prompts come from (synthetic token ids, or the eval split of the data). Shipped workloads live in
`benchmarks/workloads/`, which ships in the package as `toolchain/workloads` (a link to it), so
`load_workload("cpu-128-128")` works after a plain wheel install too.

The same seed gives the same prompts, lengths and arrival times on every backend and for every
model, so a teacher and its students answer exactly the same requests. Each load point draws its own
prompts (a server that caches prompt prefixes gains nothing from a previous load point). Not here:
sending the requests (load.py) or measuring them (metrics.py).
"""

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from toolchain.bench.load import BenchRequest, LoadPointRequests
from toolchain.errors import UserError, setting, validation_message
from toolchain.named_yaml import builtin_names, read_named_yaml
from toolchain.settings import DataConfig, Section

WORKLOADS_DIR = Path(__file__).resolve().parent.parent / "workloads"
PROMPT_FIT_ROUNDS = 8  # decode/re-encode rounds that make a prompt's text tokenize to its drawn length


class LengthDistribution(Section):
    """Token lengths drawn per request: uniform integers in [min, max], or a normal distribution rounded and clipped to [min, max]."""

    distribution: Literal["uniform", "normal"] = Field(..., description="uniform or normal.")
    min: int = Field(..., gt=0, description="Shortest length, in tokens.")
    max: int = Field(..., gt=0, description="Longest length, in tokens.")
    mean: float | None = Field(None, gt=0, description="Mean of a normal distribution.")
    stddev: float | None = Field(None, ge=0, description="Standard deviation of a normal distribution.")

    @model_validator(mode="after")
    def consistent(self):
        if self.min > self.max:
            raise ValueError(f"min {self.min} > max {self.max}")
        if self.distribution == "normal" and (self.mean is None or self.stddev is None):
            raise ValueError("a normal distribution needs mean and stddev")
        if self.distribution == "uniform" and (self.mean is not None or self.stddev is not None):
            raise ValueError("a uniform distribution takes min and max only (no mean or stddev)")
        return self

    def expected(self) -> float:
        return (self.min + self.max) / 2 if self.distribution == "uniform" else float(np.clip(self.mean, self.min, self.max))

    def draw(self, rng: np.random.Generator, count: int) -> list[int]:
        if self.distribution == "uniform":
            return [int(value) for value in rng.integers(self.min, self.max + 1, size=count)]
        return [int(value) for value in np.clip(np.rint(rng.normal(self.mean, self.stddev, size=count)), self.min, self.max)]


class Workload(Section):
    """One benchmark workload; every backend and every model gets exactly the requests it describes."""

    name: str = Field("", description="Workload name (the YAML file name without .yaml).")
    description: str = Field("", description="What the workload is for.")
    input_len: int | LengthDistribution = Field(128, description="Prompt tokens per request: a number, or {distribution: uniform|normal, min, max, mean, stddev}.")
    output_len: int | LengthDistribution = Field(128, description="New tokens asked for per request (EOS may end one earlier): a number or a distribution.")
    requests: int | list[int] = Field(
        16, description="Measured requests per load point: one number, or one per load point (batch 1 needs fewer than saturation).")
    warmup: int = Field(1, ge=0, description="Requests sent before each load point's measured ones, at the same load, and not measured; a closed loop sends at least one per client, so no measured request meets the clients' synchronized start.")
    concurrency: list[int] | None = Field(None, min_length=1, description="Closed loop: this many clients each send a request when their last one is answered; one load point per value.")
    request_rate: list[float] | None = Field(None, min_length=1, description="Open loop: requests arrive as a Poisson process at this many per second; one load point per value.")
    seed: int = Field(0, description="Seed of the prompts, the drawn lengths and the arrival times.")
    prompts: Literal["synthetic", "data"] = Field("synthetic", description="synthetic: random token ids of the tokenizer's vocabulary; data: text from the eval split of the data section (--data).")

    @field_validator("input_len", "output_len", mode="before")
    @classmethod
    def length_or_distribution(cls, value):
        """A mapping is a distribution: validate it as one, so its own problem is reported (not the int alternative's)."""
        if not isinstance(value, dict):
            return value
        try:
            return LengthDistribution.model_validate(value)
        except ValidationError as exc:
            field, message = validation_message(exc)
            raise ValueError(f"{field}: {message}" if field else message) from None

    @field_validator("input_len", "output_len")
    @classmethod
    def positive_length(cls, length: int | LengthDistribution) -> int | LengthDistribution:
        if isinstance(length, int) and length <= 0:
            raise ValueError(f"a length must be a positive number of tokens, got {length}")
        return length

    @field_validator("requests")
    @classmethod
    def positive_requests(cls, requests: int | list[int]) -> int | list[int]:
        counts = requests if isinstance(requests, list) else [requests]
        if not counts or any(count <= 0 for count in counts):
            raise ValueError(f"requests must be positive, got {requests}")
        return requests

    @field_validator("concurrency", "request_rate")
    @classmethod
    def positive_sweep(cls, values: list | None, info: ValidationInfo) -> list | None:
        if values is not None and any(value <= 0 for value in values):
            raise ValueError(f"every {info.field_name.replace('_', ' ')} must be positive, got {values}")
        return values

    @model_validator(mode="after")
    def one_sweep(self):
        if (self.concurrency is None) == (self.request_rate is None):
            raise ValueError("give exactly one sweep: concurrency (closed loop) or request_rate (Poisson arrivals)")
        points = len(self.concurrency or self.request_rate)
        if isinstance(self.requests, list) and len(self.requests) != points:
            raise ValueError(f"requests lists {len(self.requests)} counts for {points} load points; give one per load point, or one number")
        return self

    def requests_at(self, index: int) -> int:
        """Measured requests of load point `index`."""
        return self.requests[index] if isinstance(self.requests, list) else self.requests

    def load_points(self) -> list[dict]:
        """The sweep as load descriptions, in order: {"concurrency": c} or {"request_rate": r}."""
        if self.concurrency is not None:
            return [{"concurrency": level} for level in self.concurrency]
        return [{"request_rate": rate} for rate in self.request_rate]

    def longest(self) -> tuple[int, int]:
        """The longest prompt and answer this workload can ask for."""
        return length_bound(self.input_len), length_bound(self.output_len)

    def expected_lengths(self) -> tuple[float, float]:
        """Mean prompt and answer lengths (what projections are computed at)."""
        return expected_length(self.input_len), expected_length(self.output_len)


def length_bound(length: int | LengthDistribution) -> int:
    return length if isinstance(length, int) else length.max


def expected_length(length: int | LengthDistribution) -> float:
    return float(length) if isinstance(length, int) else length.expected()


def shipped_workload_names() -> list[str]:
    return builtin_names(WORKLOADS_DIR)


def load_workload(workload: str | Path, overrides: dict | None = None) -> Workload:
    """A shipped workload by name, or a YAML file, with `overrides` of its fields applied.

    Overriding one sweep (concurrency or request_rate) replaces the other: `--request-rate 2` on a
    concurrency workload measures arrivals at 2/s. Every problem is a one-line UserError naming the field.
    """
    data, name = read_named_yaml(workload, WORKLOADS_DIR, "workload", "input_len, output_len, requests, concurrency or request_rate, ...")
    data.setdefault("name", name)
    overrides = {key: value for key, value in (overrides or {}).items() if value is not None}
    for sweep, other in (("concurrency", "request_rate"), ("request_rate", "concurrency")):
        if sweep in overrides:
            data.pop(other, None)
    data.update(overrides)
    try:
        return Workload.model_validate(data)
    except ValidationError as exc:
        field, message = validation_message(exc)
        top = field.split(".")[0]
        shown = setting(f"workload.{top}") + field[len(top):] if top in overrides else field
        raise UserError(f"invalid workload {workload}: {shown + ': ' if shown else ''}{message}") from None


def fitted_prompt(tokenizer, candidate_ids: list[int], length: int, extra_ids) -> tuple[str, list[int]]:
    """Text whose tokenization (special tokens included, as a server tokenizes it) has `length` tokens.

    Decoding ids and encoding the text again need not give the same ids (merges, partial characters),
    so the text is trimmed or extended and re-encoded until it has the drawn length; after
    PROMPT_FIT_ROUNDS rounds the closest text is kept (its real length is what gets recorded).
    """
    ids = list(candidate_ids)
    specials = len(tokenizer("")["input_ids"])
    text, encoded = "", []
    for _ in range(PROMPT_FIT_ROUNDS):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        encoded = tokenizer(text)["input_ids"]
        if len(encoded) == length:
            break
        plain = tokenizer(text, add_special_tokens=False)["input_ids"]
        wanted = max(1, length - specials)
        ids = plain[:wanted] if len(plain) > wanted else plain + [next(extra_ids) for _ in range(wanted - len(plain))]
    return text, encoded


def synthetic_ids(tokenizer, rng: np.random.Generator):
    """An endless stream of random ordinary (non-special) token ids of the tokenizer's vocabulary."""
    special = set(tokenizer.all_special_ids)
    vocabulary = np.array([token for token in range(len(tokenizer)) if token not in special])
    while True:
        yield from (int(token) for token in rng.choice(vocabulary, size=1024))


def data_ids(tokenizer, data: DataConfig, length: int):
    """An endless stream of token ids of real text: the rows of the data's eval split, in order, cycled."""
    from toolchain.data import prepare_data

    rows = prepare_data(data.model_copy(update={"seq_len": length}), tokenizer).split("eval")
    while True:
        for row in rows:
            yield from (int(token) for token in row)


def draw_requests(workload: Workload, tokenizer, data: DataConfig | None = None) -> list[LoadPointRequests]:
    """The requests of every load point of the workload, seeded: the same for every backend and model."""
    if workload.prompts == "data" and data is None:
        raise UserError(f"workload {workload.name or ''} takes its prompts from the data; give the data ({setting('data.spec')})")
    points = []
    for index, load in enumerate(workload.load_points()):
        rng = np.random.default_rng([workload.seed, index])
        warmup = max(workload.warmup, load.get("concurrency", 0))  # in a closed loop, at least one warm-up request per client
        count = warmup + workload.requests_at(index)
        inputs = draw_lengths(workload.input_len, rng, count)
        outputs = draw_lengths(workload.output_len, rng, count)
        source = data_ids(tokenizer, data, max(inputs)) if workload.prompts == "data" else synthetic_ids(tokenizer, rng)
        requests = []
        for input_len, output_len in zip(inputs, outputs):
            text, ids = fitted_prompt(tokenizer, [next(source) for _ in range(input_len)], input_len, source)
            requests.append(BenchRequest(text, tuple(ids), output_len))
        arrivals = None
        if "request_rate" in load:
            gaps = np.random.default_rng([workload.seed, index, 1]).exponential(1 / load["request_rate"], size=workload.requests_at(index))
            arrivals = [float(value) for value in np.cumsum(gaps) - gaps[0]]  # the first request goes at once
        points.append(LoadPointRequests(load, requests[:warmup], requests[warmup:], arrivals))
    return points


def draw_lengths(length: int | LengthDistribution, rng: np.random.Generator, count: int) -> list[int]:
    return [length] * count if isinstance(length, int) else length.draw(rng, count)
