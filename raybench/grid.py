"""`python -m raybench.grid`: an experiment's trials as one Ray Tune run sharing GPUs, resumable, with
results written to Parquet as they arrive and the analysis run at the end.

    python -m raybench.grid                          # the smoke experiment, on what this machine has
    python -m raybench.grid --experiment seed --gpus 4 --data-dir data
    python -m raybench.grid --experiment full --address auto --storage-path s3://bucket/raybench
    python -m raybench.grid --experiment seed --name seed-run1 --resume
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time

from raybench import estimate
from raybench.configs import PRECISIONS
from raybench.experiments import ExperimentError, builtin_experiments
from raybench.plan import MLFLOW_IN_RUN_FOLDER, RunPlan, make_plan
from raybench.sizing import DEFAULT_GPU_MEMORY_GB
from raybench.stop import STOP


SCHEDULERS = ("fifo", "asha")
MLFLOW_INSTALL = "pip install 'raybench[mlflow]'"

# --- CLI --------------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raybench.grid", description=(
        "Run an experiment's trials as one Ray Tune run. Results: <results-dir>/<run>/epochs.parquet and "
        "trials.parquet, then the analysis (tables, plots, report.md)."))
    p.add_argument("--experiment", default="smoke",
                   help=f"built-in name ({', '.join(builtin_experiments())}) or a YAML file (default: smoke)")
    p.add_argument("--gpus", type=float, default=None,
                   help="GPUs to use: without --address, start a local Ray with this many (logical on a machine "
                        "without CUDA: a scheduling dry run, training on CPU; default: the CUDA devices here); "
                        "with --address, a cap on the GPUs the grid uses (default: no cap, trials ask for GPU "
                        "fractions); 0 runs everything on CPU")
    p.add_argument("--address", help="join a running Ray cluster: 'auto' or HOST:PORT (default: start a local Ray)")
    p.add_argument("--cpus", type=int, help="CPUs for a local Ray (default: all of this machine's)")
    p.add_argument("--gpu-memory-gb", type=float,
                   help="GPU memory the resource rule packs trials into (default: the first CUDA device's, "
                        f"else {DEFAULT_GPU_MEMORY_GB:g})")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial, also its torch threads (default: 1)")
    p.add_argument("--epochs", type=int, help="override every trial's epochs (default: the experiment's)")
    p.add_argument("--dataset", choices=["synthetic", "cifar100", "imagefolder"],
                   help="override the experiment's dataset (default: the experiment's)")
    p.add_argument("--data-dir", help="CIFAR-100 copy / download folder, or an image folder root")
    p.add_argument("--train-size", type=int, help="synthetic training images (default: the experiment's)")
    p.add_argument("--test-size", type=int, help="synthetic test images (default: the experiment's)")
    p.add_argument("--seeds", help="repeat every trial with these seeds: N (0..N-1) or a list '0,3,7' "
                                   "(default: the experiment's)")
    p.add_argument("--only", help="run the trials whose names match this pattern (glob, or a substring)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every trial's model; compile time is recorded apart from epoch time "
                        "(default: off)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="every trial's precision: auto is bf16 autocast where the device computes bf16 natively "
                        "(a CUDA GPU with bf16, a CPU with AVX-512-BF16 or AMX), else fp32 (default: the "
                        "experiment's, else auto)")
    p.add_argument("--results-dir", default="results", help="where run folders go (default: results)")
    p.add_argument("--name", help="run name, the folder under --results-dir (default: <experiment>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run --name (default: the newest run of this experiment) where it stopped, "
                        "with the local Ray it was started with (--gpus, --cpus, ... given again win)")
    p.add_argument("--storage-path", help="Ray Tune storage for checkpoints: a folder or a URI such as "
                                          "s3://bucket/prefix, which a multi-node cluster needs "
                                          "(default: <results-dir>/<run>/ray)")
    p.add_argument("--max-failures", type=int,
                   help="retries of a failed trial from its last checkpoint (default: 2)")
    p.add_argument("--dashboard-host",
                   help="address the local Ray dashboard binds to (default: 127.0.0.1; 0.0.0.0 exposes it, "
                        "and with it job submission, to your network)")
    p.add_argument("--no-dashboard", action="store_const", const=True,
                   help="start the local Ray without its dashboard (default: with it, on 127.0.0.1)")
    p.add_argument("--pending-timeout", type=float, metavar="MINUTES",
                   help="stop the run when trials have waited this long for resources, keeping the finished "
                        "epochs (default: 10 without an autoscaler, off on an autoscaling cluster)")
    p.add_argument("--scheduler", choices=SCHEDULERS,
                   help="Tune's trial scheduler: fifo runs every trial to its last epoch; asha (ASHAScheduler on "
                        "test_acc) stops trials that fall behind, status stopped-early (default: fifo: the "
                        "study's tables need every trial finished)")
    p.add_argument("--asha-grace-epochs", type=int, metavar="N",
                   help="with --scheduler asha: epochs every trial gets before it can be stopped (default: 3)")
    p.add_argument("--grow-min-epoch-s", type=float, metavar="SECONDS",
                   help="on the local Ray, a CPU trial takes the CPUs that finished trials free (restarted from "
                        "its checkpoint with one torch thread per CPU) only when its epochs last at least this "
                        "long; 0: after any epoch; a value above any epoch's time keeps every trial on the CPUs "
                        "it started with, for per-epoch times at a fixed thread count (default: 20)")
    p.add_argument("--mlflow", nargs="?", const=MLFLOW_IN_RUN_FOLDER, metavar="URI",
                   help="also log every trial as an MLflow run (params: its config; metrics: each epoch) to this "
                        "tracking URI (default URI: sqlite:///<run folder>/mlflow.db); needs "
                        f"{MLFLOW_INSTALL} (default: off)")
    p.add_argument("--no-analysis", action="store_true", help="skip the analysis at the end")
    p.add_argument("--dry-run", action="store_true",
                   help="print the trials, their resources and the estimate (time per epoch and trial, device-hours, "
                        "wall time, cost), start nothing")
    p.add_argument("--recalibrate", action="store_true",
                   help="time every model again instead of reading the calibration cache (RAYBENCH_CALIBRATION, "
                        "default ~/.cache/raybench/calibration.json)")
    p.add_argument("--gpu-hour-price", type=estimate.price, metavar="P",
                   help="price of one GPU-hour: the estimate and the summary give the study's cost (default: none)")
    p.add_argument("--cpu-hour-price", type=estimate.price, metavar="P",
                   help="price of one CPU-hour (one Ray CPU held for an hour), as --gpu-hour-price (default: none)")
    return p


def validate_args(args) -> None:
    # (flag, value, lower bound, whether the bound itself is accepted)
    checks = [("--gpus", args.gpus, 0, True), ("--cpus", args.cpus, 1, True),
              ("--pending-timeout", args.pending_timeout, 0, False),
              ("--cpus-per-trial", args.cpus_per_trial, 0, False),
              ("--gpu-memory-gb", args.gpu_memory_gb, 0, False), ("--epochs", args.epochs, 1, True),
              ("--max-failures", args.max_failures, 0, True), ("--asha-grace-epochs", args.asha_grace_epochs, 1, True),
              ("--train-size", args.train_size, 1, True), ("--test-size", args.test_size, 1, True),
              ("--grow-min-epoch-s", args.grow_min_epoch_s, 0, True)]
    for flag, value, low, inclusive in checks:
        if value is not None and not math.isfinite(value):  # float flags: "inf" and "nan" parse
            raise ExperimentError(f"{flag}={value:g}: must be a finite number")
        if value is not None and not (value >= low if inclusive else value > low):
            raise ExperimentError(f"{flag}={value:g}: must be {'>=' if inclusive else '>'} {low}")
    if args.gpus is not None and args.gpus != int(args.gpus):
        if not (args.address or os.environ.get("RAY_ADDRESS")):
            raise ExperimentError(f"--gpus={args.gpus:g}: a local Ray gets whole GPUs (trials share them by their "
                                  "fractions); a fraction only caps a cluster's GPUs, with --address")
        if args.gpus > 1:
            raise ExperimentError(f"--gpus={args.gpus:g}: a fraction must be <= 1, else a whole number")
    if args.resume and args.storage_path and "://" in args.storage_path and not args.name:
        raise ExperimentError("--resume with a remote --storage-path needs --name")


DEFAULT_PENDING_TIMEOUT_S = 600.0  # without an autoscaler nothing new will come: 10 minutes is plenty


def _pending_timeout_callback():
    from ray import tune

    class PendingTimeout(tune.Callback):
        """Stops the run once trials have waited `timeout_s` for resources with no trial running. It stops
        the way Ctrl+C does (Tune saves its state and ends fit()): Tune's own stop_all would mark the waiting
        trials terminated, and --resume would then never run them."""

        def __init__(self, timeout_s: float, plan: RunPlan):
            self.timeout_s, self.since, self.fired = timeout_s, None, False
            self.resume_command = plan.resume_command()

        def on_step_end(self, iteration, trials, **info):
            pending = [t for t in trials if t.status == "PENDING"]
            if self.fired or not pending or any(t.status == "RUNNING" for t in trials):
                self.since = None
                return
            self.since = self.since or time.monotonic()
            if time.monotonic() - self.since >= self.timeout_s:
                self.fired = True
                print(f"[grid] {len(pending)} trial(s) waited {self.timeout_s / 60:g} min for resources with none "
                      f"running ({', '.join(t.trial_id for t in pending[:5])}...); stopping the run. Finished "
                      f"epochs are kept; continue with: {self.resume_command}", flush=True)
                os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own stop; not a stop signal from outside

    return PendingTimeout


def preflight(experiment) -> list[str]:
    """What would make trials fail at start (data or pretrained weights that cannot be had), found now."""
    from raybench.data import DatasetUnavailable, check_available
    from raybench.models import WeightsUnavailable, check_weights
    problems = []
    for data in dict.fromkeys(t.data for t in experiment.trials):
        try:
            check_available(data)
        except DatasetUnavailable as e:
            problems.append(str(e))
    for model in dict.fromkeys(t.model for t in experiment.trials):
        try:
            check_weights(model)
        except WeightsUnavailable as e:
            problems.append(f"{model.name}: {e}")
    return problems


def tune_problems(plan: RunPlan) -> list[str]:
    """What the scheduler and MLflow settings need, checked before Ray starts."""
    problems = []
    if plan.settings["mlflow"]:
        try:
            import mlflow  # noqa: F401
        except ImportError as e:
            problems.append(f"--mlflow: MLflow cannot be imported in this Python ({sys.executable}: {e}); install "
                            f"it with {MLFLOW_INSTALL}")
    if plan.settings["scheduler"] == "asha":
        grace, longest = plan.settings["asha_grace_epochs"], max(t.recipe.epochs for t in plan.experiment.trials)
        if grace >= longest:
            problems.append(f"--asha-grace-epochs={grace}: must be below the longest trial's epochs ({longest}), "
                            "else ASHA never stops a trial; lower it, or leave --scheduler at fifo")
    return problems


def show(plan: RunPlan) -> None:
    exp = plan.experiment
    print(f"[grid] experiment {exp.name} ({exp.path}): {len(exp.trials)} trials, {exp.trials[0].data.name} data")
    for t in exp.trials:
        r, mem = plan.resources[t.name], plan.memory_bytes[t.name]
        print(f"[grid]   {t.name:<40} cpu {r['cpu']:g}  gpu {r['gpu']:g}  epochs {t.recipe.epochs}"
              + (f"  est. memory {mem / 1e9:.2f} GB" if r["gpu"] > 0 else ""))
    gpus = sum(r["gpu"] for r in plan.resources.values())
    if gpus:
        print(f"[grid]   GPUs asked for by all trials together: {gpus:g}")
    for note in plan.notes:
        print(f"[grid] note: {note}", flush=True)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    t_start = time.time()
    from raybench.models.hub import WeightsUnavailable
    problems = []

    def check_first(experiment, address):  # before sizing the trials, which takes far longer than this
        problems.extend(preflight(experiment))
        if problems and not address and not args.dry_run:
            raise ExperimentError("\n".join(problems))
    try:
        validate_args(args)
        plan = make_plan(args, check=check_first)
    except (ExperimentError, FileNotFoundError, WeightsUnavailable) as e:  # a Swin checkpoint's config unreadable
        print(f"error: {e}", file=sys.stderr)
        return 2
    show(plan)
    driver_problems = tune_problems(plan)  # the driver runs the scheduler and the MLflow logger: no cluster helps
    if driver_problems:
        print("error: " + "\n".join(driver_problems), file=sys.stderr)
        return 2
    for p in problems:  # on a cluster the workers may have what this machine lacks
        print(f"[grid] warning: {p}", flush=True)
    est = _estimate(plan, args)
    if args.dry_run:
        return 0
    if plan.local and plan.local.dashboard and plan.local.dashboard_host not in ("127.0.0.1", "localhost", "::1"):
        print(f"[grid] warning: --dashboard-host {plan.local.dashboard_host}: the Ray dashboard and its job "
              "submission API (which runs arbitrary code) are reachable from other machines", flush=True)
    return run(plan, analysis=not args.no_analysis, t_start=t_start, est=est)


def _estimate(plan: RunPlan, args) -> "estimate.StudyEstimate | None":
    """The run's estimate, printed: calibrated on this machine for a local Ray, from FLOPs on a cluster; a
    resumed run's covers what is left. None (with a warning) where it cannot be made: the run goes on."""
    from raybench.sizing import max_concurrent
    nodes = [estimate.Node(plan.local.cpus or os.cpu_count(), plan.local.gpus)] if plan.local else None
    # ASHA judges a trial against those that reached its rung before it: the experiment's order is part of the
    # experiment, so it is kept; FIFO starts the longest trials first
    fifo = plan.settings["scheduler"] == "fifo"
    try:
        est = estimate.for_run(plan.experiment.trials, plan.resources, nodes, cluster=plan.address is not None,
                               max_concurrent=max_concurrent(plan.resources, plan.gpu_cap),
                               run_dir=plan.run_dir if plan.resume else None, recalibrate=args.recalibrate,
                               gpu_hour_price=args.gpu_hour_price, cpu_hour_price=args.cpu_hour_price,
                               longest_first=fifo, log=lambda m: print(m, flush=True))
    except (ValueError, OSError) as e:
        print(f"[grid] warning: no estimate ({e})", flush=True)
        return None
    if not fifo:
        est = dataclasses.replace(est, notes=(*est.notes, "ASHA may stop trials early: the estimate assumes every "
                                              "trial runs all its epochs, in the experiment's order"))
    print("\n".join(est.lines()), flush=True)
    return est


