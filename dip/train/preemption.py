"""Stopping a run when a scheduler asks: a signal becomes a stop request, every rank stops after the
same step, the run saves that step and exits with :data:`EXIT_STOPPED`.

SLURM warns a job with SIGTERM (or, with ``sbatch --signal=USR1@120``, SIGUSR1 ahead of the time
limit) and Kubernetes with SIGTERM, and both kill it some seconds later. The handler only records the
signal: the run reads the request at every step boundary (:meth:`StopRequest.agreed`, one small
all-reduce, so a signal that reached one rank stops them all after the same step) and before each
long phase (sample grid, FID), which it then skips. A signal during a checkpoint lets the checkpoint
finish (it is written to a temporary file and renamed, so even a kill leaves the previous one); a
second signal is recorded and changes nothing. The data loader's workers ignore the stop signals, so
a signal sent to the whole process group does not kill them under the trainer.
"""
import signal
import threading
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..distributed import DistEnv

# EX_TEMPFAIL of sysexits.h, "try again later": what a requeue script tests for (see docs/run-safety.md)
EXIT_STOPPED = 75
DEFAULT_STOP_SIGNALS = ("TERM", "USR1")


def parse_signals(names: Iterable[str]) -> List[signal.Signals]:
    """``("TERM", "SIGUSR1", ...)`` as signals; one-line ValueError for a name this system lacks."""
    found = []
    for name in names:
        text = str(name).strip().upper()
        if not text:
            continue
        text = text if text.startswith("SIG") else "SIG" + text
        if text in ("SIGKILL", "SIGSTOP") or not hasattr(signal, text):
            raise ValueError(f"stop_signals: {name!r} is not a signal that can be caught (e.g. TERM, USR1, INT)")
        found.append(getattr(signal, text))
    return found


class StopRequest:
    """The stop request of this process: set by the signals in ``signals`` from :meth:`install`
    until :meth:`uninstall` (the previous handlers come back)."""

    def __init__(self, signals: Iterable[str] = DEFAULT_STOP_SIGNALS):
        self.signals = parse_signals(signals)
        self.received: Optional[str] = None  # the name of the first stop signal
        self.count = 0
        self._previous: Dict[signal.Signals, object] = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        self.count += 1
        if self.received is None:
            self.received = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        """This process received a stop signal (no collective: for phases one rank runs)."""
        return self.received is not None

    def agreed(self, env: DistEnv, save_due: bool = False) -> Tuple[bool, bool]:
        """(whether any rank received a stop signal, whether any rank found a save due): one small
        all-reduce that every rank must call at the same point (the main rank alone keeps the
        time of --ckpt-minutes, so that ranks with different clocks still agree)."""
        if not env.distributed:
            return self.requested, save_due
        flags = torch.tensor([float(self.requested), float(save_due)], device=env.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, due = flags.tolist()
        return stop > 0, due > 0
