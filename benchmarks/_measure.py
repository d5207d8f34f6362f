"""Shared helpers for the benchmark scripts (timing medians, peak memory, in-process
messages)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

from flwr.app import Message, MessageType, Metadata, RecordDict


def interleaved_medians(methods: dict[str, Callable[[], object]], repeats: int,
                        synchronize: Callable[[], object] = lambda: None) -> dict[str, float]:
    """Median seconds of each method over ``repeats`` rounds, the methods run interleaved
    in every round so slow phases of a shared machine hit them alike. ``synchronize``
    (e.g. ``torch.cuda.synchronize``) runs before each clock read: GPU work is asynchronous."""
    for fn in methods.values():  # warm-up (imports, numba compilation, CUDA kernels)
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def report_peak_growth(run: Callable[[], object]) -> None:
    """In a subprocess: run once and print, as JSON, how far the resident set's high-water
    mark rose above the resident set before the call (Linux: the mark is reset first)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    run()
    print(json.dumps({"extra": 1024 * (_status_kib("VmHWM") - before)}))


def peak_growth_in_subprocess(script: str, method: str, clients: int, params: int) -> int:
    """Run ``script --memory-of METHOD --clients K --params P`` in a fresh interpreter (it
    calls :func:`report_peak_growth`); return the growth it reports, in bytes."""
    args = ["--memory-of", method, "--clients", str(clients), "--params", str(params)]
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          check=True)
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["extra"])


def train_message(content: RecordDict, *, src: int, dst: int, reply_to: str = "") -> Message:
    """A TRAIN message outside a Flower runtime, which needs its Metadata given."""
    metadata = Metadata(
        run_id=1, message_id=uuid.uuid4().hex, src_node_id=src, dst_node_id=dst,
        reply_to_message_id=reply_to, group_id="1", created_at=time.time(), ttl=3600.0,
        message_type=MessageType.TRAIN,
    )  # fmt: skip
    return Message(content=content, metadata=metadata)
