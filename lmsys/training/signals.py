"""SIGTERM/SIGINT end a run at the next update boundary, after saving its state, on every process at once."""

from __future__ import annotations

import signal

import torch


class GracefulStop:
    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> GracefulStop:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def requested(self, accelerator) -> bool:
        """True on every process as soon as any process got a signal (so that none waits in a collective)."""
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)
