"""A Prometheus collector for the daemon's memory, read at scrape time.

- ``ked_process_resident_memory_bytes``: resident set size now (``/proc/self/statm``; on systems
  without /proc, the peak instead).
- ``ked_process_peak_resident_memory_bytes``: the largest resident set so far (``getrusage``).
- ``ked_accelerator_memory_allocated_bytes{device}`` and ``ked_accelerator_memory_reserved_bytes{device}``:
  memory held by torch tensors and by torch's caching allocator on each CUDA device, only when
  torch is already imported and CUDA initialised (the collector never initialises CUDA itself).

prometheus_client's own `ProcessCollector` is not used because it is already registered on the
default registry, which production passes in.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

STATM = Path("/proc/self/statm")


def resident_bytes() -> int:
    """Resident set size of this process in bytes (the peak where /proc is unavailable)."""
    try:
        pages = int(STATM.read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_resident_bytes()
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    """The largest resident set size of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def accelerator_memory() -> list[tuple[str, int, int]]:
    """(device, allocated bytes, reserved bytes) for each CUDA device, if torch has initialised CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return [
        (f"cuda:{i}", int(torch.cuda.memory_allocated(i)), int(torch.cuda.memory_reserved(i)))
        for i in range(torch.cuda.device_count())
    ]


class ProcessMemoryCollector(Collector):
    """Memory gauges computed on each scrape."""

    def collect(self) -> Iterator[Metric]:
        rss = GaugeMetricFamily("ked_process_resident_memory_bytes", "Resident memory of the daemon process.")
        rss.add_metric([], resident_bytes())
        yield rss
        peak = GaugeMetricFamily("ked_process_peak_resident_memory_bytes", "Largest resident memory so far.")
        peak.add_metric([], peak_resident_bytes())
        yield peak
        devices = accelerator_memory()
        if devices:
            allocated = GaugeMetricFamily(
                "ked_accelerator_memory_allocated_bytes", "Memory held by torch tensors, by device.", labels=["device"]
            )
            reserved = GaugeMetricFamily(
                "ked_accelerator_memory_reserved_bytes", "Memory reserved by torch's allocator, by device.",
                labels=["device"],
            )
            for device, used, held in devices:
                allocated.add_metric([device], used)
                reserved.add_metric([device], held)
            yield allocated
            yield reserved

    def describe(self) -> Iterator[Metric]:
        # Described without collecting, so registering never touches CUDA; the accelerator series
        # come and go with the device and are not described.
        yield GaugeMetricFamily("ked_process_resident_memory_bytes", "")
        yield GaugeMetricFamily("ked_process_peak_resident_memory_bytes", "")
