"""Build, load and call the fused CPU Sinkhorn iteration (``csrc/sinkhorn_cpu.c``).

The kernel does one (f, g) iteration of log-domain Sinkhorn with one Gram product and one
exponential per score (see the C file for the derivation). It is compiled on first use with
the system C compiler (``$CC``, else ``gcc``/``cc``/``clang``; ``-O3 -march=native -fopenmp``,
about 0.3 s) into a cache folder and loaded with ctypes, so the package itself stays pure
Python. The cache file name hashes the source, the compiler command and this CPU's feature
flags, so a cache shared between different machines never runs code built for another CPU.

Environment:
    VDOT_EXT_KERNEL_CACHE       cache folder (default ``$XDG_CACHE_HOME/vdot_ext`` or ``~/.cache/vdot_ext``)
    VDOT_EXT_SINKHORN_KERNEL=0  never build/use the kernel (``backend='auto'`` then uses 'sdpa')
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ['KernelUnavailable', 'load_kernel', 'kernel_error', 'FusedCPUIteration', 'MIN_COLUMN_MASS']

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name('csrc') / 'sinkhorn_cpu.c'
FLAGS = ['-O3', '-march=native', '-fopenmp', '-fPIC', '-shared', '-std=gnu11']

# Column masses below this (or non-finite) are recomputed by an exact log-domain g half-step:
# the linear-domain sum is exact to float precision only while its largest terms are normal
# floats (≥ 1e-38) and the clamped/flushed exponentials (< 1.6e-38 each, Σ_i w_i ≤ 1) are
# negligible against it (< 1e-8 relative here).
MIN_COLUMN_MASS = 1e-30


class KernelUnavailable(RuntimeError):
    """The fused CPU kernel cannot be built or loaded here (the message says why)."""


_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_error: Optional[str] = None


def _cpu_signature() -> str:
    try:
        with open('/proc/cpuinfo') as fh:
            for line in fh:
                if line.startswith(('flags', 'Features')):
                    return line.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str:
    cc = os.environ.get('CC')
    if cc:
        return cc
    for name in ('gcc', 'cc', 'clang'):
        path = shutil.which(name)
        if path:
            return path
    raise KernelUnavailable('no C compiler found (set $CC or install gcc)')


def _cache_dir() -> Path:
    root = os.environ.get('VDOT_EXT_KERNEL_CACHE')
    if root:
        return Path(root)
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(base) / 'vdot_ext'


def _build() -> Path:
    cc = _compiler()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b'\0'.join([source, cc.encode(), ' '.join(FLAGS).encode(),
                                     _cpu_signature().encode(), platform.machine().encode()]))
    out_dir = _cache_dir()
    target = out_dir / f'sinkhorn_cpu-{key.hexdigest()[:16]}.so'
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    # compile to a private name, then rename: concurrent builders (ranks, test workers) are safe
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=out_dir)
    os.close(fd)
    cmd = [cc, *FLAGS, '-o', tmp, str(SOURCE), '-lm']
    logger.info('vdot_ext.ot: building the fused CPU Sinkhorn kernel: %s', ' '.join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        os.unlink(tmp)
        raise KernelUnavailable(f'compiler {cc!r} failed to run: {exc}') from exc
    if proc.returncode != 0:
        os.unlink(tmp)
        raise KernelUnavailable(f'compiling {SOURCE} failed (exit {proc.returncode}): '
                                f'{" ".join(cmd)}\n{proc.stderr.strip()[-2000:]}')
    os.replace(tmp, target)
    return target


def load_kernel() -> ctypes.CDLL:
    """The loaded kernel library (built on first call); raises :class:`KernelUnavailable`."""
    global _lib, _error
    with _lock:
        if _lib is not None:
            return _lib
        if _error is not None:
            raise KernelUnavailable(_error)
        try:
            if os.environ.get('VDOT_EXT_SINKHORN_KERNEL', '1') == '0':
                raise KernelUnavailable('disabled by VDOT_EXT_SINKHORN_KERNEL=0')
            if platform.system() != 'Linux':
                raise KernelUnavailable(f'built and tested on Linux only (this is {platform.system()})')
            lib = ctypes.CDLL(str(_build()))
            ptr, i64 = ctypes.c_void_p, ctypes.c_long
            lib.sinkhorn_cpu_fg.argtypes = [ptr] * 6 + [i64] * 5 + [ctypes.c_int, ctypes.c_float,
                                                                   ctypes.c_int, ptr, ptr]
            lib.sinkhorn_cpu_fg.restype = ctypes.c_int
            lib.sinkhorn_cpu_rows.restype = ctypes.c_int
            lib.sinkhorn_cpu_cols.restype = ctypes.c_int
        except KernelUnavailable as exc:
            _error = str(exc)
            raise
        except OSError as exc:
            _error = f'loading the built kernel failed: {exc}'
            raise KernelUnavailable(_error) from exc
        _lib = lib
        return lib


def kernel_error() -> Optional[str]:
    """None if the kernel loads, else the reason it does not."""
    try:
        load_kernel()
    except KernelUnavailable as exc:
        return str(exc)
    return None


class FusedCPUIteration:
    """f then g half-steps of log-domain Sinkhorn for one batch of problems, one kernel call each.

    Holds the padded copies of the centred clouds (rows of ``a`` to the kernel's row tile,
    columns of ``bᵀ`` to its column tile) for the whole solve. Call with the row-pass bias
    ``h = log μ + (g − ½‖b'‖²)/ε``, ε and, for an over-relaxed f, ``q = (f_old − ½‖a'‖²)/ε`` and ω;
    returns the row log-sum-exp ``L`` [P, I] and the column masses ``M`` [P, J] (float64) of the
    plan exp(c_i + S_ij) with c_i = log u_i + (1 − ω) q_i − ω L_i.
    """

    def __init__(self, ac: Tensor, bc: Tensor, log_u: Tensor):
        if ac.device.type != 'cpu' or ac.dtype != torch.float32 or bc.dtype != torch.float32:
            raise ValueError('FusedCPUIteration takes float32 CPU tensors, got '
                             f'{ac.dtype}/{bc.dtype} on {ac.device}')
        self.lib = load_kernel()
        rows, cols = self.lib.sinkhorn_cpu_rows(), self.lib.sinkhorn_cpu_cols()
        P, I, D = ac.shape
        J = bc.shape[1]
        self.shape = (P, I, J, D)
        self.Ip = -(-I // rows) * rows
        self.Jp = -(-J // cols) * cols
        self.A = ac.new_zeros(P, self.Ip, D)
        self.A[:, :I] = ac
        self.Bt = ac.new_zeros(P, D, self.Jp)
        self.Bt[:, :, :J] = bc.transpose(1, 2)
        # padded columns get a very negative bias: never a row maximum, exp() → 0
        self.h = ac.new_full((P, self.Jp), -1e30)
        self.log_u = log_u.to(torch.float32).contiguous()

    def __call__(self, h: Tensor, epsilon: float, q: Optional[Tensor] = None,
                 omega: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        P, I, J, D = self.shape
        self.h[:, :J] = h
        lse = torch.empty(P, I, dtype=torch.float32)
        mass = torch.empty(P, J, dtype=torch.float64)
        if omega is None or q is None:
            omega = torch.ones(P, dtype=torch.float64)
            q_ptr = None
        else:
            omega = omega.reshape(P).to(torch.float64).contiguous()
            q = q.to(torch.float32).contiguous()
            q_ptr = q.data_ptr()
        status = self.lib.sinkhorn_cpu_fg(
            self.A.data_ptr(), self.Bt.data_ptr(), self.h.data_ptr(), self.log_u.data_ptr(), q_ptr,
            omega.data_ptr(), P, I, self.Ip, J, self.Jp, D, 1.0 / float(epsilon), torch.get_num_threads(),
            lse.data_ptr(), mass.data_ptr())
        if status != 0:
            raise RuntimeError(f'sinkhorn_cpu_fg failed with status {status} '
                               '(1: bad padding, 2: out of memory)')
        return lse, mass
