"""Ray Tune's W&B callback, made to keep the end of every trial's run (`--logger wandb`).

Each trial's W&B run lives in a logging actor that writes into the trial folder Tune stages on
the driver (`trial.local_path`, under /tmp/ray/session_*), and calls `wandb.finish()` once it
reads END from its queue. Tune copies that staging folder to the sweep's storage in snapshots,
the last one right after its loop ends, and only then calls `on_experiment_end`, where Ray's
callback waits for the actors. So the actor of the trial that ended last is still in
`wandb.finish()` during the last copy: the storage keeps a run without its history and exit
records, and nothing copies it again. And a trial that Tune stops itself (--time-budget, Ctrl-C)
never reaches `log_trial_end`, so its actor never gets END: Ray waits `upload_timeout` (30 min)
for it, then kills it, run and all. And Ray kills an actor the moment its `wandb.finish()`
returns, which can cut W&B's writer short: the end waits for the run's files to settle first.

Module of its own (not tune.loggers) so that `tune.sweep` checks its input without importing Ray
or wandb; a class at module level so that Tune's pickled tuner state restores it by name.
"""

from __future__ import annotations

import os
import posixpath
import time

import ray
from ray.air.integrations.wandb import WandbLoggerCallback
from ray.train._internal.storage import _upload_to_fs_path


class FinishedWandbLoggerCallback(WandbLoggerCallback):
    """WandbLoggerCallback whose experiment end tells every open run to finish, waits for it
    and copies its folder to the storage once it is complete (Ray's private members as of 2.60).
    Made like Ray's: `FinishedWandbLoggerCallback(project="sweep", group="sweep", log_config=True)`.
    """

    def on_experiment_end(self, trials: list, **info) -> None:
        open_runs = list(self._trial_logging_actors)  # runs Tune's last copy may have cut short
        for trial in open_runs:
            self._signal_logging_actor_stop(trial)  # a second END to a finishing run: unread
        # each actor's wandb.finish(), then its files settled: Ray's cleanup kills an actor as soon
        # as finish() returns, which can cut W&B's own writer short (a stopped trial's run then
        # lost its history, about one run in seven here)
        ray.wait(list(self._trial_logging_futures.values()),
                 num_returns=len(self._trial_logging_futures), timeout=self._upload_timeout)
        _await_settled([os.path.join(trial.local_path, "wandb") for trial in open_runs])
        super().on_experiment_end(trials, **info)  # kills the finished actors
        for trial in open_runs:
            staged = os.path.join(trial.local_path, "wandb")
            if os.path.isdir(staged):
                _upload_to_fs_path(staged, trial.storage.storage_filesystem,
                                   posixpath.join(trial.path, "wandb"))


def _await_settled(folders: list[str], quiet_s: float = 1.0, most_s: float = 15.0) -> None:
    """Return once no file under `folders` changed size for `quiet_s` (at most `most_s`)."""
    def sizes() -> dict[str, int]:
        found = {}
        for folder in folders:
            for root, _, names in os.walk(folder):  # nothing for a folder that is not there
                for name in names:
                    try:
                        found[os.path.join(root, name)] = os.path.getsize(os.path.join(root, name))
                    except OSError:  # a temporary file W&B just removed
                        continue
        return found

    deadline, last = time.monotonic() + most_s, sizes()
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = sizes()
        if now == last:
            return
        last = now
