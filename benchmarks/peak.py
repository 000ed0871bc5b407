"""Peak of a quantity sampled in a background thread (torch-free, so a worker in another venv can import it)."""

import threading
from collections.abc import Callable


class PeakSampler:
    """The peak of `measure()` (e.g. a process's RSS in MB), sampled every `interval` seconds while in the block."""

    def __init__(self, measure: Callable[[], float], interval: float):
        self.measure, self.interval, self.stop = measure, interval, threading.Event()

    def sample(self) -> None:
        while not self.stop.wait(self.interval):
            self.peak = max(self.peak, self.measure())

    def __enter__(self):
        self.peak = self.measure()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.measure())