def run(plan: RunPlan, analysis: bool = True, t_start: float | None = None, est=None) -> int:
    """Run the plan: one driver per run folder; a run folder this call made and that never started is removed
    again, so the same --name works next time."""
    from filelock import FileLock, Timeout
    fresh = not plan.run_dir.exists()
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    try:  # two drivers on one run folder would overwrite each other's Parquet rows
        lock = FileLock(str(plan.run_dir / ".grid.lock"), timeout=0)
        lock.acquire()
    except Timeout:
        print(f"error: another `python -m raybench.grid` is running on {plan.run_dir}", file=sys.stderr)
        return 2
    try:
        return _run_locked(plan, fresh, analysis, t_start or time.time(), est)
    except KeyboardInterrupt:  # a stop signal outside Tune's loop, or a second one
        return STOP.report(plan)
    finally:
        lock.release()


def _run_locked(plan: RunPlan, fresh: bool, analysis: bool, t_start: float, est=None) -> int:
    from raybench.session import ClusterUnavailable, check_placement, connect  # imports Ray when it starts it
    from raybench import recover
    notes, redo = [], set()
    if plan.resume:  # a damaged results file is found now, not after an epoch was trained and lost
        try:
            notes, redo = recover.check_results(plan.run_dir, recover.local_dir(plan.tune_path))
        except OSError as e:
            return _disk_full(plan, e) if recover.disk_full_path(e) is not None else _fail(e)
        for note in notes:
            print(f"[grid] recovered: {note}", flush=True)
        if not notes and recover.all_ended(plan.run_dir, [t.name for t in plan.experiment.trials]):
            print("[grid] every trial of the run has ended: nothing to train, so Ray is not started", flush=True)
            return _report(plan, _results_writer(plan), analysis, t_start)
    marks = {"start": time.time()}  # where a run's seconds go, printed at the end (and read by raybench.bench)
    try:
        ctx = connect(plan)  # keeps the stop signals' handlers, which ray.init replaces
        marks["ray_up"] = time.time()
        autoscaling = False
        if plan.address:
            autoscaling, note = check_placement(plan.resources)
            if note:
                print(f"[grid] note: {note}", flush=True)
    except (ClusterUnavailable, ExperimentError, KeyboardInterrupt) as e:
        import ray
        ray.shutdown()
        if isinstance(e, KeyboardInterrupt):
            raise
        if fresh:
            shutil.rmtree(plan.run_dir, ignore_errors=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    timeout = plan.pending_timeout_s
    if timeout is None and not autoscaling and "pending_timeout" not in plan.given:
        timeout = DEFAULT_PENDING_TIMEOUT_S
    # Tune resolves paths against the working folder when the run ends. A job's driver works in the job's
    # unpacked working dir, and on the local fake cluster every node unpacks the job's package at that same
    # path, replacing the folder under the driver (seen: os.getcwd() raising FileNotFoundError inside
    # tuner.fit). Every path in the plan is absolute, so the driver works from the run folder meanwhile.
    cwd = os.getcwd()
    os.chdir(plan.run_dir)
    try:
        if plan.address and est is not None:  # the workers' devices, timed by Ray tasks on them (after the
            # chdir above: a worker unpacking a job's package may replace the folder the driver started in)
            t0 = time.time()
            est = estimate.on_cluster(est, plan.experiment.trials, plan.resources,
                                      None if autoscaling else estimate.ray_nodes(),
                                      log=lambda m: print(m, flush=True))
            print("\n".join(est.lines()), flush=True)
            marks["cluster_calibration"] = time.time() - t0  # not the trials' time: the prediction leaves it out
        writer = _fit(plan, ctx, timeout, est, recount=bool(notes), redo=redo)
        marks["fit_done"] = time.time()
    except Exception as e:  # a full disk anywhere Tune or raybench writes ends fit() with it inside a TuneError
        if recover.disk_full_path(e) is None:
            raise
        return _disk_full(plan, e)
    finally:
        import ray
        ray.shutdown()
        marks["ray_down"] = time.time()
        if os.path.isdir(cwd):  # by its path: the same folder, or the one unpacked in its place
            os.chdir(cwd)
    return _report(plan, writer, analysis, t_start, marks)


def _fail(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _disk_full(plan: RunPlan, e: BaseException) -> int:
    """One line for a full disk: where, how much room the run needs, and the command that continues it."""
    import pandas as pd
    from raybench import recover
    from raybench.records import ERROR, UNFINISHED
    try:
        t = pd.read_parquet(plan.run_dir / "trials.parquet")
        unfinished = int(t.status.isin((*UNFINISHED, ERROR)).sum())
    except Exception:  # unreadable now: --resume rebuilds it
        unfinished = len(plan.experiment.trials)
    print("error: " + recover.disk_full_message(recover.disk_full_path(e) or "", plan.run_dir,
                                                recover.local_dir(plan.tune_path), unfinished,
                                                plan.resume_command()), file=sys.stderr)
    return 2


def _fit(plan: RunPlan, ctx, pending_timeout_s: float | None, est=None, recount: bool = False,
         redo: set = frozenset()):
    from ray import tune
    from raybench import recover
    from raybench.plan import write_run_record
    from raybench.sizing import max_concurrent
    from raybench.results import RUN_DIR_ENV, watch_ray_logs_for_a_full_disk
    from raybench.trainable import StudyTrial
    if not plan.resume:
        write_run_record(plan)
    if est is not None:  # the epoch lines' ETAs start from it (raybench.results)
        estimate.write(est, plan.run_dir)
    writer = _results_writer(plan, est, recount)
    watch_ray_logs_for_a_full_disk()
    os.environ[RUN_DIR_ENV] = str(plan.run_dir)  # for the restored writer of a resumed run (see raybench.results)
    dash = getattr(ctx, "dashboard_url", None)
    if dash:
        print(f"[grid] Ray dashboard: http://{dash}", flush=True)
    PendingTimeout = _pending_timeout_callback()
    callbacks = [writer] + ([PendingTimeout(pending_timeout_s, plan)] if pending_timeout_s else [])
    if plan.mlflow_uri:
        from raybench.results import mlflow_callback
        callbacks.append(mlflow_callback(plan.mlflow_uri, plan.run_dir.name))
        print(f"[grid] MLflow: {plan.mlflow_uri} (experiment {plan.run_dir.name}); browse it with: "
              f"mlflow ui --backend-store-uri {plan.mlflow_uri}", flush=True)
    trainable = tune.with_resources(StudyTrial, lambda config: config["trial"]["resources"])
    tune_dir = recover.local_dir(plan.tune_path)
    problem = recover.tune_state_problem(tune_dir) if plan.resume else None
    if problem or redo:  # redo: Tune would not run a trial it holds finished again
        aside = recover.set_aside_tune_state(tune_dir, "damaged" if problem else "set-aside")
        why = (f"Tune's state of the run cannot be read ({problem})" if problem else
               f"{', '.join(sorted(redo))} must redo lost epochs, which Tune's state would not allow")
        print(f"[grid] recovered: {why}; set aside {', '.join(p.name for p in aside)}; the run goes on from "
              "raybench's own records", flush=True)
        problem = problem or why
    entries = plan.param_entries()
    if plan.resume and not problem and tune.Tuner.can_restore(plan.tune_path):
        print(f"[grid] resuming {plan.tune_path}", flush=True)
        # Tune restores the callbacks it pickled at the start: the run keeps its pending timeout
        tuner = tune.Tuner.restore(plan.tune_path, trainable=trainable, resume_errored=True)
    else:
        if plan.resume:  # no Tune state (stopped before its first snapshot, or unreadable): from our own records
            entries = recover.resume_entries(plan.run_dir, tune_dir, entries, redo)
            if not problem:
                print(f"[grid] no Tune state to restore at {plan.tune_path}; the run goes on from raybench's "
                      "own records", flush=True)
            if not entries:
                return writer
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(estimate.start_order(entries, est))},
            tune_config=tune.TuneConfig(
                trial_name_creator=lambda t: t.config["trial"]["name"],
                trial_dirname_creator=lambda t: t.config["trial"]["name"],
                max_concurrent_trials=max_concurrent(plan.resources, plan.gpu_cap),
                scheduler=make_scheduler(plan),
                reuse_actors=reuse_actors(dash)),
            run_config=tune.RunConfig(
                name=plan.tune_name, storage_path=plan.storage, callbacks=callbacks, verbose=0,
                failure_config=tune.FailureConfig(max_failures=plan.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_frequency=1,
                                                        checkpoint_at_end=True)))
    with STOP.tune_loop():
        tuner.fit()
    return writer


