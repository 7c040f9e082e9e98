#!/usr/bin/env bash
# Core-seconds per test (scripts/cpu_per_test.py): runs the suite one test at a time inside a new cgroup, so
# Ray's daemons and the grids' subprocesses count against the test that started them. Linux, as root (cgroup v2,
# or v1 with the cpuacct controller). Extra arguments go to pytest; per-test rows land in cpu-per-test.jsonl.
#   sudo bash scripts/cpu-per-test.sh -k grid
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
name="raybench-tests-$$"
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  group="/sys/fs/cgroup/$name"; counter="$group/cpu.stat"
elif [ -d /sys/fs/cgroup/cpuacct ]; then
  group="/sys/fs/cgroup/cpuacct/$name"; counter="$group/cpuacct.usage"
else
  echo "error: no cgroup CPU accounting here (neither /sys/fs/cgroup/cgroup.controllers nor /sys/fs/cgroup/cpuacct)" >&2
  exit 1
fi
mkdir "$group" || { echo "error: cannot create $group (needs root)" >&2; exit 1; }
trap 'rmdir "$group" 2>/dev/null || true' EXIT
# pytest is started from a subshell that moved itself into the group: everything it starts stays there
( echo "$BASHPID" > "$group/cgroup.procs"
  RAYBENCH_CPU_COUNTER="$counter" PYTHONPATH="scripts${PYTHONPATH:+:$PYTHONPATH}" \
    exec .venv/bin/python -m pytest -p no:xdist -p cpu_per_test "$@" )
