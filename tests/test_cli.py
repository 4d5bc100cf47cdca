"""The gpuspawner command as an admin runs it: paths mean what they mean where the admin stands,
times are read as times whatever their zone, and every failure is one line and an exit status."""

from __future__ import annotations

import csv
import inspect
import io
import subprocess
import sys
from pathlib import Path

import pytest

from gpuspawner import seams
from gpuspawner.audit import AuditRecord
from gpuspawner.cli import main
from gpuspawner.store import AuditStore
from gpuspawner.times import TimeError, parse_time, stored_time

# Stored as the hub stores them (seams.now_iso): UTC, microseconds.
REQUESTED = {
    "r1": "2026-11-21T09:59:59.999999+00:00",
    "r2": "2026-11-21T10:00:00.000000+00:00",
    "r3": "2026-11-21T10:30:00.000000+00:00",
    "r4": "2026-11-21T11:00:00.000000+00:00",
}


def open_store(url: str) -> AuditStore:
    """A store that may write records: with a sealing key where the store takes one."""
    if "key" in inspect.signature(AuditStore).parameters:
        return AuditStore(url, key=bytes(range(32)))
    return AuditStore(url)


@pytest.fixture
def hub_config(tmp_path: Path) -> Path:
    """A hub's folder, apart from the admin's: its config and an audit store with four records."""
    folder = tmp_path / "hub"
    folder.mkdir()
    url = f"sqlite:///{folder / 'audit.sqlite'}"
    store = open_store(url)
    for record_id, requested_at in REQUESTED.items():
        store.insert(AuditRecord(id=record_id, hub_id="hub-1", user="ada", server="", requested_at=requested_at))
    store.dispose()
    config = folder / "jupyterhub_config.py"
    config.write_text(f'c = get_config()  # noqa\nc.GPUSpawner.hub_id = "hub-1"\nc.GPUSpawner.audit_db_url = {url!r}\n')
    return config


@pytest.fixture
def admin_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "admin"
    folder.mkdir()
    return folder


