"""Preemption: SIGTERM (what a cluster scheduler sends before it kills) and Ctrl-C ask a run to stop after the
step in progress, so it can write a checkpoint and say how to resume. A second Ctrl-C stops at once."""

from __future__ import annotations

import signal


class Preempted(Exception):
    """The run stopped on a signal after saving ``checkpoint``; the process should exit ``128 + signum``."""

    def __init__(self, signum: int, checkpoint):
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after saving {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Within the block, SIGTERM and SIGINT set ``signum`` instead of killing the process (main thread only)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without the checkpoint
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
