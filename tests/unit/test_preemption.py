"""The preemption flag records signals, and hands them on to the handler it displaced (e.g. submitit's)."""

from __future__ import annotations

import os
import signal

from mmrope.train.preemption import PreemptionFlag


def test_signal_sets_flag_then_chains_to_previous_handler():
    calls = []
    original = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    try:
        flag = PreemptionFlag()
        assert not flag.requested and not flag.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.requested and flag.signum == signal.SIGUSR1 and flag.agreed()
        assert calls == []  # the trainer saves first; the previous handler must not run yet
        flag.chain()
        assert calls == [signal.SIGUSR1]
        os.kill(
            os.getpid(), signal.SIGUSR1
        )  # handlers restored: the previous one gets later signals directly
        assert calls == [signal.SIGUSR1, signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, original)


def test_default_disposition_is_not_chained():
    original = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        flag = PreemptionFlag()
        os.kill(os.getpid(), signal.SIGUSR1)
        flag.chain()  # SIG_IGN is not callable: nothing to forward, and we are still alive
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, original)
