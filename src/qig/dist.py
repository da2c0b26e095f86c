"""Data-parallel calibration on torch.distributed: which chunks are this process's, and ordered reductions.

Under ``torchrun --nproc-per-node N -m qig quantize ...`` (or ``qig.quantize``
inside an initialised process group) the calibration chunks are dealt to the
ranks round-robin: chunk i (``batch_size`` consecutive samples, the same
chunks a single process makes) goes to rank ``i % N``. Every rank holds the
current layer and its own chunks of both streams.

What the methods sum over chunks (the search's weighted losses, AWQ's channel
means, MBQ's gradient sums, the token weights kept for the report) is gathered
per chunk and summed **in global chunk order** on every rank, so every rank
adds the very numbers a single process adds, in the same order: the results
are the single process's bits, and no rank can pick another scale. (GPTQ's
Hessians are the exception: see ``qig.pipeline.gptq``.)

Every exchange carries a status: a rank that fails sends its message in place
of its data at the exchange the others are waiting in, and every rank raises
it (:func:`fail`), so one bad shard stops the whole run with its reason.

    >>> ranks = current()  # outside a process group: one rank
    >>> ranks.size, ranks.mine(3)
    (1, [0, 1, 2])
    >>> ordered([0, 1, 2])  # one rank: its own chunks, as they are
    [0, 1, 2]
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from qig.errors import QigError


class RankFailed(QigError):
    """Another rank failed; its message, raised here (this rank must not report it again)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank of size."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, n_chunks: int) -> list[int]:
        """The global indices of this rank's chunks (round-robin)."""
        return list(range(self.rank, n_chunks, self.size))


_current = Ranks()


def current() -> Ranks:
    """The ranks of the run in progress (one rank outside a process group)."""
    return _current


@contextlib.contextmanager
def use(ranks: Ranks) -> Iterator[Ranks]:
    """Make ``ranks`` the current ones for the duration (the pipeline sets them for a run)."""
    global _current
    previous, _current = _current, ranks
    try:
        yield ranks
    finally:
        _current = previous


def from_process_group() -> Ranks:
    """The ranks of the initialised default process group; one rank when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def init_from_env(device: str) -> tuple[Ranks, str]:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1), NCCL on CUDA, gloo on CPU.

    Returns the ranks and this rank's device (``cuda`` becomes ``cuda:<LOCAL_RANK>``).
    Outside torchrun: one rank, the device as given.
    """
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return from_process_group(), device
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if on_cuda else "gloo")
    return from_process_group(), device


def run_on_ranks(device: str, work: Callable[[Ranks, str], int]) -> int:
    """``work(ranks, device)`` on this rank of a ``torchrun`` launch (or in this one process), ranks made current.

    One rank speaks (the others log warnings only); a rank that fails sends its
    message to the others, which stop with it instead of waiting in an exchange;
    the process group is destroyed at the end.
    """
    import logging

    from qig.errors import QigError

    ranks, device = init_from_env(device)
    if ranks.size > 1 and not ranks.main:
        logging.getLogger("qig").setLevel(logging.WARNING)
    try:
        with use(ranks):
            try:
                return work(ranks, device)
            except (RankFailed, KeyboardInterrupt):
                raise
            except BaseException as exc:
                if ranks.size > 1:  # the other ranks wait in an exchange: they stop with this message
                    message = str(exc) if isinstance(exc, QigError) else f"{type(exc).__name__}: {exc}"
                    with contextlib.suppress(RankFailed):
                        fail(message)
                raise
    finally:
        if ranks.size > 1:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _exchange(payload, error: str | None = None) -> list:
    """Every rank's payload, in rank order; raises the first failing rank's message on every rank."""
    ranks = current()
    if ranks.size == 1:
        if error is not None:
            raise RankFailed(error)
        return [payload]
    import torch.distributed as dist

    out: list = [None] * ranks.size
    dist.all_gather_object(out, (error, payload))
    for r, (err, _) in enumerate(out):
        if err is not None:
            raise RankFailed(err if r == ranks.rank else f"rank {r} of {ranks.size} failed: {err}")
    return [p for _, p in out]


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` for one rank)."""
    return _exchange(obj)


def broadcast_tensor(t: torch.Tensor, src: int) -> torch.Tensor:
    """Rank ``src``'s tensor on every rank (``t``: the tensor on ``src``, a buffer of its shape elsewhere)."""
    ranks = current()
    if ranks.size == 1:
        return t
    import torch.distributed as dist

    _exchange(None)  # the status first: a failed rank is raised here, not waited for
    t = t.contiguous()
    dist.broadcast(t, src)
    return t


def ordered(local: list) -> list:
    """Per-chunk values of every rank, in global chunk order (round-robin dealing undone).

    ``local``: this rank's values, one per chunk, in its chunk order. One rank: ``local`` itself.
    """
    ranks = current()
    if ranks.size == 1:
        return local
    parts = gather(local)
    total = sum(len(p) for p in parts)
    return [parts[i % ranks.size][i // ranks.size] for i in range(total)]


def merged_notes(notes: dict) -> dict:
    """A method's notes for one group over every rank: counts summed, the rest as rank 0 has them."""
    ranks = current()
    if ranks.size == 1:
        return notes
    every = gather(notes)
    out = dict(every[0])
    for key, value in out.items():
        if isinstance(value, int) and not isinstance(value, bool):
            out[key] = sum(n.get(key, 0) for n in every)
    return out


def fail(message: str) -> None:
    """Send this rank's failure to the others (at the exchange they wait in); then raise it here too."""
    _exchange(None, error=message)


def barrier() -> None:
    """Wait for every rank (with the status check: a failed rank's message is raised here)."""
    _exchange(None)
