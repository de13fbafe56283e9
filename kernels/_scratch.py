"""Per-call scratch of the chunked launchers, taken from a small cache instead of allocated.

The chunked path's reductions need buffers that live only inside one launcher call: the chunk
partials of the statistics (``mean``/``M2`` ``[K, C]``, counts ``[K]``, the pivot ``[C]``) and of
the backward sums (two ``[K, C]``), and the backward's combined sums ``[2, C]`` that its ``dx``
kernel reads. Every one is written by a kernel the call enqueues before a later kernel of the
same call reads it, and none is returned or saved. Allocating them took 7 of the chunked training
step's 14 allocations (about a third of its host time); :func:`take` hands out views of one cached
buffer instead: after the first call, one dictionary lookup.

Safety: a cached buffer is reused only by the same ``(thread, device, stream, dtype)`` -- the
slot's key:

* **streams**: the launches of two calls on one CUDA stream run in the order they were enqueued,
  so a call's kernels start after the previous call's reads of the scratch are done. Two streams
  never share a slot. A slot's buffer is allocated on the stream it serves, so the caching
  allocator's stream-ordered reuse covers its release as well (a regrow or
  :func:`release_scratch` while its kernels are queued), as for any tensor.
* **threads**: under the Triton interpreter (CPU) kernels run synchronously on the calling
  thread, so two threads must not share scratch: the thread id is in the key (a thread id reused
  after its thread ended inherits a slot nobody else uses any more).
* **CUDA graphs**: while the current stream is capturing, and on a CUDA tensor that is not on
  the current device (whose capture state is not the one queried), :func:`take` allocates fresh
  buffers as before: a graph would otherwise bake in the address of a cached buffer that it does
  not keep alive (a later regrow or :func:`release_scratch` frees it, and a replay would write
  freed memory). Fresh allocations made during capture come from the graph's private pool, which
  the graph owns.
* **autograd / aliasing**: scratch never leaves the launchers (outputs and saved tensors are
  allocated on their own), so nothing returned aliases the cache.
* other device types (streams this module does not know): fresh allocations.

Every view starts :data:`ALIGN_BYTES` into the buffer's aligned base (a fresh CUDA allocation is
aligned the same way), so pointer divisibility -- and with it the compiled variants and the AOT
record -- is what fresh allocations gave; the ``[2, C]`` sums keep their second row ``C``
elements after the first, as ``buf[1]`` was.

Memory: a slot holds one buffer as large as the largest scratch any call on it needed (the
partials stay within ~3% of that layer's input, ``_plan``), grown (replaced) when a call needs
more, plus its views. Slots are bounded (:data:`MAX_SLOTS`; all dropped when full) and
:func:`release_scratch` drops every thread's (call it before ``torch.cuda.empty_cache()`` to give
the memory back to the device). ``RNIP_SCRATCH_CACHE=0`` in the environment (read at import) or
``ENABLED = False`` turns the cache off: every call allocates, as before.
"""

from __future__ import annotations

import os
from threading import get_ident

import torch
from torch import Tensor

__all__ = ["ALIGN_BYTES", "ENABLED", "MAX_SLOTS", "STATS", "SUMS", "SUMS_ROWS", "fresh", "release_scratch",
           "slot_buffers", "take"]  # fmt: skip

# What take() hands out, per kind, for (rows, C):
STATS = 0  # (mean_part [rows, C], m2_part [rows, C], counts [rows], pivot [C])
SUMS = 1  # (dy_part [rows, C], dyxmu_part [rows, C])
SUMS_ROWS = 2  # (SUMS' pair, (sum(dy) [C], sum(dy * xhat) [C])): the rows of one [2, C] block

ALIGN_BYTES = 512  # the CUDA caching allocator's block granularity
MAX_SLOTS = 64
MAX_VIEWS = 1024  # view sets of all slots (one per slot and (kind, rows, C)); all dropped when full

ENABLED = os.environ.get("RNIP_SCRATCH_CACHE", "1").strip() != "0"


