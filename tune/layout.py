"""Where a sweep's trial folder keeps the files this project adds to Tune's own (no Ray, no
torch here: `analysis` reads these files too).

    STORAGE/NAME/stage2_trainable_<trial id>_.../
        trial.json                      the trial's resolved config, setting, budget, data
        scores/partition-N.parquet      every evaluated image's scores (cmg.scores)
        checkpoint_XXXXXX/partitions.json, head-partition-N.pt   finished partitions and heads
"""

TRIAL_FILE = "trial.json"


def scores_file(partition: int) -> str:
    """Where a trial's per-image scores of a partition lie, inside its folder."""
    return f"scores/partition-{partition}.parquet"


def head_file(partition: int) -> str:
    """A partition's selected stage-2 head (a state dict) inside a trial's checkpoint."""
    return f"head-partition-{partition}.pt"
