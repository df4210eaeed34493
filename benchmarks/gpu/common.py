"""Shared helpers of the GPU checks: device, timing, peak memory, one JSON line per result.

Each check script runs in its own process (started by ``run_checks.py``), so that a
crash, a Triton compilation or a CUDA context never leaks into the next check, and
prints its results as ``RESULT {json}`` lines on stdout; everything else it prints
is log.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` (bytes held by tensors, allocator slack excluded); on
CPU the process's peak resident set (``VmHWM`` of ``/proc/self/status``) after
resetting it (``echo 5 > /proc/self/clear_refs``), minus the resident set before.
"""
import contextlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIB = 1024**3


def emit(**fields) -> None:
    """One result line for ``run_checks.py``."""
    print('RESULT ' + json.dumps(fields, default=str), flush=True)


def device_name(device) -> str:
    import torch
    if str(device).startswith('cuda'):
        return torch.cuda.get_device_name(device)
    import platform
    return f'cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)'


def _proc_status(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """``with PeakMemory(device) as peak: ...``; then ``peak.bytes`` (see module doc)."""

    def __init__(self, device):
        self.device = str(device)
        self.bytes = 0

    def __enter__(self):
        import torch
        if self.device.startswith('cuda'):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            with contextlib.suppress(OSError):
                with open('/proc/self/clear_refs', 'w') as f:
                    f.write('5')
            self._base = _proc_status('VmRSS')
        return self

    def __exit__(self, *exc):
        import torch
        if self.device.startswith('cuda'):
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._base
        else:
            self.bytes = max(0, _proc_status('VmHWM') - self._base)
        return False


class Timer:
    """Wall-clock seconds of a block, CUDA work included (synchronised)."""

    def __init__(self, device):
        self.device = str(device)
        self.seconds = 0.0

    def _sync(self):
        if self.device.startswith('cuda'):
            import torch
            torch.cuda.synchronize()

    def __enter__(self):
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self._start
        return False


def add_root_to_path() -> None:
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
