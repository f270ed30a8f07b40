"""Server metrics in the Prometheus text format (no client library needed).

Counters: requests by endpoint and status, prompt and completion tokens, decoding steps, and the
seconds the worker thread spent in each phase of its loop (:data:`WORKER_PHASES`: where a step's
time goes on a live server). Gauges: queue depth and running sequences (the scheduler's own
counts, read when rendered). Histograms: time to first token and inter-token latency, in seconds.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter

# Bucket bounds in seconds: from a fast GPU step (~1 ms) to a slow CPU prefill (tens of seconds).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


#: The worker's phases: waiting for work, running jobs between steps (the deductive endpoint),
#: prefilling arriving sequences, launching a block of steps, waiting for the device to finish
#: it (collect), handing its tokens to their sequences (route, detokenizing included) and
#: sending their events to the event loop (flush).
WORKER_PHASES = ("idle", "jobs", "admit", "launch", "collect", "route", "flush")


class Histogram:
    """A cumulative histogram with fixed buckets (thread-safe)."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.total += value
            self.count += 1

    def observe_many(self, values: list[float], zeros: int = 0) -> None:
        """:meth:`observe` each of ``values``, in order, and 0 ``zeros`` times (one lock)."""
        buckets, counts = self.buckets, self.counts
        with self._lock:
            for value in values:
                counts[bisect.bisect_left(buckets, value)] += 1
                self.total += value
            counts[bisect.bisect_left(buckets, 0.0)] += zeros
            self.count += len(values) + zeros

    def lines(self, name: str, help_text: str) -> list[str]:
        with self._lock:
            out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
            running = 0
            for bound, n in zip(self.buckets, self.counts):
                running += n
                out.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
            out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
            out.append(f"{name}_sum {self.total:.6f}")
            out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    """Everything ``GET /metrics`` reports."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram()
        self.itl = Histogram()
        self.decode_steps = 0  # steps of the running batch (a block of k counts k)
        # Written by the worker thread alone; read (a snapshot) when rendered.
        self.worker_seconds = dict.fromkeys(WORKER_PHASES, 0.0)
        # While the worker waits for work: since when (its idle seconds are added when it
        # wakes, so a reading meanwhile adds the wait so far: the counter is current).
        self.idle_since: float | None = None
        self._lock = threading.Lock()

    def worker_waits(self, since: float) -> None:
        """The worker waits for work, idle since ``since`` (``time.perf_counter``)."""
        with self._lock:
            self.idle_since = since

    def worker_woke(self, since: float) -> float:
        """The worker, idle since ``since``, goes to work: its idle seconds up to now are added
        and the wait closed in one step, the clock read inside it (a reading sees the wait
        either ongoing or added, never both or neither, and never later than the end it
        adds). Returns now."""
        with self._lock:
            now = time.perf_counter()
            self.worker_seconds["idle"] += now - since
            self.idle_since = None
        return now

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def render(self, queue_depth: int, running: int) -> str:
        """The Prometheus text exposition (format 0.0.4), with the scheduler's current
        ``queue_depth`` (sequences waiting for a slot) and ``running`` (sequences decoding)."""
        lines = [
            "# HELP pldr_requests_total HTTP requests by endpoint and status code.",
            "# TYPE pldr_requests_total counter",
        ]
        with self._lock:
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'pldr_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        lines += [
            "# HELP pldr_prompt_tokens_total Prompt tokens of admitted requests.",
            "# TYPE pldr_prompt_tokens_total counter",
            f"pldr_prompt_tokens_total {self.prompt_tokens}",
            "# HELP pldr_completion_tokens_total Tokens generated.",
            "# TYPE pldr_completion_tokens_total counter",
            f"pldr_completion_tokens_total {self.completion_tokens}",
            "# HELP pldr_queue_depth Sequences waiting for a decoding slot.",
            "# TYPE pldr_queue_depth gauge",
            f"pldr_queue_depth {queue_depth}",
            "# HELP pldr_running_sequences Sequences in the running batch.",
            "# TYPE pldr_running_sequences gauge",
            f"pldr_running_sequences {running}",
        ]
        lines += [
            "# HELP pldr_decode_steps_total Decoding steps of the running batch.",
            "# TYPE pldr_decode_steps_total counter",
            f"pldr_decode_steps_total {self.decode_steps}",
            "# HELP pldr_worker_seconds_total Seconds the worker thread spent per phase.",
            "# TYPE pldr_worker_seconds_total counter",
        ]
        with self._lock:
            seconds_now, since = dict(self.worker_seconds), self.idle_since
            if since is not None:
                seconds_now["idle"] += max(0.0, time.perf_counter() - since)
        for phase, seconds in seconds_now.items():
            lines.append(f'pldr_worker_seconds_total{{phase="{phase}"}} {seconds:.6f}')
        lines += self.ttft.lines(
            "pldr_time_to_first_token_seconds", "From queueing a sequence to its first token."
        )
        lines += self.itl.lines(
            "pldr_inter_token_latency_seconds", "Between two tokens of one sequence."
        )
        return "\n".join(lines) + "\n"
