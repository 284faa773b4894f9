"""Preemption: a signal sets a flag; the ranks agree at the next step boundary, save, and exit to be requeued.

A signal handler must not touch collectives or the filesystem (it can fire in the middle of an all-reduce),
so it only records the request. `Trainer.train` calls `PreemptionFlag.agreed()` after every optimizer step:
one all-reduce (MAX) tells every rank whether *any* rank was signalled, so all of them save the same step and
exit with `trainer.requeue_exit_code` (default 143 = 128 + SIGTERM), which a SLURM/Kubernetes wrapper maps
to "requeue". SLURM sends SIGTERM (or the signal of `--signal=USR1@120`) to every task before a kill, but a
scheduler may signal only some of them, hence the agreement.
"""

from __future__ import annotations

import signal

from mmrope.train.engine import all_reduce_values

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is committed; its `code` is the requeue exit status."""


class PreemptionFlag:
    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS):
        self.requested = False
        self.signum: int | None = None
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): preemption is not handled
                pass

    def _handle(self, signum: int, frame) -> None:
        self.requested, self.signum = True, signum

    def agreed(self) -> bool:
        """Sync point: True on every rank iff at least one rank has been signalled."""
        (flag,) = all_reduce_values([1 if self.requested else 0], op="max")
        return bool(flag)

    def chain(self) -> None:
        """After our checkpoint is committed, hand the signal to whoever handled it before us.

        Under hydra-submitit-launcher that is submitit's own handler, which requeues the SLURM job; without
        this the job would save and exit but never come back. Plain signal dispositions (default/ignore) are
        not chained: our exit code already tells a wrapper script to requeue.
        """
        previous = self._previous.get(self.signum) if self.signum is not None else None
        self.restore()
        if callable(previous):
            previous(self.signum, None)

    def restore(self) -> None:
        """Reinstall the handlers that were there before (tests build several trainers in one process)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
