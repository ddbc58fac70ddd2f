"""One Ray session for a command that runs trials (tune.sweep's driver, and tune.replicate, a sweep
over a fixed list of points): Ray's, Tune's and Optuna's start-up chatter silenced (their
warnings kept), `ray.init` with the project's keywords, SIGINT and SIGTERM handled
(`Interrupts`), the stage-1 store's lease service ready; and the one line an interrupted command
prints before it exits with code 130.

    with ray_session(address, store_uri) as interrupts:
        results = interrupts.fit(tuner)           # True in interrupts.count: stopped by a signal
    exit_interrupted("after 3 of 8 configurations", ["python", "-m", "tune.sweep", ...])
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shlex
import signal
import sys
from typing import Callable, Iterator, NoReturn

from cmg.results import trial_dirname


class Interrupts:
    """SIGINT and SIGTERM while the sweep runs. Inside `fit`, the first one asks Ray Tune to save
    its state and stop (through Tune's own SIGUSR1 handler; its SIGINT handler is turned off so
    both signals take this one path); outside it, or a second time, KeyboardInterrupt at once.

    Once KeyboardInterrupt is raised the driver is already on its way out, and later signals are
    ignored: a Ctrl-C reaches the whole process group (the local Ray's GCS and raylet too), and an
    impatient second one used to land in ray.shutdown() or in the exit itself and end the
    process with code 1 instead of the resume line's 130."""

    def __init__(self):
        self.count, self.in_fit = 0, False
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        # Tune's own "interrupted ... Tuner.restore(...)" warnings: the driver prints its line
        logging.getLogger("ray.tune.tune").setLevel(logging.ERROR)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.count += 1
        if self.in_fit and self.count == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        else:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
            raise KeyboardInterrupt

    def fit(self, tuner: "ray.tune.Tuner"):
        """`tuner.fit()`; True in `self.count` afterwards means it was interrupted."""
        # until Tune installs its SIGUSR1 handler, SIGUSR1 must not kill the process
        signal.signal(signal.SIGUSR1, self._on_signal)
        self.in_fit = True
        try:
            return tuner.fit()
        finally:
            self.in_fit = False


class _DropTokenNotice(logging.Filter):
    """Ray's notice that a new local Ray has token authentication: it does, nothing to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this")


def quiet_tune() -> None:
    """Ray, Ray Tune and Optuna print only what this project prints (call before `ray.init`)."""
    token_setup = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenNotice) for f in token_setup.filters):
        token_setup.addFilter(_DropTokenNotice())
    # tune.replicate keeps one checkpoint per trial, which forces a snapshot per partition:
    # cheap for its few trials (the sweep keeps every checkpoint instead: see _search)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Ray's old console output with verbose=0 prints nothing; the new one still prints a
    # "Configuration for experiment" box and a TensorBoard hint into its session folder
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # TensorBoard files only with --logger tensorboard (logger_callbacks adds Ray's JSON and CSV)
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # Optuna's "A new study created ..." and "Trial N finished ..." lines: the progress lines
    # say it; its warnings stay
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


@contextlib.contextmanager
def ray_session(address: str | None, store_uri: str) -> Iterator[Interrupts]:
    """Ray up (a new local one, or the cluster at ADDRESS), the signals handled, the lease
    service of the stage-1 store at STORE_URI ready; Ray shut down on the way out."""
    import ray

    from tune.leases import NAMESPACE, create_leases

    quiet_tune()
    try:
        ray.init(address=address or "local", namespace=NAMESPACE, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        interrupts = Interrupts()  # after ray.init, which sets its own SIGTERM handler
        leases = create_leases(store_uri)  # the store's lease service (detached, shared)
        ray.get(leases.__ray_ready__.remote())
        yield interrupts
    finally:
        ray.shutdown()


def _trial_folder_name(kind: str, trial) -> str:
    # Tune's experiment tag starts with the trial's number: "3_mixing=mask,..."
    return trial_dirname(kind, int(trial.experiment_tag.split("_", 1)[0]), trial.trial_id)


def name_trial_folders(kind: str) -> Callable:
    """Tune's `trial_dirname_creator`: `trial-3-2420ff69` (cmg.results.trial_dirname), not
    Tune's 150-character `<trainable>_<id>_<number>_<every parameter>_<date>`."""
    return functools.partial(_trial_folder_name, kind)


def exit_interrupted(done: str, again: list[str]) -> NoReturn:
    """`interrupted DONE; continue with: AGAIN` on stderr, then exit code 130."""
    print(f"interrupted {done}; continue with: {shlex.join(again)}", file=sys.stderr, flush=True)
    raise SystemExit(130)
