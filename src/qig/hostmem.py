"""Host memory while layers stream through: tensors kept on the host between uses, and freed memory given back.

:func:`to_host` and :class:`HostChunks` keep tensors on the host (pinned memory
when they come from a GPU) and copy them to the compute device on every read:
the calibration streams between layers (``qig.pipeline.capture.Chunk``) and a
scale group's inputs and reference outputs between the search's candidates
(``qig.methods.GroupContext``). The copies are exact, so a computation on them
gives the resident tensors' bits.

    >>> import torch
    >>> kept = HostChunks([torch.ones(2, 3)])
    >>> kept[0].sum().item(), len(kept)
    (6.0, 1)

glibc's allocator keeps freed blocks of the sizes it saw freed last on its heap
instead of unmapping them; with one decoder layer after another allocated and
freed, the process's resident memory then grows with the depth (measured: a
24-layer Qwen2-0.5B-sized decoder streamed from disk peaked at 0.65 GiB or 1.7
GiB from run to run, 0.65 GiB every time with the trim). :func:`trim` asks
glibc to return what is free (``malloc_trim``); elsewhere it does nothing.
What trim cannot undo is glibc's *dynamic mmap threshold*: each large block
freed raises the size above which blocks get their own mapping, so later
tensors of that size land in the heap, where a layer's transient buffers
fragment it. :func:`map_large_blocks` fixes the threshold (1 MiB) for the
process, as every streamed load does (``qig.loading.load_streamed``): a
24-layer 0.5B-wide streamed quantize-and-export peaked at 0.79-0.81 GiB, 0.61-0.62
GiB with it (its 6-layer run: 0.58).

    >>> trim()  # after a streamed layer is released
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Iterable, Iterator, Sequence

import torch


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t``: pinned memory for a CUDA tensor (so copies back can overlap), a plain copy otherwise."""
    if t.device.type == "cuda":
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
    return t.to("cpu", copy=True)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of the host tensor ``t`` on ``device`` (a copy on a CPU device too: the offload path, tested there)."""
    return t.to(device, copy=True, non_blocking=True)


class HostChunks(Sequence[torch.Tensor]):
    """Per-chunk tensors kept on the host; indexing or iterating gives a fresh copy on the device they came from.

    ``append`` (or the constructor) copies each tensor to the host as it comes, so
    the device holds one chunk at a time while the caller builds the list.
    """

    def __init__(self, tensors: Iterable[torch.Tensor] = ()) -> None:
        self._host: list[torch.Tensor] = []
        self.device: torch.device | None = None
        for t in tensors:
            self.append(t)

    def append(self, t: torch.Tensor) -> None:
        self.device = t.device if self.device is None else self.device
        self._host.append(to_host(t))

    def __len__(self) -> int:
        return len(self._host)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [to_device(t, self.device) for t in self._host[i]]
        return to_device(self._host[i], self.device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (to_device(t, self.device) for t in self._host)

    def nbytes(self) -> int:
        """Bytes held on the host."""
        return sum(t.numel() * t.element_size() for t in self._host)


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def map_large_blocks(threshold: int = 1 << 20) -> None:
    """Give every allocation of ``threshold`` bytes or more its own mapping, returned to the OS when freed
    (glibc's ``mallopt(M_MMAP_THRESHOLD)``, which also turns off the threshold's growth); elsewhere a no-op."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, threshold)


def trim() -> None:
    """Return the allocator's free heap memory to the OS (glibc); a no-op where there is no ``malloc_trim``."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
