"""Preemption: SIGTERM and SIGINT stop a run at a clean point, with a checkpoint (docs/reliability.md).

Inside :class:`StopSignals` the first SIGTERM or SIGINT is only recorded: the training loop finishes
the optimizer step under way, writes a checkpoint and raises :class:`Preempted`, which the CLI prints
as one line and turns into exit status 128 + the signal's number (143 for SIGTERM, 130 for SIGINT).
A second signal is ignored while that happens; a third raises :class:`Interrupted` at once (the save
under way is abandoned and its temporary folder removed). Outside such a block the CLI makes SIGTERM
raise :class:`Interrupted` like Ctrl-C does, so a run killed before or after training still exits
with one line and without leaving temporaries behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from miopt.errors import MioptError
from miopt.run.ranks import process_rank, world_size

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_status(signum: int) -> int:
    """What a shell reports for a process ended by ``signum``: 128 + its number."""
    return 128 + signum


class Interrupted(KeyboardInterrupt):
    """A signal that ends the process now (SIGTERM outside training, or the third signal during a
    clean stop); a KeyboardInterrupt so that code which cleans up after Ctrl-C does so here too."""

    def __init__(self, signum: int, *, aborted: bool = False) -> None:
        self.signum, self.aborted = signum, aborted
        super().__init__(signal_name(signum))


class Preempted(MioptError):
    """The run stopped for a signal at a clean point: after optimizer step ``step`` with its
    checkpoint written to ``checkpoint``, or (``checkpoint`` None) once its outputs were saved."""

    def __init__(
        self, signum: int, step: int | None, checkpoint: Path | None, output_dir: str | Path
    ) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_status = exit_status(signum)
        if checkpoint is not None:
            text = f"stopped by {signal_name(signum)} after step {step}; checkpoint {checkpoint}"
        else:
            text = f"stopped by {signal_name(signum)} after the run finished; its outputs are in {output_dir}"
        super().__init__(text)


def _say(text: str) -> None:
    """One line on stderr from a signal handler: ``os.write`` never re-enters a buffered stream that
    the interrupted code was writing to."""
    prefix = f"[rank {process_rank()}] " if world_size() > 1 else ""
    with contextlib.suppress(OSError):
        os.write(2, f"\n{prefix}{text}\n".encode())


_active: StopSignals | None = None


class StopSignals:
    """While entered, SIGTERM and SIGINT are recorded in :attr:`received` instead of ending the
    process; the previous handlers come back on exit. Nested blocks share the outermost one (its
    count of signals goes on). Outside the main thread (where Python delivers signals) it does nothing.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.count = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        global _active
        if _active is not None:
            return _active
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        _active = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        if not self._previous:
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        _active = None

    def _handle(self, signum: int, frame: object) -> None:
        self.count += 1
        name = signal_name(signum)
        if self.count == 1:
            self.received = signum
            _say(
                f"miopt: {name} received: finishing this optimizer step, then writing a checkpoint "
                "(a second signal is ignored, a third aborts)"
            )
        elif self.count == 2:
            _say(f"miopt: {name} again: ignored while the run stops cleanly; a third one aborts")
        else:
            _say(f"miopt: {name} a third time: aborting without waiting for the save")
            raise Interrupted(signum, aborted=True)

    def agreed(self, accelerator) -> int:
        """The signal every process stops for, 0 for none: the largest number any process received
        (one all-reduce, only when there are several processes), so all stop at the same step."""
        if accelerator.num_processes == 1:
            return self.received or 0

        flag = torch.tensor(float(self.received or 0), device=accelerator.device)
        signum = int(accelerator.reduce(flag, "max").item())
        if signum and self.received is None:
            self.received = signum
        return signum


@contextlib.contextmanager
def stop_after(accelerator, output_dir: str | Path) -> Iterator[StopSignals]:
    """Signals during the block (a final save) wait for it to finish; then the run stops with
    :class:`Preempted` (its outputs are complete, so there is nothing to resume)."""
    with StopSignals() as stop:
        yield stop
        signum = stop.agreed(accelerator)
    if signum:
        raise Preempted(signum, None, None, output_dir)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Interrupted` (as SIGINT raises KeyboardInterrupt) while the block runs,
    so cleanup code and the CLI's one-line report run; the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
