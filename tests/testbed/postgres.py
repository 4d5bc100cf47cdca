"""A throwaway PostgreSQL server for the test session: Debian's `postgresql`, on 127.0.0.1 only.

Test scaffolding only. The cluster lives in a temporary folder owned by the `postgres` user
when the tests run as root (PostgreSQL refuses to run as root), trusts local connections,
and is stopped and removed at the end.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from testbed import free_port


def find_bindir() -> Path | None:
    """The newest Debian PostgreSQL's bin folder (/usr/lib/postgresql/<ver>/bin), else initdb's on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]) if Path(p).parts[4].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _as_owner(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@dataclass
class PostgresServer:
    bindir: Path
    folder: Path
    port: int

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @classmethod
    def start(cls, bindir: Path) -> PostgresServer:
        folder = Path(tempfile.mkdtemp(prefix="gpuspawner-postgres-"))
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(folder, owner.pw_uid, owner.pw_gid)
        server = cls(bindir, folder, free_port())
        try:
            server._run("initdb", "-D", str(server.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
            options = f"-c listen_addresses=127.0.0.1 -p {server.port} -k {folder} -c fsync=off -c full_page_writes=off"
            server._run("pg_ctl", "-D", str(server.data), "-l", str(folder / "server.log"), "-o", options, "-w", "-t", "60", "start")
        except BaseException:
            server.stop()
            raise
        return server

    def _run(self, program: str, *args: str) -> None:
        out = subprocess.run(_as_owner([str(self.bindir / program), *args]), capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            log = self.folder / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{program} failed ({out.returncode}): {out.stderr.strip()}\n{tail}")

    def create_database(self) -> str:
        """A new, empty database; returns its SQLAlchemy URL (psycopg 3)."""
        import psycopg

        name = "test_" + secrets.token_hex(6)
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                _as_owner([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"]),
                capture_output=True, timeout=60,
            )
        shutil.rmtree(self.folder, ignore_errors=True)
