"""A sweep whose storage is a URI (s3://, gs://, file://) gets its report beside the results,
EXPERIMENT/report, as a local one does: made in a local folder, then copied through pyarrow's
filesystem of the URI (here file://, the same code path as s3://)."""

import shutil

from analysis.report import write_report
from tune.sweep import _write_report


def test_a_remote_experiment_gets_its_report_there(smoke_sweep, tmp_path):
    experiment = tmp_path / "smoke"
    shutil.copytree(smoke_sweep["experiment"], experiment, ignore=shutil.ignore_patterns("report"))
    line = _write_report(experiment.as_uri(), None)
    assert line == f"report: {experiment.as_uri()}/report/report.md"
    local = write_report(str(experiment), tmp_path / "made-here", None)  # the local way
    copied = experiment / "report"
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in local.values())
    assert (copied / "summary.csv").read_text() == local["summary"].read_text()
