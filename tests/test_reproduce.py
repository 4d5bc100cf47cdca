"""`gpuspawner reproduce`: the ``docker run`` script that recreates a recorded server's environment.

A researcher pastes the script into a shell, so it runs ``docker`` and nothing else whatever the
record holds. The hostile records below put shell syntax, line breaks and control characters in
every text field a record has; each script is checked by ``bash -n`` and then run by bash with a
stub ``docker`` first on a PATH that holds nothing else but ``touch``, the canary's own command.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest

from gpuspawner.audit import AuditRecord, RecordedDevice
from gpuspawner.export import reproduce_command, shell_word
from gpuspawner.redaction import REDACTED
from gpuspawner.store import AuditStore

DIGEST = "sha256:" + "c" * 64
IMAGE_ID = "sha256:" + "d" * 64
REQUESTED = "127.0.0.1:5000/lab/pytorch:2024.10"
PUSHED = f"127.0.0.1:5000/lab/pytorch@{DIGEST}"
MEMORY = str(64 * 2**30)
A100 = RecordedDevice(uuid="GPU-5fb1e2a3-0000-4000-8000-000000000001", model="NVIDIA A100-SXM4-80GB", memory_total=80 * 2**30)
H100 = RecordedDevice(uuid="GPU-5fb1e2a3-0000-4000-8000-000000000002", model="NVIDIA H100 80GB HBM3", memory_total=80 * 2**30)
BASH = shutil.which("bash") or "/bin/bash"
TOUCH = shutil.which("touch") or "/usr/bin/touch"


def record(**kw: Any) -> AuditRecord:
    fields_: dict[str, Any] = dict(
        id="r1", hub_id="hub-1", user="ada", server="", requested_at="2026-11-21T10:00:01+00:00",
        outcome="stopped", profile="a100-1", image_requested=REQUESTED, repo_digest=PUSHED, image_id=IMAGE_ID,
        devices=(A100,), driver_version="550.54.15", cuda_driver_version="12.4",
        environment={"OMP_NUM_THREADS": "8"}, cpu_limit=8.0, mem_limit=64 * 2**30,
        started_at="2026-11-21T10:01:01+00:00", stopped_at="2026-11-21T11:00:01+00:00",
        seq=1, prev_hash="a" * 64, hash="b" * 64,
    )
    fields_.update(kw)
    return AuditRecord(**fields_)


def argv(*, limits: tuple[str, ...] = ("--gpus", "1", "--cpus", "8", "--memory", MEMORY),
         env: tuple[str, ...] = ("-e", "OMP_NUM_THREADS=8"), image: str = PUSHED) -> list[str]:
    """What docker is given, after its own name: record()'s command unless told otherwise."""
    return ["run", "--rm", "-it", "-p", "8888:8888", *limits, *env, image, "jupyter", "server", "--ip=0.0.0.0",
            "--port=8888"]


@dataclass(frozen=True)
class Ran:
    returncode: int
    stderr: str
    docker_calls: list[list[str]]