def _results_writer(plan: RunPlan, est=None, recount: bool = False):
    """The run's ResultsWriter, its trials' rows carrying the estimate's predicted times where there is one."""
    from raybench.results import ResultsWriter, trial_rows
    rows = trial_rows(plan.experiment.trials, plan.resources, plan.git_commit)
    if est is not None:
        rows = [{**r, "predicted_time_s": est.predicted_time_s().get(r["trial"], r["predicted_time_s"])} for r in rows]
    return ResultsWriter(plan.run_dir, rows, recount=recount)


def reuse_actors(dashboard_url: str | None) -> bool:
    """Whether a finished trial's actor process takes the next trial with the same resources
    (StudyTrial.reset_config): no new process, no second import of torch and transformers. Only where no
    dashboard shows the trials (a local Ray with --no-dashboard, or a cluster whose head runs none, as a SLURM job
    written with --no-dashboard): Ray 2.60 names an actor once, when it starts (its repr_name, which also names
    its tasks), so a dashboard would list every trial a reused actor ran under the first one's name; its log
    lines do carry the current trial (StudyTrial._announce)."""
    return not dashboard_url


def make_scheduler(plan: RunPlan):
    """The run's scheduler (FIFO: every trial to its last epoch; or ASHA, --scheduler asha), wrapped so that a
    trial out of GPU memory is re-queued with a larger share."""
    from raybench.trainable import AshaOomRequeue, FifoOomRequeue
    if plan.settings["scheduler"] == "asha":
        # One iteration is one epoch (StudyTrial.step); rungs at grace, grace*4, ... below the longest trial.
        sched = AshaOomRequeue(time_attr="training_iteration", metric="test_acc", mode="max",
                               max_t=max(t.recipe.epochs for t in plan.experiment.trials),
                               grace_period=plan.settings["asha_grace_epochs"])
    else:
        sched = FifoOomRequeue()
    if plan.local is not None:  # one node: a CPU trial takes the CPUs finished trials free (raybench.rescale)
        from raybench.rescale import CpuGrowth
        return CpuGrowth(sched, plan.settings["grow_min_epoch_s"])
    return sched


