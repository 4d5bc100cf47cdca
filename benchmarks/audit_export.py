"""Export 1,000,000 audit records: time and peak memory of each format, through the real CLI.

    python benchmarks/audit_export.py [--records 1000000] [--keep DIR]

Fills an SQLite audit log with ended records (three entries each, as the hub writes them), then
runs `gpuspawner audit export --format csv|jsonl|ro-crate` and `gpuspawner audit verify` as
separate processes, each measured for wall time and peak resident memory (getrusage).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpuspawner.audit import AuditRecord, RecordedDevice
from gpuspawner.store import AuditStore, load_key

BIN = Path(sys.executable).parent


def fill(url: str, n: int, *, key_file: Path, head_file: Path) -> float:
    """n ended records, as the hub writes them (opened, devices and start, ended: three entries each), in big batches."""
    store = AuditStore(url, key=load_key(key_file, create=True), head_file=head_file)
    t0 = time.perf_counter()
    store.insert_many((_record(i) for i in range(1, n + 1)), batch=20_000)
    store.dispose()
    return time.perf_counter() - t0


def _record(i: int) -> AuditRecord:
    return AuditRecord(
        id=f"r{i:08d}", hub_id="hub-bench", user=f"user{i % 400:03d}", server="" if i % 3 else "train",
        requested_at=f"2026-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:00:00.{i % 1000000:06d}+00:00",
        outcome="stopped" if i % 10 else "failed", profile=("cpu", "a100-1", "mig")[i % 3],
        image_requested="quay.io/jupyter/pytorch-notebook:cuda12-2024-10-07",
        repo_digest="quay.io/jupyter/pytorch-notebook@sha256:" + f"{i % 7:x}" * 64,
        image_id="sha256:" + f"{i % 7:x}" * 64, container_id=f"{i:064x}",
        devices=(RecordedDevice(uuid=f"GPU-{i % 8:08x}-0000-4000-8000-{i % 8:012x}", model="NVIDIA A100-SXM4-80GB",
                                memory_total=80 * 2**30),) if i % 3 else (),
        environment={"OMP_NUM_THREADS": "8"}, error=None if i % 10 else "No free GPU for this server",
        started_at="2026-11-21T10:00:00+00:00", stopped_at="2026-11-21T11:00:00+00:00",
        driver_version="550.54.15", cuda_driver_version="12.4", gpuspawner_version="bench",
    )


def measured(args: list[str], out: Path) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MiB, and output size, of one command run as its own process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    with open(out, "wb") as f:
        subprocess.run(args, stdout=f, check=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest of any child so far: run the cheapest first
    return wall, max(peak, before) / 1024, out.stat().st_size


def bench_store(keep: str | None) -> tuple[Path, Path, Path]:
    """A folder (kept at `keep`, else a new temporary one) for a new, empty audit store: the folder, the
    database's path, and a hub configuration naming it, its sealing key and its chain head there."""
    folder = Path(keep or tempfile.mkdtemp(prefix="gpuspawner-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    db, config = folder / "audit.sqlite", folder / "jupyterhub_config.py"
    for old in (db, folder / "audit.key", folder / "audit.head"):
        old.unlink(missing_ok=True)
    config.write_text(
        f"c = get_config()\nc.GPUSpawner.audit_db_url = {'sqlite:///' + str(db)!r}\nc.GPUSpawner.hub_id = 'hub-bench'\n"
        f"c.GPUSpawner.audit_key_file = {str(folder / 'audit.key')!r}\n"
        f"c.GPUSpawner.audit_head_file = {str(folder / 'audit.head')!r}\n"
    )
    return folder, db, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--keep", help="a folder to keep the database and exports in")
    args = parser.parse_args()
    folder, db, config = bench_store(args.keep)
    url = f"sqlite:///{db}"
    key_file, head_file = folder / "audit.key", folder / "audit.head"

    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}; {args.records:,} records")
    seconds = fill(url, args.records, key_file=key_file, head_file=head_file)
    print(f"filled {db.stat().st_size / 2**20:.0f} MiB database in {seconds:.1f} s")
    cli = [str(BIN / "gpuspawner")]
    runs = [
        ("verify", cli + ["audit", "verify", "-f", str(config)], "verify.txt"),
        ("csv", cli + ["audit", "export", "--format", "csv", "-f", str(config)], "export.csv"),
        ("jsonl", cli + ["audit", "export", "--format", "jsonl", "-f", str(config)], "export.jsonl"),
        ("ro-crate", cli + ["audit", "export", "--format", "ro-crate", "-f", str(config)], "ro-crate-metadata.json"),
    ]
    print(f"{'command':<10}{'wall':>10}{'records/s':>12}{'peak RSS':>12}{'output':>12}")
    for name, command, out in runs:
        wall, peak, size = measured(command, folder / out)
        print(f"{name:<10}{wall:>9.1f}s{args.records / wall:>12,.0f}{peak:>9.0f} MiB{size / 2**20:>8.0f} MiB")
    if not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