def run_script(script: str, tmp_path: Path) -> Ran:
    """Run `script` with bash as a user would, PATH holding a stub docker (which writes down its
    arguments, NUL-separated, after their count) and the real touch."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    calls = tmp_path / "docker-calls"
    stub = bin_dir / "docker"
    stub.write_text(f"#!{BASH}\nprintf '%s\\0' \"$#\" \"$@\" >> '{calls}'\n")
    stub.chmod(0o755)
    (bin_dir / "touch").symlink_to(TOUCH)
    path = tmp_path / "reproduce.sh"
    path.write_text(script + "\n", encoding="utf-8")
    result = subprocess.run([BASH, str(path)], cwd=work, env={"PATH": str(bin_dir)}, capture_output=True, timeout=30)
    return Ran(result.returncode, result.stderr.decode(errors="replace"),
               parse_calls(calls.read_bytes() if calls.exists() else b""))


def parse_calls(data: bytes) -> list[list[str]]:
    words = [w.decode() for w in data.split(b"\0")[:-1]]
    calls = []
    while words:
        count = int(words.pop(0))
        calls.append(words[:count])
        del words[:count]
    return calls


def bash_syntax(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "syntax.sh"
    path.write_text(script + "\n", encoding="utf-8")
    return subprocess.run([BASH, "-n", str(path)], capture_output=True, text=True, timeout=30)


# --- Ordinary records: the friendly command ----------------------------------------------------


def test_reproduce_is_one_docker_run_by_digest_with_the_same_gpus_limits_and_environment() -> None:
    r = record(environment={"OMP_NUM_THREADS": "8", "JUPYTERHUB_API_TOKEN": "secret"}, devices=(A100, H100))
    assert reproduce_command(r) == (
        "docker run --rm -it -p 8888:8888 --gpus 2 --cpus 8 --memory 68719476736 -e OMP_NUM_THREADS=8 "
        f"127.0.0.1:5000/lab/pytorch@{DIGEST} jupyter server --ip=0.0.0.0 --port=8888"
    )


def test_reproduce_passes_redacted_variables_from_the_callers_environment() -> None:
    r = record(devices=(), cpu_limit=None, mem_limit=None, environment={
        "OMP_NUM_THREADS": "8", "HF_TOKEN": REDACTED, "DATABASE_URL": f"postgresql://u:{REDACTED}@db/x",
    })
    comment, command = reproduce_command(r).split("\n")
    assert comment == (
        "# DATABASE_URL and HF_TOKEN were redacted in the audit record: set them in your shell first; "
        "docker run -e NAME takes the value from there."
    )
    assert command == (
        "docker run --rm -it -p 8888:8888 -e DATABASE_URL -e HF_TOKEN -e OMP_NUM_THREADS=8 "
        f"127.0.0.1:5000/lab/pytorch@{DIGEST} jupyter server --ip=0.0.0.0 --port=8888"
    )


def test_reproduce_redacts_a_secret_that_an_older_record_still_holds() -> None:
    r = record(devices=(), cpu_limit=None, mem_limit=None,
               environment={"DATABASE_URL": "postgresql://u:pw@db/x", "JUPYTERHUB_API_TOKEN": "t"})
    command = reproduce_command(r)
    assert "pw" not in command and "JUPYTERHUB_API_TOKEN" not in command
    assert command.splitlines()[-1].startswith("docker run --rm -it -p 8888:8888 -e DATABASE_URL 127.0.0.1:5000/")


def test_reproduce_a_never_pushed_image_says_it_cannot_be_pulled() -> None:
    r = record(repo_digest=None, devices=(), cpu_limit=None, mem_limit=None, environment={})
    command = reproduce_command(r)
    assert command.startswith("# This image was never pushed to a registry")
    assert command.endswith(f"docker run --rm -it -p 8888:8888 {r.image_id} jupyter server --ip=0.0.0.0 --port=8888")


@pytest.mark.parametrize(
    ("overrides", "comments", "image"),
    [
        ({}, [], PUSHED),
        ({"repo_digest": None}, [f"# This image was never pushed to a registry, so only a host that has image "
                                 f"{IMAGE_ID} can run it."], IMAGE_ID),
        ({"repo_digest": None, "image_id": None}, ["# The record names this image only as requested: that name may "
                                                   "now point to a different image."], REQUESTED),
        ({"repo_digest": None, "image_id": None, "image_requested": None}, ["# The record names no image."],
         "'<unknown image>'"),
    ],
    ids=["by-digest", "never-pushed", "never-resolved", "no-image"],
)
def test_the_command_names_the_most_exact_image_the_record_holds(
    overrides: dict[str, Any], comments: list[str], image: str
) -> None:
    *lines, command = reproduce_command(record(**overrides)).split("\n")
    assert lines == comments
    assert command == (f"docker run --rm -it -p 8888:8888 --gpus 1 --cpus 8 --memory {MEMORY} -e OMP_NUM_THREADS=8 "
                       f"{image} jupyter server --ip=0.0.0.0 --port=8888")


def test_an_ordinary_script_runs_docker_once_with_the_commands_words(tmp_path: Path) -> None:
    ran = run_script(reproduce_command(record(environment={"OMP_NUM_THREADS": "8", "HF_TOKEN": REDACTED})), tmp_path)
    assert (ran.returncode, ran.stderr) == (0, "")
    assert ran.docker_calls == [argv(env=("-e", "HF_TOKEN", "-e", "OMP_NUM_THREADS=8"))]


# --- Quoting -----------------------------------------------------------------------------------

# Each tries to run `touch CANARY`: by a line break, command substitution, a list, or by closing a quote.
PAYLOADS = {
    "newline": "x\ntouch CANARY\n",
    "carriage-return": "x\rtouch CANARY\r",
    "command-substitution": "$(touch CANARY)",
    "backticks": "`touch CANARY`",
    "semicolon": "x; touch CANARY;",
    "and-and": "x && touch CANARY",
    "single-quote": "x'; touch CANARY; '",
    "double-quote": 'x"; touch CANARY; "',
    # an escape sequence that erases the line on screen, backspace, vertical tab, form feed, DEL, NEL,
    # Unicode's line separator and a bidi override
    "control-characters": "x\x1b[2K\x08\x0b\x0c\x7f\x85\u2028\u202e\ntouch CANARY",
    "all-at-once": "'\"\\$(touch CANARY)`touch CANARY`;touch CANARY&&\ntouch CANARY\r\\",
}


@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_a_shell_word_reads_back_exactly_and_prints_on_one_line(payload: str, tmp_path: Path) -> None:
    word = shell_word(payload)
    assert word.isprintable()
    result = subprocess.run([BASH, "-c", f"printf '%s' {word}"], cwd=tmp_path, env={"PATH": ""},
                            capture_output=True, timeout=30)
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout.decode() == payload


@pytest.mark.parametrize(
    ("text", "word"),
    [("OMP_NUM_THREADS=8", "OMP_NUM_THREADS=8"), ("a b", "'a b'"), ("it's", "'it'\"'\"'s'"), ("", "''"),
     ("a\nb", "$'a\\x0ab'"), ("it's\t", "$'it\\'s\\x09'"), ("é\u202e", "$'é\\xe2\\x80\\xae'")],
    ids=["plain", "space", "quote", "empty", "newline", "quote-and-tab", "bidi-override"],
)
def test_printable_text_is_quoted_as_shlex_does_and_the_rest_as_ansi_c(text: str, word: str) -> None:
    assert shell_word(text) == word


# --- Hostile records ---------------------------------------------------------------------------

Overrides = Callable[[str], dict[str, Any]]
Expected = Callable[[str], list[str]]
NOWHERE: frozenset[str] = frozenset()
COMMAND, COMMENT = frozenset({"command"}), frozenset({"comment"})

# Every text field of a record, and the fields that hold more than text: the payload in the field, what
# docker must be given, and where the script shows the payload (in the command, in a comment, nowhere).
TEXT_FIELDS = [f.name for f in fields(AuditRecord) if f.type in ("str", "str | None")]
HOSTILE: dict[str, tuple[Overrides, Expected, frozenset[str]]] = {
    **{name: ((lambda p, name=name: {name: p}), (lambda p: argv()), NOWHERE)
       for name in TEXT_FIELDS if name != "repo_digest"},
    "repo_digest": (lambda p: {"repo_digest": p}, lambda p: argv(image=IMAGE_ID), COMMENT),
    "repo_digest-registry": (lambda p: {"repo_digest": f"{p}.example/lab/pytorch@{DIGEST}"},
                             lambda p: argv(image=IMAGE_ID), COMMENT),
    "image_id-never-pushed": (lambda p: {"repo_digest": None, "image_id": p}, lambda p: argv(image=REQUESTED),
                              COMMENT),
    "image_requested-never-resolved": (lambda p: {"repo_digest": None, "image_id": None, "image_requested": p},
                                       lambda p: argv(image="<unknown image>"), COMMENT),
    "environment-name": (lambda p: {"environment": {p: "1"}}, lambda p: argv(env=()), COMMENT),
    "environment-secret-name": (lambda p: {"environment": {f"{p}_TOKEN": REDACTED}}, lambda p: argv(env=()),
                                COMMENT),
    "environment-value": (lambda p: {"environment": {"OMP_NUM_THREADS": p}},
                          lambda p: argv(env=("-e", f"OMP_NUM_THREADS={p}")), COMMAND),
    "devices": (lambda p: {"devices": (RecordedDevice(uuid=p, model=p, memory_total=1, mig_parent=p, mig_profile=p),)},
                lambda p: argv(), NOWHERE),
    "groups": (lambda p: {"groups": (p, "ml")}, lambda p: argv(), NOWHERE),
    "image_labels": (lambda p: {"image_labels": {p: p}}, lambda p: argv(), NOWHERE),
    "cpu_limit": (lambda p: {"cpu_limit": p}, lambda p: argv(limits=("--gpus", "1", "--memory", MEMORY)), COMMENT),
    "mem_limit": (lambda p: {"mem_limit": p}, lambda p: argv(limits=("--gpus", "1", "--cpus", "8")), COMMENT),
    "everything": (lambda p: {**{name: p for name in TEXT_FIELDS}, "environment": {p: p, "OMP_NUM_THREADS": p},
                              "cpu_limit": p, "mem_limit": p, "groups": (p,), "image_labels": {p: p},
                              "devices": (RecordedDevice(uuid=p, model=p, memory_total=1),)},
                   lambda p: argv(limits=("--gpus", "1"), env=("-e", f"OMP_NUM_THREADS={p}"), image="<unknown image>"),
                   COMMAND | COMMENT),
}
CASES = [pytest.param(field, payload_id, id=f"{field}-{payload_id}") for field in HOSTILE for payload_id in PAYLOADS]


def hostile(field: str, payload_id: str, tmp_path: Path) -> tuple[str, str]:
    """The script for the field holding the payload, and the payload (aimed at tmp_path/pwned)."""
    payload = PAYLOADS[payload_id].replace("CANARY", str(tmp_path / "pwned"))
    return reproduce_command(record(**HOSTILE[field][0](payload))), payload


@pytest.mark.parametrize(("field", "payload_id"), CASES)
def test_a_hostile_records_script_is_comment_lines_then_one_command_of_printable_text(
    field: str, payload_id: str, tmp_path: Path
) -> None:
    script, payload = hostile(field, payload_id, tmp_path)
    syntax = bash_syntax(script, tmp_path)
    assert (syntax.returncode, syntax.stderr) == (0, "")
    *comments, command = script.split("\n")
    assert all(line.isprintable() for line in script.split("\n")), script
    assert all(c.startswith("# ") for c in comments) and command.startswith("docker run "), script
    canary = str(tmp_path / "pwned")
    shown = HOSTILE[field][2]
    assert (canary in command) == ("command" in shown)
    assert any(canary in c for c in comments) == ("comment" in shown)


@pytest.mark.parametrize(("field", "payload_id"), CASES)
def test_a_hostile_records_script_runs_docker_once_and_nothing_else(field: str, payload_id: str, tmp_path: Path) -> None:
    script, payload = hostile(field, payload_id, tmp_path)
    ran = run_script(script, tmp_path)
    assert not (tmp_path / "pwned").exists(), script
    assert (ran.returncode, ran.stderr) == (0, ""), script
    assert ran.docker_calls == [HOSTILE[field][1](payload)]


def test_the_command_line_tool_prints_a_script_that_runs_only_docker(tmp_path: Path) -> None:
    """Through the store and `gpuspawner reproduce`, as an admin runs it."""
    payload = PAYLOADS["all-at-once"].replace("CANARY", str(tmp_path / "pwned"))
    url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    store = AuditStore(url, key=bytes(range(32)))
    store.insert(AuditRecord(id="evil", hub_id="hub-1", user=payload, server=payload, requested_at="2026-11-21T10:00:00+00:00",
                             image_requested=payload, image_id=payload, note=payload, error=payload,
                             environment={payload: "1", "OMP_NUM_THREADS": payload}))
    store.dispose()
    config = tmp_path / "jupyterhub_config.py"
    config.write_text(f"c = get_config()  # noqa\nc.GPUSpawner.audit_db_url = {url!r}\n")
    printed = subprocess.run([sys.executable, "-m", "gpuspawner.cli", "reproduce", "evil", "-f", str(config)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    ran = run_script(printed.stdout.removesuffix("\n"), tmp_path)
    assert not (tmp_path / "pwned").exists()
    assert (ran.returncode, ran.stderr) == (0, "")
    assert ran.docker_calls == [argv(limits=(), env=("-e", f"OMP_NUM_THREADS={payload}"), image="<unknown image>")]
