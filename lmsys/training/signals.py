"""SIGTERM/SIGINT (and SIGUSR2, which submitit has SLURM send ahead of a job's time limit) end a run promptly on
every process at once: at the next update boundary, or within an evaluation or prediction at the next checked
micro-batch (which then raises `StopRequested`). The first signal asks; the handlers are then reset to the defaults,
so a second signal ends the process at once."""

from __future__ import annotations

import signal

import torch
from typing_extensions import Self  # typing.Self needs Python 3.11; torch depends on typing_extensions

# SIGUSR2: submitit's `--signal=USR2@<signal_delay_s>`; its own handler (requeue the same command, which finds the
# run's state and stops without resume=true) is replaced while training and restored after
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
_DEFAULTS = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler, signal.SIGUSR2: signal.SIG_DFL}
_active: GracefulStop | None = None  # the innermost GracefulStop, for loops that do not get it passed in


class StopRequested(Exception):
    """Raised out of a prediction loop when a stop was asked for: the work in progress is abandoned."""


class GracefulStop:
    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}
        self._outer: GracefulStop | None = None

    def __enter__(self) -> Self:
        global _active
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._outer, _active = _active, self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        _active = self._outer

    def _handle(self, signum, frame) -> None:
        self.received = signum
        for sig in _SIGNALS:  # the second signal is not caught: it ends the process at once
            signal.signal(sig, _DEFAULTS[sig])

    def requested(self, accelerator) -> bool:
        """True on every process as soon as any process got a signal (so that none waits in a collective)."""
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)


# With several processes a check is a collective (an all-reduce): made every this many micro-batches only.
CHECK_EVERY_WITH_PROCESSES = 8


def stop_check_steps(n_batches: int, accelerator) -> set[int]:
    """The micro-batch indices at which a prediction loop checks for a stop: every one on a single process; with
    several, every CHECK_EVERY_WITH_PROCESSES-th below the smallest count of any rank (all ranks run those, so the
    all-reduce of each check always meets all of them)."""
    if _active is None:
        return set()
    if accelerator.num_processes == 1:
        return set(range(n_batches))
    count = torch.tensor(n_batches, device=accelerator.device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
    return set(range(0, int(count), CHECK_EVERY_WITH_PROCESSES))


def raise_if_stop_requested(accelerator) -> None:
    """Raise StopRequested on every process when any process got a signal (inside an active GracefulStop)."""
    if _active is not None and _active.requested(accelerator):
        raise StopRequested("stop requested during prediction")
