"""pytest plugin: the CPU each test costs, Ray's daemons and every subprocess included.

The suite is CPU-bound on 2 cores (every Ray start costs CPU, a trial process imports torch), so wall time per
test says little about what to cut: a test that waits on a cluster takes wall time but leaves the cores to the
other xdist worker. This plugin reads the CPU counter of a cgroup that holds the whole pytest process tree
(scripts/cpu-per-test.sh makes one) around each test, writes one JSON line per test and prints the largest.
Only meaningful with the tests run one at a time (no xdist), since the counter is the whole group's.
"""
from __future__ import annotations

import json
import os
import time

import pytest

COUNTER = os.environ.get("RAYBENCH_CPU_COUNTER", "")
OUT = os.environ.get("RAYBENCH_CPU_OUT", "cpu-per-test.jsonl")
_rows: list[dict] = []


def _core_seconds() -> float:
    text = open(COUNTER).read()
    if COUNTER.endswith("cpu.stat"):  # cgroup v2: "usage_usec N" among other lines
        return int(next(l.split()[1] for l in text.splitlines() if l.startswith("usage_usec"))) / 1e6
    return int(text) / 1e9  # cgroup v1 cpuacct.usage: nanoseconds


def pytest_configure(config):
    if not COUNTER or not os.path.exists(COUNTER):
        raise pytest.UsageError(f"RAYBENCH_CPU_COUNTER={COUNTER!r}: not a cgroup CPU counter; "
                                "run the suite through scripts/cpu-per-test.sh")
    open(OUT, "w").close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cpu, wall = _core_seconds(), time.monotonic()
    yield  # setup, call and teardown: a session fixture's cost lands on the first test that asks for it
    row = {"test": item.nodeid, "core_s": round(_core_seconds() - cpu, 2), "wall_s": round(time.monotonic() - wall, 2)}
    _rows.append(row)
    with open(OUT, "a") as f:
        f.write(json.dumps(row) + "\n")


def pytest_terminal_summary(terminalreporter):
    total = sum(r["core_s"] for r in _rows)
    terminalreporter.write_sep("=", f"CPU per test: {total:.0f} core-s in all, {OUT}")
    for r in sorted(_rows, key=lambda r: -r["core_s"])[:25]:
        terminalreporter.write_line(f"{r['core_s']:8.1f} core-s {r['wall_s']:7.1f} s  {r['test']}")
