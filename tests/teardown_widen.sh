#!/usr/bin/env bash
# Hunts the pytest process's one teardown SIGSEGV (see the end of tests/conftest.py) by widening the windows in
# which a native thread could touch what the exiting main thread has already freed. A race that needs the main
# thread to be at one point of its exit while another thread wakes is rare at full speed; here the main thread
# is held still at three points while every other thread runs on:
#   1. 12 s as Python starts clearing modules (finalize_modules): a native thread that calls into Python now,
#      or a daemon thread that wakes (tqdm's monitor sleeps 10 s), meets a finalising interpreter;
#   2. 5 s in exit(), after Python is gone and before the C++ static destructors;
#   3. LINGER_S (5) s after every extension module's static destructors have run (a preloaded library's
#      destructor runs after those of the libraries dlopen'ed later): a thread that wakes now finds its statics
#      destroyed (Ray's gRPC threads, which nothing joins, are among those still running here).
# A crash stops gdb with every thread's backtrace in the output. Needs gdb, gcc and g++ (Debian's images have
# them) and a Python whose libpython has its symbols (pyenv's does): each window says "[widen]" when it is held.
#
#   bash tests/teardown_widen.sh                          # the in-process tests below, teardown kept
#   bash tests/teardown_widen.sh .venv/bin/python tests/teardown_repro.py
#   bash tests/teardown_widen.sh --control                # must crash: shows the widening catches such a race
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cat > "$work/linger.c" <<'EOF'
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
/* Only the process gdb starts lingers: its children (compilers, Ray's workers) must not inherit the preload. */
__attribute__((constructor)) static void only_this_process(void) { unsetenv("LD_PRELOAD"); }
static void threads(const char *when) {
  char names[4096] = "";
  int n = 0;
  DIR *d = opendir("/proc/self/task");
  for (struct dirent *e; d && (e = readdir(d));) {
    if (e->d_name[0] == '.') continue;
    char path[300], comm[64] = "";
    snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
    FILE *f = fopen(path, "r");
    if (f) { if (fgets(comm, sizeof comm, f)) comm[strcspn(comm, "\n")] = 0; fclose(f); }
    if (strlen(names) + strlen(comm) + 3 < sizeof names) { strcat(names, comm); strcat(names, ", "); }
    n++;
  }
  if (d) closedir(d);
  fprintf(stderr, "[widen] %s: %d threads: %s\n", when, n, names);
}
__attribute__((destructor)) static void linger(void) {
  threads("after the static destructors");
  sleep(atoi(getenv("LINGER_S") ? getenv("LINGER_S") : "5"));
  threads("still running after the wait");
}
EOF
gcc -shared -fPIC -O1 -o "$work/liblinger.so" "$work/linger.c"

cat > "$work/widen.gdb" <<'EOF'
set pagination off
set confirm off
set non-stop on
set print thread-events off
handle all nostop noprint pass
set breakpoint pending on
break finalize_modules
commands
silent
printf "[widen] finalize_modules: main thread held 12 s\n"
shell sleep 12
continue
end
break exit
commands
silent
printf "[widen] exit(): main thread held 5 s before the static destructors\n"
shell sleep 5
continue
end
catch signal SIGSEGV SIGABRT SIGBUS
run
if $_isvoid($_exitcode)
  printf "[widen] CRASH: the stopped thread's backtrace\n"
  thread apply all -c bt 40
end
EOF

if [ "${1:-}" = "--control" ]; then
  # A known race of this kind: a detached thread reads a static that the static destructors free. At full speed
  # the process is gone before the thread wakes (every 100 ms) and it exits 0; held in window 3 it must crash.
  cat > "$work/control.cc" <<'EOF'
#include <chrono>
#include <thread>
struct Registry { int *volatile data = new int[16](); ~Registry() { delete[] data; data = nullptr; } };
static Registry registry;
static volatile int sink;
extern "C" void start() {
  std::thread([] {
    for (;;) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      sink = registry.data[0];
    }
  }).detach();
}
EOF
  g++ -shared -fPIC -O1 -o "$work/libcontrol.so" "$work/control.cc"
  set -- .venv/bin/python -c "import ctypes; ctypes.CDLL('$work/libcontrol.so').start()"
elif [ $# -eq 0 ]; then
  # what runs Ray, Tune, torch.compile, Swin and the bench inside the pytest process
  set -- .venv/bin/python -m pytest -n 0 -q -p no:cacheprovider tests/test_trainable.py \
    "tests/test_grid.py::test_two_node_cluster_runs_trials_on_both_nodes_and_a_node_that_dies_costs_at_most_its_epoch" \
    tests/test_speed.py tests/test_bench.py tests/test_models.py
fi
# `env` sets the preload for the command alone (gdb follows the exec). Prints the command's output and gdb's
# verdict; exits 0 when the command exited normally, 1 on a crash (after the backtraces), else the command's status.
gdb -q -batch -x "$work/widen.gdb" --args env RAYBENCH_TEST_FULL_TEARDOWN=1 PYTHONPATH="$PWD" \
  LD_PRELOAD="$work/liblinger.so" "$@" > "$work/out" 2>&1 || true
grep -v '^\[Detaching after' "$work/out"  # thread events are off; forks of Ray and the compilers remain
if grep -q '^\[widen\] CRASH' "$work/out"; then
  exit 1
elif grep -q 'exited normally\]' "$work/out"; then
  exit 0
fi
code=$(grep -o 'exited with code [0-9]*' "$work/out" | tail -1 | grep -o '[0-9]*$' || true)
[ -n "$code" ] && exit $((8#$code))  # gdb prints it in octal
exit 1