PHASES_FILE = "phases.json"  # where the run's wall time went, in the run folder (raybench.bench reads it)


def _report(plan: RunPlan, writer, analysis: bool, t_start: float, marks: dict | None = None) -> int:
    print(writer.summary(), flush=True)
    unfinished = writer.unfinished()
    if unfinished and STOP.signum:  # the analysis waits for the run to finish (it would cost a stopping job time)
        return STOP.report(plan)
    if unfinished:  # the pending timeout ends fit() the way a stop signal does, with Tune's state saved
        print(f"[grid] stopped with {len(unfinished)} trial(s) unfinished ({', '.join(unfinished)}); continue with: "
              f"{plan.resume_command()}", flush=True)
    if analysis:
        try:
            from raybench.analysis import analyse
            report = analyse(plan.run_dir)
            print(f"[grid] report: {report}")
        except Exception as e:  # the results are on disk either way; say why the report is missing
            print(f"[grid] analysis failed ({type(e).__name__}: {e}); rerun: python -m raybench.analysis "
                  f"{plan.run_dir}", file=sys.stderr)
    if marks:
        m = {**marks, "end": time.time()}
        phases = {"before_ray": m["start"] - t_start, "ray_start": m["ray_up"] - m["start"],
                  "tune_run": m["fit_done"] - m["ray_up"], "ray_shutdown": m["ray_down"] - m["fit_done"],
                  "report_and_analysis": m["end"] - m["ray_down"]}
        phases = {**{k: round(v, 2) for k, v in phases.items()}, "tune_run_started_at": m["ray_up"],
                  "tune_run_ended_at": m["fit_done"]}
        (plan.run_dir / PHASES_FILE).write_text(json.dumps(phases))
        print("[grid] phases (s): " + json.dumps(phases), flush=True)
        line = estimate.record_actual(plan.run_dir, phases["tune_run"] - m.get("cluster_calibration", 0.0))
        if line:
            print(line, flush=True)
    print(f"[grid] {time.time() - t_start:.0f} s in all; results: {plan.run_dir}")
    return 0 if writer.all_ok() else 1


def cli(argv=None) -> int:
    """`python -m raybench.grid`: main() with SIGTERM, SIGHUP and SIGINT taken before Ray starts (see Stop)."""
    with STOP.handlers():
        try:
            return main(argv)
        except KeyboardInterrupt:  # before the run folder: nothing to keep
            print(f"[grid] stopped by {STOP.signal_name()} before the run started", file=sys.stderr, flush=True)
            return STOP.exit_status()


if __name__ == "__main__":
    sys.exit(cli())
