"""The Ray dashboard while a grid runs: it answers on 127.0.0.1, shows the job and the trial actors under
their config names, and nothing the grid started listens beyond the loopback address."""
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from raybench.cluster import is_loopback


def dashboard_get(url: str, path: str):
    """GET a dashboard API path; Ray's token auth (on by default) wants the token ray.init wrote."""
    token_file = Path.home() / ".ray" / "auth_token"
    headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"} if token_file.exists() else {}
    with urllib.request.urlopen(urllib.request.Request(url + path, headers=headers), timeout=10) as r:
        return json.loads(r.read())


def listening(root_pid: int) -> list[tuple[str, str, int]]:
    procs = {root_pid: psutil.Process(root_pid)}
    procs.update({p.pid: p for p in procs[root_pid].children(recursive=True)})
    out = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in procs:
            out.append((procs[c.pid].name(), c.laddr.ip, c.laddr.port))
    return out


@pytest.mark.slow
def test_dashboard_shows_job_and_trials_and_everything_listens_on_loopback(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "raybench.grid", "--gpus", "0", "--only", "vit-p4-*",
                             "--epochs", "6", "--train-size", "3000", "--results-dir", str(tmp_path),
                             "--name", "dash", "--no-analysis"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trials = {"vit-p4-e32-l1-h2-m2-seed", "vit-p4-e32-l2-h2-m2-seed"}
    lines = []
    try:
        url = None
        for line in proc.stdout:  # the URL is printed at start
            lines.append(line)
            m = re.search(r"Ray dashboard: (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url and url.startswith("http://127.0.0.1:"), "".join(lines)
        seen_actors, jobs, sockets = set(), [], []
        deadline = time.time() + 120
        while time.time() < deadline and not trials <= seen_actors:
            actors = dashboard_get(url, "/api/v0/actors?detail=1&limit=100")["data"]["result"]["result"]
            seen_actors |= {a.get("repr_name") for a in actors if a.get("state") == "ALIVE"}
            jobs = dashboard_get(url, "/api/jobs/")
            sockets = listening(proc.pid)
            time.sleep(1)
        assert trials <= seen_actors, seen_actors
        assert any(j.get("type") == "DRIVER" and j.get("status") == "RUNNING" for j in jobs), jobs
        assert sockets and all(is_loopback(ip) for _, ip, _ in sockets), sockets
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, "".join(lines) + out
    # per-trial metrics also land as TensorBoard event files under the results folder
    assert {p.parent.name for p in (tmp_path / "dash").rglob("events.out.tfevents.*")} == trials
