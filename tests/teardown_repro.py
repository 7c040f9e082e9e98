"""Candidate reproducer for the one teardown SIGSEGV of the pytest process (see the end of conftest.py).

Runs in one process the native machinery the pytest process runs in-process, then exits normally: inductor's
compile workers (torch.compile), an in-process two-raylet Ray cluster driven by raybench.grid.main (Tune), a
second Ray session, torch's intra-op threads (as the in-process Trials use), then the interpreter's teardown.
Run it in a loop with the fault handler on; look for exit status 139 and a "Fatal Python error" in the logs:

    for i in $(seq 20); do PYTHONPATH=$PWD python -X faulthandler tests/teardown_repro.py > repro.$i.log 2>&1;
        echo "$i rc=$?"; done

2026-12-01, 2 shared cores (load average 10-25): 10 runs of these calls, all exit 0. Its pieces alone also exited 0
every time: ray.init/shutdown after torch's threads (3 runs), one torch.compile (3), both (3), the two-node cluster
(2), grid.main on a local Ray (1, no Python thread left at exit); and so did 3 runs of the in-process tests
(test_grid's two in-process Ray tests, now in test_trainable; test_speed, test_models) with conftest's os._exit hook
removed.
"""
import sys
import tempfile

import ray
import torch
from ray.cluster_utils import Cluster

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
    finally:
        cluster.shutdown()
if rc != 0:
    sys.exit(f"grid.main returned {rc}: not the teardown this script is about")
ray.init(num_cpus=1, include_dashboard=False)  # a second Ray session in the same process, as the suite has
ray.shutdown()
torch.randn(512, 512) @ torch.randn(512, 512)  # torch's intra-op thread pool
print("done; the interpreter's teardown follows", flush=True)
