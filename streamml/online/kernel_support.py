"""Building blocks of the compiled kernels: float16 storage, and a batch split over threads.

Numba has no float16 on the CPU: a float16 column is passed as its uint16 bits and
converted per element, by the CPU's own instructions (F16C on x86, always present on
arm64) or else in software. A big batch is split over ``threads`` plain Python threads
(each applies the events whose row falls in its part, with the GIL released), not numba's
``parallel=True``: GNU OpenMP, numba's usual threading layer, kills a forked child that
uses it once the parent has. :mod:`streamml.online.kernels` (the rules' kernels) and
:mod:`streamml.online.mixed` (the mixed learner's) build on them.
"""

from __future__ import annotations

import math
import threading

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

__all__ = ["FASTMATH", "NATIVE_HALF", "PARALLEL_MIN_EVENTS", "in_parts", "my_events", "sigmoid1"]

FASTMATH = {"reassoc", "contract"}  # vectorised dot products; no change to inf/nan handling


def _native_half() -> bool:
    """Can LLVM lower float16 <-> float32 conversions to instructions on the target CPU?
    (Without them it emits calls to compiler-rt helpers that numba does not link.)"""
    import llvmlite.binding as ll
    from numba.core import config

    if ll.get_process_triple().startswith(("aarch64", "arm64")):
        return True
    if config.CPU_NAME and config.CPU_NAME != "host":  # NUMBA_CPU_NAME pins another target
        return "+f16c" in (config.CPU_FEATURES or "")
    return "+f16c" in ll.get_host_cpu_features().flatten()


NATIVE_HALF = _native_half()


@intrinsic
def _h2f_native(typingctx, h):
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f2h_native(typingctx, x):
    def codegen(context, builder, sig, args):  # fptrunc rounds to nearest even, as numpy does
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@njit(cache=True)
def _h2f_soft(h):
    """float16 bits -> float32, by arithmetic (exact for all 65536 inputs)."""
    h = np.int32(h)
    e, m = (h >> 10) & 0x1F, h & 0x3FF
    if e == 0:
        v = np.float32(m) * np.float32(2.0**-24)
    elif e == 31:
        v = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    else:
        v = np.float32(m + 1024) * np.float32(2.0) ** np.float32(e - 25)
    return -v if h & 0x8000 else v


@njit(cache=True)
def _f2h_soft(x):
    """float32 -> float16 bits, rounded to nearest even, by arithmetic."""
    sign = 0x8000 if x < 0 or (x == 0 and math.copysign(1.0, x) < 0) else 0
    a = abs(np.float64(x))
    if a != a:
        return np.uint16(0x7E00)
    if a >= 65520.0:  # rounds past the largest float16, 65504
        return np.uint16(sign | 0x7C00)
    if a < 2.0**-14:  # subnormal: the bits are the multiple of 2^-24 (1024 = the smallest normal)
        return np.uint16(sign | int(np.rint(a * 2.0**24)))
    mant, exp = math.frexp(a)  # a = mant 2^exp, mant in [0.5, 1)
    q = int(np.rint(mant * 2048.0))  # 11 significant bits; exact scaling, then round half to even
    return np.uint16(sign | ((exp + 14) << 10) + q - 1024)  # q == 2048 carries into the exponent


def _to_f32(v):  # a stored residual element -> float32 (typed in numba only)
    raise NotImplementedError


def _from_f32(x, dtype):  # float32 -> an element of an array of ``dtype``
    raise NotImplementedError


@overload(_to_f32)
def _to_f32_impl(v):
    if v == types.uint16:
        return (lambda v: _h2f_native(v)) if NATIVE_HALF else (lambda v: _h2f_soft(v))
    return lambda v: np.float32(v)


@overload(_from_f32)
def _from_f32_impl(x, dtype):  # dtype: the array's .dtype, not the array (no refcounting per element)
    if dtype.dtype == types.uint16:
        return (lambda x, dtype: _f2h_native(x)) if NATIVE_HALF else (lambda x, dtype: _f2h_soft(x))
    return lambda x, dtype: x



@njit(cache=True)
def sigmoid1(a):
    return 0.5 * (1.0 + math.tanh(0.5 * a))



@njit(cache=True, nogil=True)
def my_events(rows, part, parts):
    """Positions of the events of part ``part`` of ``parts``, in order: those whose row is in
    a block of 8 consecutive rows numbered ``part`` mod ``parts``. A key has one row, so
    its events stay in one part, in order; blocks, not single rows, so that two parts
    share a cache line of the arrays only at block edges."""
    if parts == 1:
        return np.arange(rows.shape[0])
    mine = np.empty(rows.shape[0], np.int64)
    n = 0
    for e in range(rows.shape[0]):
        if (rows[e] >> 3) % parts == part:
            mine[n] = e
            n += 1
    return mine[:n]



def n_parts(n_events: int, threads: int) -> int:
    return max(1, min(threads, n_events // PARALLEL_MIN_EVENTS))


def in_parts(kernel, n_events: int, threads: int, *args) -> None:
    """``kernel(*args, part, parts)`` for every part, on as many threads."""
    parts = 1 if threads == 1 else n_parts(n_events, threads)
    if parts == 1:
        kernel(*args, 0, 1)
        return
    others = [threading.Thread(target=kernel, args=(*args, p, parts)) for p in range(1, parts)]
    for t in others:
        t.start()
    kernel(*args, 0, parts)
    for t in others:
        t.join()


# A batch is split over threads only if each gets at least this many events: below it,
# starting a thread costs more than it saves.
PARALLEL_MIN_EVENTS = 4096
