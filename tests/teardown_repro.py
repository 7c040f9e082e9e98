"""Candidate reproducer for the one teardown SIGSEGV of the pytest process (see the end of conftest.py).

Runs in one process the native machinery the pytest process runs in-process, then exits normally: inductor's
compile workers (torch.compile), an in-process two-raylet Ray cluster driven by raybench.grid.main (Tune), a
second Ray session, torch's intra-op threads (as the in-process Trials use), then the interpreter's teardown.
It prints which native threads are alive after grid.main's ray.shutdown() and at the end, by their kernel names
(a thread takes its creator's name: `worker.io` is the core worker's io thread or one it started). Run it in a
loop with core dumps on; look for exit status 139, a "Fatal Python error" in the logs and a core file:

    ulimit -c unlimited; for i in $(seq 20); do PYTHONPATH=$PWD python -X faulthandler tests/teardown_repro.py \
        > repro.$i.log 2>&1; echo "$i rc=$? $(grep 'worker.io' repro.$i.log | head -1)"; done

2026-12-01, 2 shared cores (load average 10-25): 10 runs of these calls, all exit 0. Its pieces alone also exited 0
every time: ray.init/shutdown after torch's threads (3 runs), one torch.compile (3), both (3), the two-node cluster
(2), grid.main on a local Ray (1, no Python thread left at exit); and so did 3 runs of the in-process tests
(test_grid's two in-process Ray tests, now in test_trainable; test_speed, test_models) with conftest's os._exit hook
removed.
2026-12-04, 2 cores: in 17 runs of this script in a loop, `worker.io` was still running after grid.main's
ray.shutdown() in 9 (and after a gc.collect(): no reference cycle holds it), and every run exited 0. grid.main
alone against a one-node Cluster left it behind in 2 of 12 runs; grid.main on a local Ray, ray.init/ray.shutdown
against the Cluster (plain, with ray.nodes(), raybench's join or check_placement) and a trivial Tune run against
it did not (one run each). It was also alive in the pytest worker that ran the two-node test. With
REPRO_PAUSE_S=40, gdb (`thread apply all bt`) on a run that had it: a boost::asio thread_pool thread idle in its
scheduler (started from the core worker's io thread, whose own loop had ended), opencensus' DeltaProducer
harvester loop, the GlobalStateAccessor's io thread, Arrow's thread pool, Ray's gRPC threads and the gcs_client
io thread, all waiting; that run exited 0 too.
2026-12-05, 2 cores: under valgrind's memcheck (PYTHONMALLOC=malloc, --undef-value-errors=no), one run took 5 min, had
worker.io alive, and reported no invalid read or write in the teardown (its 22 errors in 4 contexts were all in glibc's
dlopen reading a library's rpath, under ctypes' dlopen); exit 0. Under tests/teardown_widen.sh (the main thread held 12
s as modules are cleared, 5 s before and 5 s after the static destructors): 2 runs, exit 0.
"""
import gc
import os
import sys
import tempfile
import time

import ray
import torch
from ray.cluster_utils import Cluster

from conftest import native_threads  # this script's folder, tests/, is on sys.path
from raybench.grid import main

torch.compile(lambda x: (x * 2).sin())(torch.ones(4))  # inductor's compile worker pool
with tempfile.TemporaryDirectory() as tmp:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        rc = main(["--address", cluster.address, "--gpus", "0", "--only", "vit-p8-e32-l1-*", "--epochs", "1",
                   "--train-size", "200", "--test-size", "100", "--results-dir", tmp, "--name", "repro",
                   "--no-analysis"])
        after_grid = native_threads()
    finally:
        cluster.shutdown()
if rc != 0:
    sys.exit(f"grid.main returned {rc}: not the teardown this script is about")
print(f"after grid.main's ray.shutdown(): worker.io {'alive' if 'worker.io' in after_grid else 'gone'}; "
      f"native threads {after_grid}", flush=True)
if "worker.io" in after_grid:  # held by a reference cycle the collector has not reached yet, or not?
    gc.collect()
    time.sleep(1)
    print(f"after gc.collect(): worker.io {'alive' if 'worker.io' in native_threads() else 'gone'}", flush=True)
    pause = float(os.environ.get("REPRO_PAUSE_S", "0"))  # time to look: gdb -p PID -batch -ex "thread apply all bt"
    if pause:
        print(f"pid {os.getpid()}: waiting {pause:g} s", flush=True)
        time.sleep(pause)
ray.init(num_cpus=1, include_dashboard=False)  # a second Ray session in the same process, as the suite has
ray.shutdown()
torch.randn(512, 512) @ torch.randn(512, 512)  # torch's intra-op thread pool
print(f"done; the interpreter's teardown follows; native threads {native_threads()}", flush=True)
