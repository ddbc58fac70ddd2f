"""Ray Tune's W&B callback, made to keep the end of every trial's run (`--logger wandb`).

Each trial's W&B run lives in a logging actor that writes into the trial folder Tune stages on
the driver (`trial.local_path`, under /tmp/ray/session_*), and calls `wandb.finish()` once it
reads END from its queue. Tune copies that staging folder to the sweep's storage in snapshots,
the last one right after its loop ends, and only then calls `on_experiment_end`, where Ray's
callback waits for the actors. So the actor of the trial that ended last is still in
`wandb.finish()` during the last copy: the storage keeps a run without its history and exit
records, and nothing copies it again. And a trial that Tune stops itself (--time-budget, Ctrl-C)
never reaches `log_trial_end`, so its actor never gets END: Ray waits `upload_timeout` (30 min)
for it, then kills it, run and all.

Module of its own (not tune.loggers) so that `tune.sweep` checks its input without importing Ray
or wandb; a class at module level so that Tune's pickled tuner state restores it by name.
"""

from __future__ import annotations

import os
import posixpath

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
        super().on_experiment_end(trials, **info)  # waits for each actor's wandb.finish()
        for trial in open_runs:
            staged = os.path.join(trial.local_path, "wandb")
            if os.path.isdir(staged):
                _upload_to_fs_path(staged, trial.storage.storage_filesystem,
                                   posixpath.join(trial.path, "wandb"))