def gpuspawner(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The command in a process of its own (it loads the hub's configuration into JupyterHub's singleton)."""
    return subprocess.run(
        [sys.executable, "-m", "gpuspawner.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def exported_ids(text: str) -> list[str]:
    return [row["id"] for row in csv.DictReader(io.StringIO(text))]


def test_output_is_written_where_the_admin_stands_not_beside_the_config(hub_config: Path, admin_dir: Path) -> None:
    result = gpuspawner("audit", "export", "-f", "../hub/jupyterhub_config.py", "-o", "out.csv", cwd=admin_dir)
    assert result.returncode == 0, result.stderr
    assert exported_ids((admin_dir / "out.csv").read_text()) == ["r1", "r2", "r3", "r4"]
    assert not (hub_config.parent / "out.csv").exists()


@pytest.mark.parametrize(
    ("since", "until", "ids"),
    [
        ("2026-11-21T12:00+02:00", None, ["r2", "r3", "r4"]),
        ("2026-11-21T10:00:00Z", None, ["r2", "r3", "r4"]),
        ("2026-11-21 10:00", None, ["r2", "r3", "r4"]),
        ("2026-11-21T05:00-05:00", "2026-11-21T11:00", ["r2", "r3"]),
        (None, "2026-11-21T12:30+02:00", ["r1", "r2"]),
        ("2026-11-21", "2026-11-22", ["r1", "r2", "r3", "r4"]),
    ],
    ids=["other-zone", "utc-z", "no-zone-is-utc", "window-across-zones", "until-other-zone", "dates"],
)
def test_since_and_until_compare_as_times_whatever_their_zone(
    hub_config: Path, admin_dir: Path, since: str | None, until: str | None, ids: list[str]
) -> None:
    window = [*(["--since", since] if since else []), *(["--until", until] if until else [])]
    result = gpuspawner("audit", "export", "-f", str(hub_config), *window, cwd=admin_dir)
    assert result.returncode == 0, result.stderr
    assert exported_ids(result.stdout) == ids


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "argument --since: 'yesterday' is not a time; allowed: an ISO 8601 date or time"),
        (["--until", "2026-13-01"], "argument --until: '2026-13-01' is not a time"),
        (["--since", "x" * 500], "argument --since: '" + "x" * 40 + "'… is not a time"),
        (["--since", "2026-11-22", "--until", "2026-11-21"], "is not before --until"),
    ],
    ids=["word", "no-such-month", "long-garbage-quoted-short", "empty-window"],
)
def test_a_bad_time_is_a_usage_error(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(["audit", "export", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err) < 1000


def test_help_says_a_time_without_zone_is_utc(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["audit", "export", "--help"])
    assert "without a zone, UTC" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("config_text", "output", "message"),
    [
        (None, "no-such-folder/out.csv", "gpuspawner audit: cannot write {admin}/no-such-folder/out.csv: No such file or directory"),
        (None, ".", "gpuspawner audit: cannot write {admin}: Is a directory"),
        ("c = get_config()\nc.GPUSpawner.hub_id = (\n", None,
         "gpuspawner audit: the configuration file {config} has a syntax error at line 2: '(' was never closed"),
        ("c = get_config()\nimport no_such_module_here\n", None,
         "gpuspawner audit: the configuration file {config} failed at line 2: "
         "ModuleNotFoundError: No module named 'no_such_module_here'"),
        ("c = get_config()\n\nraise RuntimeError('the lab is closed\\nsecond line')\n", None,
         "gpuspawner audit: the configuration file {config} failed at line 3: RuntimeError: the lab is closed"),
    ],
    ids=["output-folder-missing", "output-is-a-folder", "config-syntax-error", "config-import-fails", "config-raises"],
)
def test_failures_are_one_line_and_a_nonzero_status(
    hub_config: Path, admin_dir: Path, config_text: str | None, output: str | None, message: str
) -> None:
    if config_text is not None:
        hub_config.write_text(config_text)
    result = gpuspawner("audit", "export", "-f", str(hub_config), *(["-o", output] if output else []), cwd=admin_dir)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [message.format(admin=admin_dir, config=hub_config)], result.stderr
    assert result.stdout == ""


# --- The time parser the CLI and the audit service share --------------------------------------


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("2026-11-21", "2026-11-21T00:00:00.000000+00:00"),
        ("2026-11-21T12:00", "2026-11-21T12:00:00.000000+00:00"),
        ("2026-11-21T12:00+02:00", "2026-11-21T10:00:00.000000+00:00"),
        ("2026-11-21T12:00Z", "2026-11-21T12:00:00.000000+00:00"),
        ("2026-11-21 00:30:00.5-01:00", "2026-11-21T01:30:00.500000+00:00"),
        (" 2026-11-21T10:00:01+00:00 ", "2026-11-21T10:00:01.000000+00:00"),
    ],
    ids=["date", "no-zone", "plus-two", "z", "space-fraction-minus-one", "stored-without-fraction"],
)
def test_times_are_normalised_to_the_stored_form(text: str, stored: str) -> None:
    assert stored_time(text) == stored


def test_a_time_the_hub_stored_reads_back_unchanged() -> None:
    now = seams.now_iso()
    assert stored_time(now) == now
    assert parse_time(now).isoformat(timespec="microseconds") == now


@pytest.mark.parametrize("text", ["yesterday", "", "2026-02-30", "0001-01-01T00:00+05:00", "9" * 10_000])
def test_what_is_not_a_time_is_refused_quoting_a_short_prefix(text: str) -> None:
    with pytest.raises(TimeError) as e:
        stored_time(text, where="since")
    assert str(e.value).startswith("since is ")
    assert "which is not a time; allowed: an ISO 8601 date or time" in str(e.value)
    assert len(str(e.value)) < 250


def test_reproduce_hides_what_the_admins_names_now_redact_in_an_older_record(tmp_path: Path) -> None:
    """A record written before the admin added a name still holds the value; reproduce must not print it."""
    url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    store = open_store(url)
    store.insert(AuditRecord(id="old", hub_id="hub-1", user="ada", server="", requested_at=REQUESTED["r1"],
                             image_id="sha256:" + "d" * 64, environment={"LICENSE_SERVER": "27000@lic.example"}))
    store.dispose()
    config = tmp_path / "jupyterhub_config.py"
    config.write_text(
        f'c = get_config()  # noqa\nc.GPUSpawner.audit_db_url = {url!r}\n'
        'c.GPUSpawner.audit_redact_names = ["LICENSE_SERVER"]\n'
    )
    result = gpuspawner("reproduce", "old", "-f", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "27000@lic.example" not in result.stdout
    assert " -e LICENSE_SERVER " in result.stdout
