"""Progress lines: the percentage counts all the work, the ETA only this process's rate (a
resumed sweep must not project its restored trials as if they were done in no time)."""

from __future__ import annotations

import io
import time

from cmg.progress import Progress


def _line(done: int, done_before: int, elapsed: float) -> str:
    stream = io.StringIO()
    bar = Progress("sweep", total=24, every=0, stream=stream, done_before=done_before)
    bar.start -= elapsed  # as if the run had started `elapsed` seconds ago
    bar.update(done, trials=f"{done}/24")
    return stream.getvalue().strip()


def test_a_fresh_run_projects_its_own_rate():
    # 6 of 24 in 300 s: 50 s each, 18 left -> 900 s
    assert _line(6, 0, 300).startswith("[sweep]  25.0% trials=6/24 | 5m00s elapsed, ETA 15m00s")


def test_a_resumed_run_counts_restored_work_but_not_in_its_rate():
    # 15 restored, 2 more in 200 s: 100 s each, 7 left -> 700 s (not 200 / 17 * 7 = 82 s)
    line = _line(17, 15, 200)
    assert line.startswith("[sweep]  70.8% trials=17/24 | 3m20s elapsed, ETA 11m40s"), line
    assert _line(15, 15, 30).endswith("ETA ?")  # nothing finished yet in this run