_SLOTS: dict = {}  # (thread, device, stream, dtype) -> the slot's flat buffer
_VIEWS: dict = {}  # (thread, device, stream, dtype, kind, rows, C) -> views of that slot's buffer


def _shapes(kind: int, rows: int, c: int) -> tuple:
    part = (rows, c)
    if kind == STATS:
        return part, part, (rows,), (c,)
    if kind == SUMS:
        return part, part
    return part, part, (2, c)


def fresh(device, dtype: torch.dtype, kind: int, rows: int, c: int) -> tuple[Tensor, ...]:
    """What :func:`take` returns, each buffer a fresh allocation (the uncached path)."""
    return _group(kind, [torch.empty(shape, dtype=dtype, device=device) for shape in _shapes(kind, rows, c)])


def _group(kind: int, buffers: list) -> tuple:
    """The buffers of :func:`_shapes` as :func:`take` returns them."""
    if kind == SUMS_ROWS:
        sums = buffers[2]
        return (buffers[0], buffers[1]), (sums[0], sums[1])
    return tuple(buffers)


def _stream(device):
    """The key of the stream the launches on ``device`` go to, or ``None`` where scratch must be
    allocated fresh (see the module docstring)."""
    kind = device.type
    if kind == "cpu" or kind == "meta":  # interpreter: synchronous on this thread; meta: nothing runs
        return 0
    if kind == "cuda":
        index = device.index
        # Private but stable (Triton's launcher reads the stream with the first): the public
        # torch.cuda.current_stream() builds a Stream object, several times the cost.
        if torch._C._cuda_getDevice() != index or torch._C._cuda_isCurrentStreamCapturing():
            return None
        return torch._C._cuda_getCurrentRawStream(index)
    return None


def take(device, dtype: torch.dtype, kind: int, rows: int, c: int) -> tuple[Tensor, ...]:
    """Scratch of ``kind`` (:data:`STATS`, :data:`SUMS`, :data:`SUMS_ROWS`) for ``rows`` chunks and
    ``c`` channels, in ``dtype`` on ``device``: views of the calling thread's cached buffer for the
    current stream, or fresh buffers where caching is off or unsafe. Contents are undefined (a
    previous call's values): every kernel reading scratch reads what the same call wrote."""
    if ENABLED:
        stream = _stream(device)
        if stream is not None:
            key = (get_ident(), device, stream, dtype, kind, rows, c)
            found = _VIEWS.get(key)
            return _carve(key) if found is None else found
    return fresh(device, dtype, kind, rows, c)


def _carve(key) -> tuple[Tensor, ...]:
    """A miss: (re)allocate the slot's buffer if it is too small, then carve and cache the views."""
    _, device, _, dtype, kind, rows, c = key
    slot = key[:4]
    align = max(ALIGN_BYTES // dtype.itemsize, 1)
    spans = []
    need = 0
    for shape in _shapes(kind, rows, c):
        numel = 1
        for size in shape:
            numel *= size
        spans.append((need, numel, shape))
        need += -(-numel // align) * align
    flat = _SLOTS.get(slot)
    if flat is None or flat.numel() < need:
        if flat is None and len(_SLOTS) >= MAX_SLOTS:
            release_scratch()
        # Views of a replaced buffer go with it (it is freed once the last is dropped); only
        # this thread adds or drops its slot's entries.
        for other in [k for k in list(_VIEWS) if k[:4] == slot]:
            _VIEWS.pop(other, None)
        flat = _SLOTS[slot] = torch.empty(need, dtype=dtype, device=device)
    if len(_VIEWS) >= MAX_VIEWS:
        _VIEWS.clear()
    views = _VIEWS[key] = _group(kind, [flat[s:s + n].view(shape) for s, n, shape in spans])
    return views


def release_scratch() -> None:
    """Drop every thread's cached scratch (its memory returns to the caching allocator)."""
    _VIEWS.clear()
    _SLOTS.clear()


def slot_buffers() -> list[Tensor]:
    """The cached buffers of every slot (tests: what returned tensors must not alias)."""
    return list(_SLOTS.values())
