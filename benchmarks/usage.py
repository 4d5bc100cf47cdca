"""`gpuspawner usage` over 1,000,000 audit records: time and peak memory, through the real CLI.

    python benchmarks/usage.py [--records 1000000] [--runs 3] [--keep DIR [--reuse]] [--jobs N]

Fills an SQLite audit database with records as the hub writes them (each with its opening
seal; `AuditStore.insert_many`): 400 users in up to two of 12 groups, five profiles, 1 to 4
devices (whole A100s and H100s, MIG slices), most stopped with their idle time sampled, some
never sampled, some failed before a container started, some still running. It runs
`gpuspawner usage --by user` and `--by model` as separate processes (reading the log in
`--jobs` parts side by side, as usage does by default), and `--by user --jobs 1` (one
process), first when a tenth of the records are in and again with all of them. It reports the
median wall time of `--runs` runs and each command's peak resident memory: that of its largest
process, from wait4 (with --jobs N there are N such processes besides the command's own). The
same peak at a tenth and at all the records shows that memory does not grow with the record count.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from audit_export import bench_store  # benchmarks/ is on sys.path when a benchmark runs

from gpuspawner.audit import AuditRecord, RecordedDevice
from gpuspawner.store import AuditStore, load_key

START = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
SPREAD = 330 * 86400  # requests spread over 2026-01-01 .. 2026-11-27 (the last ones may still run)
GROUPS = [f"lab-{g:02d}" for g in range(12)]
A100, H100 = "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"
# profile -> (model, MIG profile or None, how many devices)
PROFILES = {
    "a100-1": (A100, None, 1), "a100-2": (A100, None, 2), "h100-4": (H100, None, 4),
    "mig-1g": (A100, "1g.10gb", 1), "mig-3g": (A100, "3g.40gb", 2),
}


def devices(profile: str, i: int) -> tuple[RecordedDevice, ...]:
    model, mig, count = PROFILES[profile]
    return tuple(
        RecordedDevice(uuid=f"MIG-{i % 97:08x}-{k}", model=model, memory_total=10 * 2**30, mig_parent=f"GPU-{i % 8:08x}",
                       mig_profile=mig)
        if mig else RecordedDevice(uuid=f"GPU-{(i + k) % 8:08x}-0000-4000-8000-{k:012x}", model=model, memory_total=80 * 2**30)
        for k in range(count)
    )


def records(first: int, last: int, n: int) -> Iterator[AuditRecord]:
    """Records first..last of n, in the order they were requested; the same ones whoever asks."""
    profiles = list(PROFILES)
    for i in range(first, last + 1):
        requested = START + datetime.timedelta(seconds=SPREAD * i / n)
        user = i * 7919 % 400
        profile = profiles[i * 31 % len(profiles)]
        kind = i % 50  # 0: failed before a container started; 1: still running (the newest); 2-6: never sampled
        started = requested + datetime.timedelta(seconds=5 + i % 40)
        held = datetime.timedelta(minutes=10 + i * 104729 % (3 * 24 * 60))  # 10 min to 3 days
        running = kind == 1 and i > n * 0.99
        devs = devices(profile, i)
        share = sum(1 if not d.mig_profile else int(d.mig_profile[0]) / 7 for d in devs)
        yield AuditRecord(
            id=f"r{i:08d}", hub_id="hub-bench", user=f"user{user:03d}", server="" if i % 4 else "train",
            requested_at=requested.isoformat(timespec="microseconds"),
            outcome="failed" if kind == 0 else "running" if running else "stopped", profile=profile,
            image_requested="quay.io/jupyter/pytorch-notebook:cuda12-2024-10-07",
            repo_digest="quay.io/jupyter/pytorch-notebook@sha256:" + f"{i % 7:x}" * 64,
            image_id="sha256:" + f"{i % 7:x}" * 64, container_id=None if kind == 0 else f"{i:064x}",
            devices=devs, environment={"OMP_NUM_THREADS": "8"},
            error="No free GPU for this server" if kind == 0 else None,
            started_at=None if kind == 0 else started.isoformat(timespec="microseconds"),
            stopped_at=None if kind == 0 or running else (started + held).isoformat(timespec="microseconds"),
            driver_version="550.54.15", cuda_driver_version="12.4", gpuspawner_version="bench",
            groups=tuple(GROUPS[(user + k) % len(GROUPS)] for k in range(user % 3)),  # 0, 1 or 2 groups
            idle_gpu_seconds=None if kind < 7 or running else held.total_seconds() * share * (i % 10) / 10,
        )


def measured(args: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in MiB (this command's own) and standard output of one command run as its own process."""
    t0 = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.PIPE)
    assert process.stdout is not None
    output = process.stdout.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - t0
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(args)} exited with {process.returncode}")
    return wall, usage.ru_maxrss / 1024, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3, help="runs of each command; the median wall time is reported")
    parser.add_argument("--keep", help="a folder to keep the database in")
    parser.add_argument("--reuse", action="store_true", help="measure the database kept in --keep by an earlier run")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8),
                        help="usage's --jobs for the side-by-side runs (default: as usage, this machine's CPUs up to 8)")
    args = parser.parse_args()
    if args.reuse:
        if not args.keep:
            parser.error("--reuse measures the database of an earlier --keep DIR: give that DIR")
        folder = Path(args.keep)
        db, config = folder / "audit.sqlite", folder / "jupyterhub_config.py"
    else:
        folder, db, config = bench_store(args.keep)
    url = f"sqlite:///{db}"
    key_file, head_file = folder / "audit.key", folder / "audit.head"

    n = args.records
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}; {n:,} records")
    store = AuditStore(url, key=load_key(key_file, create=True), head_file=head_file)
    cli = [sys.executable, "-m", "gpuspawner.cli", "usage", "-f", str(config), "--format", "json"]
    print(f"{'records':>10}  {'usage':<22}{'median wall':>12}{'records/s':>12}{'peak RSS':>12}  GPU-hours (idle)")
    filled = n if args.reuse else 0
    for size in (n,) if args.reuse else (n // 10, n):
        if size > filled:
            t0 = time.perf_counter()
            store.insert_many(records(filled + 1, size, n))
            seconds = time.perf_counter() - t0
            print(f"{'':>10}  filled {size - filled:,} records in {seconds:.1f} s ({(size - filled) / seconds:,.0f}/s); "
                  f"database {db.stat().st_size / 2**20:.0f} MiB")
            filled = size
        for by, jobs in (("user", args.jobs), ("model", args.jobs), ("user", 1)):
            runs = [measured([*cli, "--by", by, "--jobs", str(jobs)]) for _ in range(args.runs)]
            wall = statistics.median(r[0] for r in runs)
            total = json.loads(runs[0][2])["total"]
            command = f"--by {by} --jobs {jobs}"
            print(f"{size:>10,}  {command:<22}{wall:>11.1f}s{size / wall:>12,.0f}"
                  f"{max(r[1] for r in runs):>8.0f} MiB  {total['gpu_hours']:,.0f} ({total['idle_gpu_hours']:,.0f})")
    store.dispose()
    if not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
