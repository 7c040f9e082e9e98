"""What runs on each node of a SLURM job that raybench.slurm wrote: one task per node, the same command on every
node (Ray's `ray symmetric-run` pattern). The first task starts the Ray head and, once every node has joined, the
driver (`python -m raybench.grid ... --address HEAD:PORT`); the others start a Ray worker that joins it. When
the driver ends, each node stops its own Ray and nothing else.

    python -m raybench.slurmjob --job-dir DIR --cpus 8 --gpus 4 -- python -m raybench.grid --experiment seed ...

Why not `ray symmetric-run` itself (Ray 2.60): it refuses to start where any Ray runs on the node ("Ray is
already started on this node": it looks for any raylet), and ends with `ray stop`, which stops every Ray on the
node, another job's too (ray-project/ray#59551). On a shared node each job here gets its own ports and its own Ray
temp folder, and stops only the processes that name that folder.

A SIGTERM or SIGINT to the head's task is passed to the driver, which stops the way Ctrl+C does; the batch script
sends it when SLURM warns of the time limit. The driver's exit status is the task's.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from raybench.session import NO_PRESTART, end_processes

PORT_BASE = 20000  # below Linux's ephemeral range (32768-60999), where connections take their local ports
SLOT = 200  # ports per job and node: 10 of Ray's services, the rest its worker processes
SLOTS = (32768 - PORT_BASE) // SLOT
WORKER_PORTS_FROM = 16
JOIN_TIMEOUT_S = 300


def job_ports(job_id: int, taken=None) -> dict:
    """This node's Ray ports for the job: a slot of SLOT ports chosen from the job id, the next free one where
    another job holds it."""
    taken = taken or port_taken
    for i in range(SLOTS):
        base = PORT_BASE + ((job_id + i) % SLOTS) * SLOT
        fixed = [base + k for k in range(9)]
        if not any(taken(p) for p in fixed + [base + WORKER_PORTS_FROM, base + SLOT - 1]):
            return {"port": base, "node-manager-port": base + 1, "object-manager-port": base + 2,
                    "ray-client-server-port": base + 3, "dashboard-port": base + 4,
                    "dashboard-agent-listen-port": base + 5, "dashboard-agent-grpc-port": base + 6,
                    "runtime-env-agent-port": base + 7, "metrics-export-port": base + 8,
                    "min-worker-port": base + WORKER_PORTS_FROM, "max-worker-port": base + SLOT - 1}
    raise RuntimeError(f"no free block of {SLOT} ports between {PORT_BASE} and 32767 on {socket.gethostname()}")


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


# Node-local and short: Ray's socket paths inside it must stay under the 107 characters a socket path may have.
# No other job's folder name contains it: this job's processes are told apart by it.
RAY_TEMP = "/tmp/rb-{job}-ray"


def ray_temp_dir(job_id: int) -> str:
    return RAY_TEMP.format(job=job_id)


def node_ip() -> str:
    from ray._private.services import get_node_ip_address
    return get_node_ip_address()


def ray_cli() -> str:
    """The `ray` of this Python's environment, whatever PATH holds on the node."""
    return str(Path(sys.executable).parent / "ray")


def start_ray(head_address: str | None, ports: dict, temp_dir: str, cpus: int, gpus: int,
              object_store_bytes: int | None, dashboard: bool = True) -> None:
    cmd = [ray_cli(), "start", f"--temp-dir={temp_dir}", f"--num-cpus={cpus}", f"--num-gpus={gpus}",
           "--disable-usage-stats"]
    if object_store_bytes:
        cmd.append(f"--object-store-memory={object_store_bytes}")
    names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port", "min-worker-port", "max-worker-port"]
    if head_address is None:
        ip, port = node_ip(), ports["port"]
        cmd += ["--head", f"--node-ip-address={ip}", f"--port={port}", "--dashboard-host=127.0.0.1"]
        names += ["ray-client-server-port", "dashboard-port"]
        if not dashboard:
            cmd.append("--include-dashboard=false")
    else:
        cmd += [f"--address={head_address}"]
    cmd += [f"--{n}={ports[n]}" for n in names]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**NO_PRESTART, **os.environ})
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-3000:]}")


