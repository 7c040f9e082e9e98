"""Cluster files and the local autoscaling cluster.

1. cluster.yaml and cluster-local.yaml pass Ray's own cluster-config validation, and a misspelt key fails it.
2. cluster.yaml is safe by its own text: only SSH inbound, dashboard on 127.0.0.1, results on shared storage.
3. (slow) The fake autoscaling cluster adds GPU worker nodes for Tune trials that ask for fractional GPUs,
   listens on 127.0.0.1 only, and stops without leaving a process behind.

`fake_cluster` is built on raybench.cluster's functions only, so another test can start one the same way.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raybench.cluster import (ClusterConfigError, cluster_processes, is_loopback, listening_sockets,
                              start_local_cluster, stop_local_cluster, validate_cluster_config)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = ["cluster.yaml", "cluster-local.yaml"]


# --- 1. Ray's validation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_file_passes_ray_validation(name):
    config = validate_cluster_config(ROOT / name)
    workers = {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head must hold no GPU: trials belong on workers"
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers.values())
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers.values()), \
        "GPU workers start at zero and are added on demand"
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("name", CLUSTER_FILES)
@pytest.mark.parametrize("typo", [("idle_timeout_minutes:", "idle_timout_minutes:"),
                                  ("max_workers:", "max_worker:")])
def test_misspelt_key_fails_validation(name, typo, tmp_path):
    text = (ROOT / name).read_text()
    assert typo[0] in text
    bad = tmp_path / name
    bad.write_text(text.replace(typo[0], typo[1], 1))
    with pytest.raises(ClusterConfigError, match=rf"{bad.name}.*{typo[1][:-1]}"):
        validate_cluster_config(bad)


def test_unreadable_or_foreign_yaml_is_named(tmp_path):
    bad = tmp_path / "nope.yaml"
    bad.write_text("just: [a, list]\n")
    with pytest.raises(ClusterConfigError, match="nope.yaml"):
        validate_cluster_config(bad)
    with pytest.raises(ClusterConfigError, match="missing.yaml"):
        validate_cluster_config(tmp_path / "missing.yaml")


def test_fake_cluster_head_type_name_is_checked(tmp_path):
    text = (ROOT / "cluster-local.yaml").read_text().replace("ray.head.default", "head")
    bad = tmp_path / "local.yaml"
    bad.write_text(text)
    with pytest.raises(ClusterConfigError, match="ray.head.default"):
        validate_cluster_config(bad)


def test_cli_refuses_bad_local_cluster_arguments_before_starting_anything(tmp_path):
    long_dir = "/tmp/" + "x" * 60
    run = subprocess.run([sys.executable, "-m", "raybench.cluster", "up-local", "--temp-dir", long_dir], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "at most" in run.stderr and not Path(long_dir).exists()
    run = subprocess.run([sys.executable, "-m", "raybench.cluster", "up-local", "--config", "cluster.yaml"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "fake_multinode" in run.stderr
    run = subprocess.run([sys.executable, "-m", "raybench.cluster", "env-local", "--temp-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "no local cluster" in run.stderr
    short = Path(tempfile.mkdtemp(prefix="rbc-", dir="/tmp"))  # temp dirs must be short (socket paths)
    for ports, message in ((["--port", "6390", "--dashboard-port", "6390"], "must differ"),
                           (["--client-port", "11091"], "worker port range 10002-19999")):
        run = subprocess.run([sys.executable, "-m", "raybench.cluster", "up-local", "--temp-dir",
                              str(short / "t"), *ports], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and message in run.stderr and not (short / "t").exists(), run.stderr
    if os.getuid() == 0:  # as root, make a folder that belongs to someone else, as another user could
        foreign = short / "f"
        foreign.mkdir()
        os.chown(foreign, 65534, 65534)
        # free ports: a Ray of another test (the smoke run, or one on the other xdist worker) may hold the defaults
        free = list(map(str, _free_ports(4)))
        run = subprocess.run([sys.executable, "-m", "raybench.cluster", "up-local", "--temp-dir", str(foreign),
                              "--port", free[0], "--dashboard-port", free[1], "--client-port", free[2],
                              "--agent-port", free[3]],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and "is not a folder of this user's" in run.stderr, run.stderr
    import shutil
    shutil.rmtree(short)


def test_a_cluster_is_told_apart_from_one_whose_temp_dir_extends_its_name(tmp_path):
    temp = str(tmp_path / "rbc")
    # looks like the dashboard of another cluster, started with --temp-dir=<temp>-2
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                              "/x/site-packages/ray/dashboard/dashboard.py", f"--temp-dir={temp}-2"])
    try:
        wait = time.monotonic() + 10
        while other.pid not in [p.pid for p in cluster_processes(temp + "-2")] and time.monotonic() < wait:
            time.sleep(0.1)
        assert other.pid in [p.pid for p in cluster_processes(temp + "-2")]
        assert other.pid not in [p.pid for p in cluster_processes(temp)]  # down-local on temp leaves it alone
    finally:
        other.kill()


def test_cli_validate():
    ok = subprocess.run([sys.executable, "-m", "raybench.cluster", "validate", *CLUSTER_FILES], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("ok ") == 2


# --- 2. cluster.yaml's safety, read from the file --------------------------------------------------------------

@pytest.fixture(scope="module")
def aws():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_only_ssh_is_open_inbound(aws):
    rules = aws["provider"]["security_group"]["IpPermissions"]
    assert rules, "the security group must be written out, not left to Ray's defaults"
    for rule in rules:
        assert (rule["FromPort"], rule["ToPort"], rule["IpProtocol"]) == (22, 22, "tcp")
        cidrs = [r["CidrIp"] for r in rule.get("IpRanges", [])] + [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
        assert cidrs and not {"0.0.0.0/0", "::/0"} & set(cidrs), "SSH must be limited to a CIDR, not the world"
    for name, node in aws["available_node_types"].items():
        assert "SecurityGroupIds" not in node["node_config"], f"{name}: a group not described in this file"
    assert aws.get("docker", {}) in ({}, None), "docker run options could publish ports"


def test_dashboard_is_bound_to_loopback(aws):
    head = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    everything = json.dumps(aws)
    assert "0.0.0.0" not in everything
    for port in ("8265", "10001", "6379"):  # never in the security group
        assert port not in json.dumps(aws["provider"]["security_group"])


def test_results_go_to_shared_storage_and_workers_can_write_there(aws):
    text = (ROOT / "cluster.yaml").read_text()
    assert "s3://" in text and "--storage-path" in text, "the file must say where results and checkpoints go"
    for name, node in aws["available_node_types"].items():
        if name != aws["head_node_type"]:
            assert "IamInstanceProfile" in node["node_config"], f"{name}: workers need S3 access for checkpoints"


def test_nodes_run_the_project_and_its_pins(aws):
    setup = " ".join(aws["setup_commands"])
    assert "torch==2.14.1" in setup and "torchvision==0.29.1" in setup
    assert "ray[default,tune]==2.60.0" in setup
    assert "pip install -e ~/raybench" in setup
    assert any(remote.endswith("/raybench") for remote in aws["file_mounts"])


# --- 3. the local autoscaling cluster ----------------------------------------------------------------------------

def _pids_mentioning(text: str) -> list[int]:
    """Processes whose raw command line or environment contains `text`: a check independent of
    raybench.cluster.cluster_processes."""
    needle, pids = text.encode(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in blob:
            pids.append(int(entry.name))
    return pids


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def fake_cluster():
    """A fresh fake autoscaling cluster from cluster-local.yaml on free ports and its own short temp dir: a head
    without GPUs and no workers yet. One per test: when a job ran on a cluster an earlier test had used, the
    autoscaler removed that test's idle workers meanwhile, and the job's uploaded working dir vanished under its
    driver (fake nodes share one machine's session dir).

    Teardown stops it (idempotent, so a test may stop it first) and fails if any of its processes remain.
    """
    temp = tempfile.mkdtemp(prefix="rbc-", dir="/tmp")
    gcs, dashboard, client, agent = _free_ports(4)
    cluster = start_local_cluster(ROOT / "cluster-local.yaml", gcs, temp, dashboard_port=dashboard,
                                  client_port=client, agent_port=agent)
    try:
        yield cluster
    finally:
        stop_local_cluster(cluster)
        assert cluster_processes(temp) == []
        import shutil
        shutil.rmtree(temp, ignore_errors=True)


# Small drivers run in their own process with a clean environment, so pytest keeps no Ray connection.
NODES = textwrap.dedent("""
    import json, sys
    import ray
    ray.init(address=sys.argv[1], logging_level="WARNING", log_to_driver=False)
    print("RESULT " + json.dumps({n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}))
""")


def _nodes(cluster, env, tmp_path) -> dict:
    """Node id -> resources of the cluster's live nodes."""
    script = tmp_path / "nodes.py"
    script.write_text(NODES)
    run = subprocess.run([sys.executable, str(script), cluster.address], env=env, capture_output=True, text=True,
                         timeout=60)
    lines = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_a_job_submitted_with_the_working_dir_runs_the_smoke_grid_on_gpu_workers_the_autoscaler_adds(fake_cluster,
                                                                                                   tmp_path):
    """The README's cloud flow against the local cluster: `ray job submit --working-dir . -- python -m
    raybench.grid --address auto ...`. The job's driver runs on the head in an uploaded copy of this folder
    (so it imports that copy of raybench), joins with --address auto (the job sets RAY_ADDRESS), and writes
    the run folder the user asked for, analysis included. The trials ask for fractional GPUs, which only the
    worker type the autoscaler may add has: it adds GPU workers and every trial runs there. (One cluster and one
    grid for both flows: a fake cluster's start and a grid's Ray work are among the suite's dearest.)"""
    t0 = time.monotonic()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           "LANG": "C.UTF-8", **fake_cluster.driver_env()}
    start_nodes = _nodes(fake_cluster, env, tmp_path)
    # The token and the config the autoscaler re-reads are outside Ray's world-writable temp dir, private.
    private = Path(fake_cluster.token_path).parent
    assert Path(fake_cluster.config_path).parent == private and not private.is_relative_to(fake_cluster.temp_dir)
    assert private.stat().st_mode & 0o777 == 0o700 and Path(fake_cluster.token_path).stat().st_mode & 0o777 == 0o600
    # A trial that no node type of the autoscaler can hold is refused before any trial starts (a grid that
    # joins with --address HOST:PORT, as docs/cluster.md runs it from a machine of the cluster).
    refused = subprocess.run([sys.executable, "-m", "raybench.grid", "--address", fake_cluster.address, "--gpus",
                              "2", "--cpus-per-trial", "64", "--only", "vit-p8-e32-l1", "--results-dir",
                              str(tmp_path), "--name", "too-big"], env=env, capture_output=True, text=True,
                             timeout=120, cwd=ROOT)
    assert refused.returncode == 2 and "no node type the autoscaler may add can hold it" in refused.stderr, (
        refused.stdout[-2000:] + refused.stderr[-2000:])
    assert not (tmp_path / "too-big").exists()
    # two smoke ViTs, at 1 epoch of 400 images: what is checked is where trials run, not what they learn (the
    # other families' trials are placed the same way; the watched smoke run trains them all)
    job = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address",
                          fake_cluster.dashboard_url, "--working-dir", ".", "--",
                          "python", "-m", "raybench.grid", "--experiment", "smoke", "--only", "vit-p8-*",
                          "--address", "auto", "--gpus", "2", "--cpus-per-trial", "0.5", "--epochs", "1",
                          "--train-size", "400", "--test-size", "100", "--results-dir", str(tmp_path),
                          "--name", "job"],
                         env=env, capture_output=True, text=True, timeout=500, cwd=ROOT)
    out = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in out, out[-4000:]
    run_dir = tmp_path / "job"
    trials = pd.read_parquet(run_dir / "trials.parquet")
    epochs = pd.read_parquet(run_dir / "epochs.parquet")
    assert set(trials.trial) == {"vit-p8-e32-l1-h2-m2-seed", "vit-p8-e32-l2-h2-m2-seed"}
    assert (trials.status == "ok").all() and len(epochs) == 2
    assert (run_dir / "analysis" / "report.md").stat().st_size > 0
    assert "[grid] 2 trials: 2 ok" in out  # the driver's own summary, streamed back by `ray job submit`
    assert "waits for the autoscaler to add a node" in out  # node types that can hold them: they wait
    # the job ran the uploaded copy: its driver's working folder is Ray's, not this checkout
    assert not json.loads((run_dir / "experiment.json").read_text())["path"].startswith(str(ROOT))

    # Only the head (no GPU) existed; the autoscaler added GPU workers and every trial ran there.
    nodes = _nodes(fake_cluster, env, tmp_path)
    assert len(start_nodes) == 1 and all(r.get("GPU", 0) == 0 for r in start_nodes.values())
    trial_nodes = set(epochs.node_id)
    assert not trial_nodes & set(start_nodes), "trials ran on a node that existed at start"
    # A worker idle for idle_timeout_minutes (30 s) is removed, and the fake provider's removed nodes are not
    # listed: those still there must be GPU workers; every trial's GPU id, from Ray, says the same of all.
    assert trial_nodes & set(nodes), (trial_nodes, nodes)
    for node in trial_nodes & set(nodes):
        assert nodes[node].get("GPU", 0) >= 1, f"trial node {node} holds no GPU"
    assert (epochs.gpu_ids != "").all(), "each trial got a (logical) GPU"

    # Every listening socket of the cluster, fake workers included, is on the loopback interface.
    sockets = listening_sockets(fake_cluster.temp_dir)
    assert sockets and all(is_loopback(ip) for _, _, ip, _ in sockets), sockets
    assert any(port == int(fake_cluster.address.rsplit(":", 1)[1]) for *_, port in sockets)

    # Stopping leaves none of the cluster's processes, and its GCS port is free again.
    stop_local_cluster(fake_cluster)
    assert cluster_processes(fake_cluster.temp_dir) == []
    assert not listening_sockets(fake_cluster.temp_dir)
    if Path("/proc").is_dir():
        assert _pids_mentioning(fake_cluster.temp_dir) == []
    print(f"\nfake cluster: {len(trial_nodes)} GPU worker node(s) {sorted(n[-5:] for n in trial_nodes)}, "
          f"test {time.monotonic() - t0:.1f} s, {len(sockets)} listeners on 127.0.0.1")
