"""How a run stops on a signal: SIGINT (Ctrl+C), SIGTERM and SIGHUP alike, keeping every finished epoch, and at
once on a second one. raybench.grid takes the signals before Ray starts (`STOP.handlers()`), marks Tune's loop
(`STOP.tune_loop()`) and reports the stop (`STOP.report(plan)`)."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

# Exit status of a run a signal stopped before every trial finished: 128 + the signal's number, as a shell
# reports a process the signal ended (130 Ctrl+C, 143 SIGTERM, 129 SIGHUP).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stop:
    """SIGINT (Ctrl+C), SIGTERM (what batch schedulers send at a time limit, `timeout`, systemd, Kubernetes) and
    SIGHUP (a closed terminal) all stop a run the same way. Inside Tune's loop the first one asks Tune to stop
    (Tune's own SIGUSR1 handler: it saves its state and ends fit(), the trials' finished epochs and checkpoints
    being on disk already); anywhere else, and for a second signal, KeyboardInterrupt stops the driver at once.
    Results files are replaced atomically, so neither way loses what was written."""

    def __init__(self):
        self.signum = None  # the first stop signal received
        self.in_tune = False

    @contextlib.contextmanager
    def handlers(self):
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield
            return
        self.signum = None
        before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        tune_sigint = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Ctrl+C comes here too, to be counted like the others
        for s in STOP_SIGNALS:
            signal.signal(s, self._received)
        try:
            yield
        finally:
            self.signum = None
            for s, handler in before.items():
                signal.signal(s, handler)
            if tune_sigint is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = tune_sigint

    @contextlib.contextmanager
    def tune_loop(self):
        """Around tuner.fit(): Tune sets its SIGUSR1 handler once its loop is ready; until then it is ignored."""
        main_thread = threading.current_thread() is threading.main_thread()
        before = signal.getsignal(signal.SIGUSR1) if main_thread else None
        if main_thread:
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        self.in_tune = True
        try:
            yield
        finally:
            self.in_tune = False
            if main_thread:
                signal.signal(signal.SIGUSR1, before)

    def _received(self, signum, frame):
        first = self.signum is None
        self.signum = self.signum or signum
        tune_stop = signal.getsignal(signal.SIGUSR1) if self.in_tune else None
        if first and callable(tune_stop):
            print(f"[grid] {signal.Signals(signum).name}: stopping the run; finished epochs are kept (send it "
                  "again to stop at once)", file=sys.stderr, flush=True)
            tune_stop(signal.SIGUSR1, frame)
            return
        raise KeyboardInterrupt

    def exit_status(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def signal_name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name

    def report(self, plan) -> int:
        """The run's last line when a signal stopped it: what is kept and how to continue."""
        import pandas as pd
        from raybench.records import UNFINISHED
        kept = ""
        with contextlib.suppress(Exception):  # whatever the files say, the line goes out
            trials = pd.read_parquet(plan.run_dir / "trials.parquet")
            kept = (f"{int((~trials.status.isin(UNFINISHED)).sum())}/{len(trials)} trials ended, "
                    f"{int(trials.epochs_done.sum())} epochs kept ")
        print(f"[grid] stopped by {self.signal_name()}: {kept}in {plan.run_dir}; "
              f"continue with: {plan.resume_command()}", file=sys.stderr, flush=True)
        return self.exit_status()


STOP = Stop()
