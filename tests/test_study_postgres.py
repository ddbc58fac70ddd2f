"""The documented `--study-storage postgresql://USER@HOST:PORT/DB` against a real PostgreSQL server
that the test starts (Debian's postgresql package: initdb + pg_ctl, on 127.0.0.1, a port of its
own, stopped at the end): the sweep's own opener gives an Optuna storage through the driver the
project installs (psycopg, SQLAlchemy's default for postgresql://), a study written through it
reads back from a second connection as it was, and a server that does not answer is one line."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile

import pytest

from cmg.errors import UsageError


def _postgres_bin() -> str | None:
    """The folder of initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return folders[-1] if folders else None


BIN = _postgres_bin()
pytestmark = pytest.mark.skipif(BIN is None, reason="apt-get install postgresql")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """postgresql://postgres@127.0.0.1:PORT/postgres of a fresh server (trust auth on loopback).
    PostgreSQL refuses to run as root: as root, it runs as the package's `postgres` user, in a
    folder of its own (pytest's are root's alone)."""
    folder = tempfile.mkdtemp(prefix="cmg-postgres-")
    data = os.path.join(folder, "data")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "postgres")
    port = _free_port()
    subprocess.run([*as_user, f"{BIN}/initdb", "-D", data, "-A", "trust", "-U", "postgres",
                    "--no-sync"], check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off"
    subprocess.run([*as_user, f"{BIN}/pg_ctl", "-D", data, "-o", options, "-l",
                    os.path.join(folder, "server.log"), "-w", "start"], check=True,
                   capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, f"{BIN}/pg_ctl", "-D", data, "-m", "immediate", "-w",
                        "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_study_in_postgresql_reads_back(postgres_url, tmp_path):
    import optuna

    from tune.spec import open_study_storage

    storage = open_study_storage(postgres_url, str(tmp_path))
    assert storage.engine.dialect.driver == "psycopg"
    study = optuna.create_study(study_name="cmg", storage=storage, direction="maximize")
    for value in (0.91, 0.95, 0.93):
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
        study.tell(trial, value)
    again = optuna.load_study(study_name="cmg",
                              storage=open_study_storage(postgres_url, str(tmp_path)))
    assert [t.value for t in again.trials] == [0.91, 0.95, 0.93]
    assert again.best_value == 0.95
    assert again.best_params == study.best_params


def test_a_server_that_does_not_answer_is_one_line(tmp_path):
    from tune.spec import open_study_storage

    url = f"postgresql://postgres@127.0.0.1:{_free_port()}/postgres"
    with pytest.raises(UsageError, match=r"^cannot open study storage .* \(OperationalError\); "
                                         r"check --study-storage$"):
        open_study_storage(url, str(tmp_path))
