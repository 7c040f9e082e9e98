"""The Ray a run uses: a local Ray raybench starts (and cleans up after), or a cluster it joins; and whether the
cluster can ever hold the run's trials.

Ray 2.60 behaviours this works around, each seen on this project's machines (shared/ray-notes.md):
- `ray.init()` without an address joins whatever `/tmp/ray/ray_current_cluster` names, even when that Ray is
  long dead, and then refuses num_cpus/num_gpus; `address="local"` always starts a new instance.
- `ray.init(address="HOST:PORT")` does not send the token in ~/.ray/auth_token (only "auto" picks it up), so
  a token-protected head answers InvalidAuthToken once a second for ~20 s before a ConnectionError; an
  unreachable address retries for minutes.
- A loopback address is rewritten to the machine's own address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
  (which also keeps a local Ray's services on 127.0.0.1).
- After `kill -9` of a driver that started a local Ray, its DashboardAgent and RuntimeEnvAgent outlive the
  raylet and GCS (parent 1, still listening); see reaper() below.
- `ray.init` replaces the caller's SIGTERM handler with one that calls sys.exit, and the core worker it starts
  installs a C-level failure handler that prints a stack dump on SIGTERM; see keep_signal_handlers() below.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# For every Ray raybench starts (the local one, a SLURM job's, the local cluster; its raylet reads it): Ray
# starts an idle worker per CPU for a node's first driver, in the job's runtime environment. Tune gives its
# trial actors one of their own (env_vars), so no trial can use those workers: each would import Ray for nothing.
NO_PRESTART = {"RAY_prestart_worker_first_driver": "0"}


class ClusterUnavailable(RuntimeError):
    """The cluster to join cannot be reached or refuses us; the message says what to check."""


def tune_environment() -> None:
    """Settings Tune reads when the run starts (set here, where Ray starts, not at import)."""
    # Tune snapshots the experiment state every >= 10 s by default; a driver stopped sooner would restore to
    # the start and re-run finished trials. One second keeps --resume honest for short runs too.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # ... which makes Tune warn about frequent snapshots after every epoch; the frequency is deliberate.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def connect(plan):
    """Start the plan's local Ray, or join its cluster; returns ray.init's context."""
    tune_environment()
    with keep_signal_handlers():
        ctx = _connect(plan)
    forward_step_notes()
    return ctx


def forward_step_notes() -> None:
    """Print the trials' step notes (raybench.records.STEP_NOTE: a long epoch's progress) in the driver's output.
    Ray forwards its workers' output to the driver all or nothing (`log_to_driver`), and most of it is Ray's and
    Tune's logging: the driver takes it all and swaps Ray's printer for one that keeps those lines only. Ray
    Client connections (ray://) forward nothing."""
    from raybench.records import STEP_NOTE
    try:  # Ray's own (private) printer of forwarded lines; a Ray without it prints all of them, notes included
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return

    def print_step_notes(data: dict) -> None:
        for line in data.get("lines", ()):
            if STEP_NOTE.match(line):
                print(line, flush=True)
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("raybench_step_notes", print_step_notes)


@contextlib.contextmanager
def keep_signal_handlers(signals=(signal.SIGTERM, signal.SIGHUP, signal.SIGINT)):
    """Put back the Python handlers the caller had for `signals` once Ray has started. Setting a handler again
    through `signal.signal` also takes back the C-level handler from Ray's failure handler. A signal the caller
    left to its default stays Ray's."""
    mine = {s: signal.getsignal(s) for s in signals} if threading.current_thread() is threading.main_thread() else {}
    try:
        yield
    finally:
        for s, handler in mine.items():
            if callable(handler):
                signal.signal(s, handler)


def _connect(plan):
    if plan.local is None:
        return join(plan.address)
    if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        print("[grid] warning: Ray was imported before raybench.grid, so the local Ray's services will listen "
              "on all interfaces; run `python -m raybench.grid` in its own process to keep them on 127.0.0.1",
              flush=True)
    # Read at `import ray`: with it off, a local Ray of Ray 2.60 binds every service on 127.0.0.1 only.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for k, v in NO_PRESTART.items():
        os.environ.setdefault(k, v)
    import ray
    local = plan.local
    ctx = ray.init(address="local", num_cpus=local.cpus, num_gpus=local.gpus, include_dashboard=local.dashboard,
                   dashboard_host=local.dashboard_host, log_to_driver=True)
    start_reaper(ctx)
    return ctx


def resolve(address: str) -> str:
    """HOST:PORT for 'auto' (the address file of the latest `ray start`, or a running GCS) or as given."""
    from ray._private.services import canonicalize_bootstrap_address_or_die
    try:
        return canonicalize_bootstrap_address_or_die(address)
    except (ConnectionError, ValueError) as e:
        raise ClusterUnavailable(f"--address {address}: {e}") from None


def token_hint() -> str:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the token in RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return f"the token in {path}" + ("" if os.path.exists(path) else " (no such file)")


def join(address: str):
    """ray.init(address=...) that fails within seconds, in one message, when the cluster is not there or
    refuses our token. Ray's own retry lines go to a temporary file instead of the terminal."""
    if address.startswith("ray://"):  # Ray Client: its own protocol and errors
        import ray
        return ray.init(address=address, log_to_driver=False)
    host, _, port = address.rpartition(":")
    if host.strip("[]") in LOOPBACK:  # else Ray swaps a loopback address for the machine's own
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    target = resolve(address)
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise ClusterUnavailable(f"--address {address}: no Ray cluster answers at {target} ({e}); check that its "
                                 "head is up (`ray status` on the head) and that this machine can reach the port"
                                 ) from None
    # The port answers, so a failing connect is the cluster refusing us: a few tries are enough (Ray's
    # default is 20, one a second, each printing a line). Ray sends the token only for "auto"; for HOST:PORT
    # it is sent once the cluster asks for it (sending one to a cluster without token auth breaks its actors).
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    with tempfile.TemporaryFile() as log, _stderr_to(log):
        may_retry = os.environ.get("RAY_AUTH_MODE") is None
        try:
            return _init(ray, target, tries=2 if may_retry else 6)
        except (ConnectionError, RuntimeError) as e:
            error = e
        if may_retry and _rejected(log) and maybe_enable_token_auth_if_token_available(warn_if_disabled=False):
            ray.shutdown()
            try:  # the cluster answered and asked for a token: ours gets us in at once or is refused again
                return _init(ray, target, tries=3)
            except (ConnectionError, RuntimeError) as e:
                error = e
        why = "it rejected our authentication token" if _rejected(log) else str(error).splitlines()[0]
        raise ClusterUnavailable(
            f"--address {address}: cannot join the Ray cluster at {target}: {why}; check {token_hint()} (it "
            "must be the head's: `ray get-auth-token` on the head prints it; set RAY_AUTH_TOKEN or "
            "RAY_AUTH_TOKEN_PATH) and RAY_AUTH_MODE") from None


def _init(ray, target: str, tries: int):
    with _environ({"RAY_gcs_server_port_wait_time_s": os.environ.get("RAY_gcs_server_port_wait_time_s",
                                                                      str(tries))}):
        return ray.init(address=target, log_to_driver=True)


def _rejected(log) -> bool:
    log.seek(0)
    return b"InvalidAuthToken" in log.read()


@contextlib.contextmanager
def _environ(values: dict):
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _stderr_to(file):
    """Redirect file descriptor 2 (where Ray's C++ core logs) to `file` for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


# --- placement: can the cluster ever hold the trials? ----------------------------------------------------------

def autoscaler_status() -> dict | None:
    """The autoscaler's last report (a running autoscaler writes one every few seconds), or None: no
    autoscaler, so the nodes there now are all the cluster will ever have."""
    import json
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get
    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return json.loads(raw) if raw else None


def node_types(status: dict) -> tuple[bool, list[dict] | None]:
    """(autoscaling, node types): whether the cluster can add nodes, and the resources of each node type it may
    add when known. `ray start --head` always runs Ray's monitor; it autoscales only with an
    --autoscaling-config (read here when this driver runs where the monitor does: on the head, as `ray job
    submit` runs it, or the local fake cluster). Seen from elsewhere, a monitor without one reports every node
    as its own "node_<id>" type (Ray's read-only provider), which adds nothing."""
    import psutil
    import yaml
    try:
        cmd = psutil.Process(int(status["monitor_pid"])).cmdline()
    except (KeyError, ValueError, TypeError, psutil.Error):
        mapping = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
        readonly = all(str(t) == f"node_{n}" for n, t in mapping.items())
        return not readonly, None
    path = next((a.split("=", 1)[1] for a in cmd if a.startswith("--autoscaling-config=")), None)
    if path is None:
        return False, None
    try:
        config = yaml.safe_load(Path(path).read_text())
        return True, [dict(t.get("resources", {})) for t in config["available_node_types"].values()]
    except (KeyError, OSError, TypeError, AttributeError, yaml.YAMLError):
        return True, None


def check_placement(resources: dict) -> tuple[bool, str | None]:
    """(autoscaling, note). Raises ExperimentError when no node of the cluster, and no node type its
    autoscaler may add, can hold a trial; `note` says when a trial waits for the autoscaler."""
    import ray
    from raybench.experiments import ExperimentError
    from raybench.sizing import unfit
    import time
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    status = autoscaler_status()
    deadline = time.monotonic() + 6  # a head's monitor writes its first report a few seconds after start
    while status is None and unfit(resources, nodes) and time.monotonic() < deadline:
        time.sleep(1)
        status = autoscaler_status()
    autoscaling, types = node_types(status) if status else (False, None)
    if not autoscaling:
        msg = unfit(resources, nodes)
        if msg:
            raise ExperimentError(f"{msg}, and the cluster has no autoscaler to add one; lower the trial's "
                                  "resources (--gpus 0, --cpus-per-trial, the experiment's resources), or add a "
                                  "node that can hold it")
        return False, None
    if types is not None:
        msg = unfit(resources, nodes + types)
        if msg:
            raise ExperimentError(f"{msg} and no node type the autoscaler may add can hold it either; change "
                                  "the cluster's available_node_types or the trial's resources")
    msg = unfit(resources, nodes)
    return True, (f"{msg} now; the trial waits for the autoscaler to add a node" if msg else None)


# --- after a killed driver -------------------------------------------------------------------------------------

def start_reaper(ctx) -> None:
    """A small process that outlives this driver for as long as it lives, and then ends what is left of the
    local Ray session it started (the agents a `kill -9` of the driver leaves running). It only ever
    signals processes whose command line names this session's own folder."""
    session_dir = ctx.address_info.get("session_dir") if hasattr(ctx, "address_info") else None
    if not session_dir:
        return
    subprocess.Popen([sys.executable, "-m", "raybench.session", "reap", str(os.getpid()), session_dir],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)


def session_processes(session_dir: str) -> list:
    import psutil
    mine = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and any(session_dir in a for a in (p.info["cmdline"] or [])):
                mine.append(p)
        except psutil.Error:
            pass
    return mine


def end_processes(marker: str, grace_s: float = 5.0) -> int:
    """End the processes whose command line names `marker` (a Ray temp or session folder): SIGTERM, then SIGKILL
    for those still there after `grace_s`. Unlike `ray stop`, which ends every Ray on the machine, another
    user's or job's included. Returns how many there were."""
    procs = session_processes(marker)
    terminate(procs, grace_s)
    return len(procs)


def terminate(procs: list, grace_s: float) -> None:
    """SIGTERM, then SIGKILL for those still there after `grace_s`: Ray's agents ignore SIGTERM once their raylet
    is gone, and a GCS was seen to hang on it, flushing metrics to a dead agent."""
    import psutil
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=2.0)


def reap(driver_pid: int, session_dir: str, poll_s: float = 1.0, grace_s: float = 3.0) -> None:
    import time
    import psutil
    while psutil.pid_exists(driver_pid) and psutil.Process(driver_pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(poll_s)
    time.sleep(grace_s)  # a driver that shut Ray down itself has its processes exit on their own
    end_processes(session_dir, grace_s)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "reap":
    reap(int(sys.argv[2]), sys.argv[3])
