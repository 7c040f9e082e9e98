"""Ray clusters for raybench: check cluster-launcher files the way Ray does, and run the local autoscaling
cluster (Ray's fake multi-node provider) that the tests and docs/cluster.md use.

The local cluster is kept apart from any other Ray on the machine: its own --temp-dir, ports and auth token,
every service on 127.0.0.1, and a marker variable in the environment of each of its processes. Stopping it kills
exactly those processes; it never runs `ray stop`, which stops every Ray on the machine.

    python -m raybench.cluster validate cluster.yaml cluster-local.yaml
    eval "$(python -m raybench.cluster up-local)"      # starts it, prints the `export` lines a driver needs
    python -m raybench.grid --experiment smoke --address auto ...
    python -m raybench.cluster down-local
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import yaml

from raybench.session import NO_PRESTART, terminate

FAKE_PROVIDER = "fake_multinode"
# The fake provider always calls its head node type this (ray.autoscaler._private.fake_multi_node).
FAKE_HEAD_NODE_TYPE = "ray.head.default"
# The autoscaler reads a fake-provider file as it is, without Ray's defaults (the wheel does not ship
# fake_multi_node/example.yaml, so `prepare_config` cannot fill them in): these keys must be written out.
FAKE_REQUIRED_KEYS = (
    "cluster_name", "max_workers", "upscaling_speed", "idle_timeout_minutes", "provider", "auth", "docker",
    "available_node_types", "head_node_type", "file_mounts", "cluster_synced_files",
    "file_mounts_sync_continuously", "rsync_exclude", "rsync_filter", "initialization_commands",
    "setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
    "worker_start_ray_commands",
)

DEFAULT_LOCAL_CONFIG = "cluster-local.yaml"
DEFAULT_TEMP_DIR = "/tmp/raybench-cluster"
# Ray puts Unix sockets under <temp_dir>/session_<date>_<pid>/sockets/ (about 65 characters); Linux allows
# 107 in a socket path.
MAX_TEMP_DIR_CHARS = 40
MARKER_ENV = "RAYBENCH_LOCAL_CLUSTER"  # its value, the temp dir, is in the environment of every process
STATE_FILE = "raybench-cluster.json"
RAY_WORKER_PORTS = (10002, 19999)  # Ray's default --min-worker-port / --max-worker-port
LOOPBACK = "127.0.0.1"


class ClusterConfigError(ValueError):
    """A cluster file that Ray (or raybench's extra checks for the fake provider) rejects; names the file."""


# --- validation ----------------------------------------------------------------------------------------------

def validate_cluster_config(path: str | os.PathLike) -> dict:
    """Validate a cluster-launcher YAML with Ray's own checks; return the config as Ray will use it.

    Cloud providers (aws, gcp, ...): `prepare_config` (merge Ray's defaults for the provider, fill min/max
    workers) then `validate_config` (Ray's JSON schema), which is what `ray up` does before it talks to the
    cloud; no credentials or boto3 needed. The schema catches misspelt keys at the top level, in node types
    and in `auth`, not inside `provider` or `node_config` (free-form there).
    fake_multinode: `validate_config` on the file as written, which is what the autoscaler does with it
    (and then only logs a failure at debug level, so a bad file starts a cluster that never scales), plus the
    keys and head type name the fake provider needs.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ClusterConfigError(f"{path}: cannot read cluster config: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("provider"), dict):
        raise ClusterConfigError(f"{path}: not a Ray cluster config (a mapping with a `provider:` section)")

    import jsonschema
    ray_util_log = logging.getLogger("ray.autoscaler._private.util")
    level = ray_util_log.level  # prepare_config logs an INFO line per defaulted field; keep the CLI quiet
    ray_util_log.setLevel(logging.WARNING)
    try:
        if raw["provider"].get("type") == FAKE_PROVIDER:
            config = copy.deepcopy(raw)
            validate_config(config)
            _check_fake_provider(config)
        else:
            config = prepare_config(copy.deepcopy(raw))
            validate_config(config)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "top level"
        raise ClusterConfigError(f"{path}: Ray's cluster schema rejects it at {where}: {e.message}") from e
    except (ValueError, KeyError, TypeError, RuntimeError, NotImplementedError, OSError) as e:
        raise ClusterConfigError(f"{path}: invalid cluster config: {type(e).__name__}: {e}") from e
    finally:
        ray_util_log.setLevel(level)
    return config


def _check_fake_provider(config: dict) -> None:
    missing = [k for k in FAKE_REQUIRED_KEYS if k not in config]
    if missing:
        raise ValueError(f"missing key(s) {missing}: the autoscaler reads a {FAKE_PROVIDER} file without "
                         "defaults, so write them out (empty where unused), as Ray's example.yaml does")
    if config["head_node_type"] != FAKE_HEAD_NODE_TYPE:
        raise ValueError(f"head_node_type={config['head_node_type']!r}: the {FAKE_PROVIDER} provider names its "
                         f"head {FAKE_HEAD_NODE_TYPE!r}")
    no_max = [name for name, t in config["available_node_types"].items() if "max_workers" not in t]
    if no_max:
        raise ValueError(f"node type(s) {no_max} lack max_workers (not filled in for {FAKE_PROVIDER})")
    if "CPU" not in config["available_node_types"][FAKE_HEAD_NODE_TYPE]["resources"]:
        raise ValueError(f"{FAKE_HEAD_NODE_TYPE}.resources needs CPU (the head is started with it)")


# --- the local autoscaling cluster ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LocalCluster:
    """A running local cluster. `address` is the GCS address for `ray.init(address=...)` / RAY_ADDRESS."""
    address: str  # 127.0.0.1:<port>
    dashboard_url: str  # http://127.0.0.1:<dashboard port>; job submission API too
    temp_dir: str  # Ray's --temp-dir: sessions, logs, sockets (Ray makes it writable by every user)
    token_path: str  # the cluster's auth token (RAY_AUTH_TOKEN_PATH)
    config_path: str  # the autoscaling config the head runs with (a copy of the user's, see start)

    def driver_env(self) -> dict[str, str]:
        """What a driver process (ray.init, the ray CLI, `raybench.grid --address auto`) needs to join.

        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps the driver on 127.0.0.1 too: without it Ray turns the
        address 127.0.0.1 into the machine's IP, where nothing of this cluster listens, and hangs.
        """
        return {"RAY_ADDRESS": self.address, "RAY_API_SERVER_ADDRESS": self.dashboard_url,
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path,
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def start_local_cluster(config_path: str | os.PathLike = DEFAULT_LOCAL_CONFIG, port: int = 6379,
                        temp_dir: str | os.PathLike | None = None, *, dashboard_port: int = 8265,
                        client_port: int = 10001, agent_port: int = 52365,
                        object_store_bytes: int = 300_000_000, timeout_s: float = 90.0) -> LocalCluster:
    """Start the fake autoscaling cluster: `ray start --head` with RAY_FAKE_CLUSTER=1 on 127.0.0.1.

    The head's CPUs/GPUs come from the config's head type. Fake workers dial the GCS at the provider's
    `gcs_address` (default: this machine's IP, port 6379), so the head runs a copy of the config with
    `gcs_address: 127.0.0.1:<port>`, written into temp_dir. Port arguments default to Ray's own; pass free ports
    to run beside another Ray. Raises RuntimeError (after cleaning up) when Ray does not start.
    """
    config = validate_cluster_config(config_path)
    if config["provider"]["type"] != FAKE_PROVIDER:
        raise ClusterConfigError(f"{config_path}: provider type {config['provider']['type']!r}; the local cluster "
                                 f"needs {FAKE_PROVIDER!r} (cluster.yaml is for `ray up`)")
    temp = Path(temp_dir or DEFAULT_TEMP_DIR).absolute()
    if len(str(temp)) > MAX_TEMP_DIR_CHARS:
        raise ValueError(f"temp_dir={str(temp)!r} is {len(str(temp))} characters; at most {MAX_TEMP_DIR_CHARS} "
                         "keep Ray's socket paths under the Unix limit (use something like /tmp/rbc-xyz)")
    if cluster_processes(temp):
        raise RuntimeError(f"a local cluster already runs with temp dir {temp}: "
                           f"`python -m raybench.cluster down-local --temp-dir {temp}` first")
    # A port in use does not always stop `ray start`: a head whose dashboard agent cannot bind starts anyway and
    # then refuses jobs ("No available agent to submit job").
    ports = (port, dashboard_port, client_port, agent_port)
    if len(set(ports)) < len(ports) or any(RAY_WORKER_PORTS[0] <= p <= RAY_WORKER_PORTS[1] for p in ports):
        raise ValueError(f"ports {list(ports)} (port, dashboard, client, agent): must differ and lie outside Ray's "
                         f"worker port range {RAY_WORKER_PORTS[0]}-{RAY_WORKER_PORTS[1]}")
    busy = [p for p in ports if not _port_free(p)]
    if busy:
        raise RuntimeError(f"port(s) {busy} on {LOOPBACK} are in use (another Ray?): pass free ones")
    if temp.is_symlink() or (temp.exists() and temp.stat().st_uid != os.getuid()):
        raise RuntimeError(f"temp dir {temp} exists and is not a folder of this user's: pick another --temp-dir")
    temp.mkdir(parents=True, exist_ok=True)

    # Ray makes its temp dir writable by every user, so the token and the config the autoscaler re-reads live
    # in a folder only this user can enter.
    private = make_private_dir(temp)
    token_path = private / "auth_token"
    token_path.write_text(secrets.token_hex(32))  # 256 bits, as `ray get-auth-token --generate` makes
    token_path.chmod(0o600)
    run_config = copy.deepcopy(config)
    run_config["provider"]["gcs_address"] = f"{LOOPBACK}:{port}"
    run_config_path = private / "autoscaling.yaml"
    run_config_path.write_text(yaml.safe_dump(run_config, sort_keys=False))

    cluster = LocalCluster(f"{LOOPBACK}:{port}", f"http://{LOOPBACK}:{dashboard_port}", str(temp),
                           str(token_path), str(run_config_path))
    head = config["available_node_types"][FAKE_HEAD_NODE_TYPE]["resources"]
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}",
           f"--num-cpus={head['CPU']}", f"--num-gpus={head.get('GPU', 0)}",
           f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dashboard_port}",
           f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
           f"--object-store-memory={object_store_bytes}", f"--temp-dir={temp}",
           f"--autoscaling-config={run_config_path}", "--disable-usage-stats"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
                # every service, fake workers included, on 127.0.0.1 (not the machine's address)
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", MARKER_ENV: str(temp), **NO_PRESTART})
    # `python` in a submitted job's entrypoint is this interpreter, the one with Ray and raybench installed.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    try:
        proc = subprocess.run(cmd, env=env, cwd=temp, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        stop_local_cluster(cluster)
        raise RuntimeError(f"`ray start --head` did not return within {timeout_s:.0f} s") from e
    if proc.returncode != 0:
        stop_local_cluster(cluster)
        raise RuntimeError(f"`ray start --head` failed (exit {proc.returncode}); logs under {temp}:\n"
                           + (proc.stdout + proc.stderr)[-3000:])
    (private / STATE_FILE).write_text(json.dumps(asdict(cluster), indent=1))
    return cluster


def private_dir(temp_dir: str | os.PathLike) -> Path:
    """Where a local cluster keeps its token, autoscaling config and state, keyed by its temp dir: a folder
    of this user's under RAYBENCH_CACHE (default ~/.cache/raybench)/clusters/. Created by `make_private_dir`."""
    key = str(Path(temp_dir).absolute()).strip("/").replace("/", "--")
    return Path(os.environ.get("RAYBENCH_CACHE", Path.home() / ".cache" / "raybench")) / "clusters" / key


def make_private_dir(temp_dir: str | os.PathLike) -> Path:
    """private_dir(temp_dir), created with mode 0700; refused when it exists and is not this user's."""
    path = private_dir(temp_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    if path.is_symlink() or path.stat().st_uid != os.getuid():
        raise RuntimeError(f"{path} is not a folder of this user's")
    path.chmod(0o700)
    return path


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def load_local_cluster(temp_dir: str | os.PathLike = DEFAULT_TEMP_DIR) -> LocalCluster:
    """The cluster that `start_local_cluster` / `up-local` started with this temp dir."""
    state = private_dir(temp_dir) / STATE_FILE
    if not state.exists():
        raise FileNotFoundError(f"no local cluster recorded in {state}: start one with "
                                "`python -m raybench.cluster up-local`")
    return LocalCluster(**json.loads(state.read_text()))


def cluster_processes(temp_dir: str | os.PathLike) -> list:
    """The live processes of the local cluster with this temp dir, as psutil.Process objects.

    Found by the marker variable every process inherits, read from the raw /proc/<pid>/environ: renamed
    processes (`ray::DashboardAgent`, `ray::IDLE`) write their title over the start of that block, and psutil's
    `environ()` then returns {} for them. Also found: a Ray command line naming the temp dir (a cluster started by
    hand with --temp-dir), and every descendant of a process found. This process and its parents never count.
    """
    import psutil

    temp = str(Path(temp_dir).absolute())
    marker = f"\0{MARKER_ENV}={temp}\0".encode()
    me = psutil.Process()
    exclude = {me.pid, *(p.pid for p in me.parents())}
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid", "cmdline"], ad_value=None):
        if p.pid in exclude:
            continue
        args = p.info["cmdline"] or []
        cmdline = " ".join(args)
        # whole arguments: /tmp/raybench-cluster must not match /tmp/raybench-cluster-2
        names_temp = any(a == f"--temp-dir={temp}" or a.startswith(f"{temp}/session_") or f"={temp}/session_" in a
                         for a in args)
        by_hand = names_temp and ("site-packages/ray/" in cmdline or "-m ray." in cmdline)
        if by_hand or _has_marker(p, marker):
            found[p.pid] = p
    for p in list(found.values()):
        with contextlib.suppress(psutil.Error):
            found.update({c.pid: c for c in p.children(recursive=True) if c.pid not in exclude})
    alive = []
    for p in found.values():
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    return sorted(alive, key=lambda p: p.pid)


def _has_marker(p, marker: bytes) -> bool:
    try:
        with open(f"/proc/{p.pid}/environ", "rb") as f:
            return marker in b"\0" + f.read() + b"\0"
    except FileNotFoundError:  # no /proc (not Linux): psutil's parse, which misses renamed processes
        import psutil
        with contextlib.suppress(psutil.Error):
            key, value = marker.strip(b"\0").decode().split("=", 1)
            return p.environ().get(key) == value
        return False
    except OSError:  # another user's process, or gone
        return False


def listening_sockets(temp_dir: str | os.PathLike) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every TCP socket the cluster's processes listen on."""
    import psutil

    pids = {p.pid: p for p in cluster_processes(temp_dir)}
    out = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            with contextlib.suppress(psutil.Error):
                out.append((c.pid, pids[c.pid].name(), c.laddr.ip, c.laddr.port))
    return sorted(out)


def _describe(p) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline())[:80]}"
    except Exception:  # psutil.Error: gone or not ours
        return str(p.pid)


def is_loopback(ip: str) -> bool:
    return ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") or ip.startswith("127.")


def stop_local_cluster(cluster: LocalCluster | str | os.PathLike, grace_s: float = 5.0,
                       timeout_s: float = 30.0) -> int:
    """Stop every process of the cluster: SIGTERM, then SIGKILL after grace_s; repeat while any remain.

    Idempotent. Returns how many processes were signalled; raises RuntimeError naming the survivors if some are
    still alive after timeout_s.
    """
    temp = cluster.temp_dir if isinstance(cluster, LocalCluster) else str(cluster)
    deadline = time.monotonic() + timeout_s
    signalled: set[int] = set()
    while procs := cluster_processes(temp):
        if time.monotonic() > deadline:
            names = ", ".join(_describe(p) for p in procs)
            raise RuntimeError(f"local cluster {temp}: processes still alive after {timeout_s:.0f} s: {names}")
        terminate(procs, grace_s)
        signalled |= {p.pid for p in procs}
    with contextlib.suppress(FileNotFoundError):
        (private_dir(temp) / STATE_FILE).unlink()
    return len(signalled)


@contextlib.contextmanager
def local_cluster(config_path: str | os.PathLike = DEFAULT_LOCAL_CONFIG, port: int = 6379,
                  temp_dir: str | os.PathLike | None = None, *, keep_temp_dir: bool = False,
                  **kwargs) -> Iterator[LocalCluster]:
    """`start_local_cluster` for a `with` block: stopped on exit, its temp dir removed unless keep_temp_dir."""
    cluster = start_local_cluster(config_path, port, temp_dir, **kwargs)
    try:
        yield cluster
    finally:
        stop_local_cluster(cluster)
        if not keep_temp_dir:
            shutil.rmtree(cluster.temp_dir, ignore_errors=True)
            shutil.rmtree(private_dir(cluster.temp_dir), ignore_errors=True)


# --- CLI -----------------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raybench.cluster", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check cluster files with Ray's own validation")
    v.add_argument("files", nargs="+", help="cluster YAML files (cluster.yaml, cluster-local.yaml)")

    def temp_dir_arg(s):
        s.add_argument("--temp-dir", default=DEFAULT_TEMP_DIR,
                       help=f"the cluster's Ray temp dir, at most {MAX_TEMP_DIR_CHARS} characters "
                            f"(default: {DEFAULT_TEMP_DIR})")

    up = sub.add_parser("up-local", help="start the local autoscaling cluster; prints `export` lines on stdout")
    up.add_argument("--config", default=DEFAULT_LOCAL_CONFIG, help=f"(default: {DEFAULT_LOCAL_CONFIG})")
    up.add_argument("--port", type=int, default=6379, help="GCS port (default: 6379)")
    up.add_argument("--dashboard-port", type=int, default=8265, help="(default: 8265, on 127.0.0.1)")
    up.add_argument("--client-port", type=int, default=10001, help="Ray client server port (default: 10001)")
    up.add_argument("--agent-port", type=int, default=52365, help="head's dashboard agent port (default: 52365)")
    temp_dir_arg(up)
    temp_dir_arg(sub.add_parser("env-local", help="print the `export` lines that join the local cluster"))
    temp_dir_arg(sub.add_parser("down-local", help="stop the local cluster, leaving none of its processes"))
    return p


def _exports(cluster: LocalCluster) -> str:
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in cluster.driver_env().items())


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return _run(args)
    except (ClusterConfigError, RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:  # Ray's autoscaler code does the validating and starting
        print(f"error: {e.name or e}: not installed here; `pip install 'ray[default]'` (scripts/setup.sh does)",
              file=sys.stderr)
        return 1


def _run(args) -> int:
    if args.command == "validate":
        failed = 0
        for f in args.files:
            try:
                cfg = validate_cluster_config(f)
            except ClusterConfigError as e:
                print(f"FAIL {e}", file=sys.stderr)
                failed += 1
            else:
                types = ", ".join(f"{n} (min {t.get('min_workers', 0)}, max {t.get('max_workers')})"
                                  for n, t in cfg["available_node_types"].items())
                print(f"ok   {f}: provider {cfg['provider']['type']}, node types: {types}")
        return 1 if failed else 0
    if args.command == "up-local":
        t0 = time.monotonic()
        cluster = start_local_cluster(args.config, args.port, args.temp_dir, dashboard_port=args.dashboard_port,
                                      client_port=args.client_port, agent_port=args.agent_port)
        print(f"local cluster up in {time.monotonic() - t0:.1f} s: {cluster.address}, dashboard "
              f"{cluster.dashboard_url}; join it with the exports below (`eval \"$(...)\"`), stop it with "
              f"`python -m raybench.cluster down-local --temp-dir {cluster.temp_dir}`", file=sys.stderr)
        print(_exports(cluster))
        return 0
    if args.command == "env-local":
        print(_exports(load_local_cluster(args.temp_dir)))
        return 0
    if args.command == "down-local":
        n = stop_local_cluster(args.temp_dir)
        print(f"local cluster {args.temp_dir}: stopped {n} process(es); none left", file=sys.stderr)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