def stop_ray(temp_dir: str) -> int:
    """End this job's Ray on this node: the processes whose command line names its temp folder."""
    return end_processes(temp_dir)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def wait_file(path: Path, timeout_s: float, also=lambda: False) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() or also():
            return True
        time.sleep(1)
    return False


class Forward:
    """Signals to this task go to the driver once it runs; one that comes before is kept for it."""

    def __init__(self):
        self.child, self.pending = None, None

    def __call__(self, signum, frame):
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)
        else:
            self.pending = signum


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m raybench.slurmjob")
    p.add_argument("--job-dir", required=True, help="this job's folder on the shared file system")
    p.add_argument("--cpus", type=int, required=True)
    p.add_argument("--gpus", type=int, default=0)
    p.add_argument("--object-store-bytes", type=int)
    p.add_argument("--no-dashboard", action="store_true", help="start the head without Ray's dashboard")
    p.add_argument("driver", nargs=argparse.REMAINDER, help="-- the driver's command, run on the head")
    args = p.parse_args(argv)
    driver = args.driver[1:] if args.driver[:1] == ["--"] else args.driver
    job_id, rank = int(os.environ["SLURM_JOB_ID"]), int(os.environ.get("SLURM_PROCID", "0"))
    nodes = int(os.environ.get("SLURM_NNODES", os.environ.get("SLURM_JOB_NUM_NODES", "1")))
    job_dir, temp_dir = Path(args.job_dir), ray_temp_dir(job_id)
    forward = Forward()
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    address_file, done_file = job_dir / "ray-address", job_dir / "done"
    try:
        if rank == 0:
            write_atomic(Path(temp_dir) / "head.pid", str(os.getpid()))
            ports = job_ports(job_id)
            start_ray(None, ports, temp_dir, args.cpus, args.gpus, args.object_store_bytes, not args.no_dashboard)
            address = f"{node_ip()}:{ports['port']}"
            write_atomic(address_file, address)
            where = "" if args.no_dashboard else f", dashboard 127.0.0.1:{ports['dashboard-port']} on that node"
            print(f"[slurmjob] Ray head at {address}{where}; temp folder {temp_dir}", flush=True)
            joined = lambda: len(list(job_dir.glob("node-*"))) >= nodes - 1
            if not wait_file(job_dir / "never", JOIN_TIMEOUT_S, joined):
                print(f"[slurmjob] error: only {len(list(job_dir.glob('node-*')))} of {nodes - 1} worker nodes "
                      f"joined within {JOIN_TIMEOUT_S} s", file=sys.stderr, flush=True)
                return 1
            if forward.pending is None and (job_dir / "stop").exists():  # warned before head.pid was written
                forward.pending = signal.SIGTERM
            if forward.pending is not None:  # stopped before the driver began: nothing to stop
                print(f"[slurmjob] {signal.Signals(forward.pending).name} before the driver started",
                      file=sys.stderr, flush=True)
                return 128 + forward.pending
            forward.child = subprocess.Popen([*driver, "--address", address])
            while True:
                try:
                    return forward.child.wait()
                except InterruptedError:
                    continue
        if not wait_file(address_file, JOIN_TIMEOUT_S):
            print(f"[slurmjob] error: no Ray head address in {address_file} after {JOIN_TIMEOUT_S} s",
                  file=sys.stderr, flush=True)
            return 1
        start_ray(address_file.read_text().strip(), job_ports(job_id), temp_dir, args.cpus, args.gpus,
                  args.object_store_bytes)
        (job_dir / f"node-{rank}").write_text(socket.gethostname())
        wait_file(done_file, float("inf"))
        return 0
    finally:
        if rank == 0:
            done_file.touch()
        stop_ray(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)  # Ray's logs of this job: node-local, one folder per job


if __name__ == "__main__":
    sys.exit(main())
