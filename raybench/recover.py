"""What `--resume` repairs before it goes on: damaged Parquet files, unreadable Tune state, a full disk.

A run's records are, in the order trusted: epochs.parquet and trials.parquet (raybench's own, written as results
arrive), experiment.json (the plan), the trials' checkpoints, and Tune's files in its storage (experiment_state-*.json
and tuner.pkl: the run's state; <trial>/result.json: every record Tune received). A file that cannot be read is set
aside (renamed with a `.damaged-<time>` suffix, never deleted) and rebuilt from what survives, and the run says what
it recovered and what it will redo. Only local storage is searched for checkpoints and result files: a remote
--storage-path keeps Tune's state in the object store, where a cut file is not expected.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from datetime import datetime
from pathlib import Path

import pandas as pd

from raybench.records import EPOCH_COLUMNS, ERROR, FAILED, OK, STOPPED_EARLY, write_parquet

RESULT_FILES = ("epochs.parquet", "trials.parquet")
STATE_FILE = "state.pt"  # a checkpoint's one file (raybench.trainable.StudyTrial.save_checkpoint)
# A trial that ended this way is not trained again when a run restarts from raybench's own records.
ENDED = (OK, STOPPED_EARLY, *[s for s in FAILED if s != ERROR])


class DiskFull(OSError):
    """A write the disk had no room for; `filename` says where (pyarrow's own error does not)."""

    def __init__(self, path):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def set_aside(path: Path, label: str = "damaged") -> Path:
    """Rename a file out of the way (never delete it: a damaged one may be the only copy someone can still mend)."""
    target = path.with_name(f"{path.name}.{label}-{datetime.now():%Y%m%d-%H%M%S}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{label}-{datetime.now():%Y%m%d-%H%M%S}-{n}")
    path.rename(target)
    return target


def unreadable(path: Path) -> str | None:
    """Why a Parquet file cannot be read, or None when it reads (or is not there yet)."""
    if not path.exists():
        return None
    try:
        pd.read_parquet(path)
    except Exception as e:  # pyarrow's ArrowInvalid, OSError, ... : any of them leaves the file useless
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def local_dir(path: str) -> Path | None:
    return None if "://" in path else Path(path)


# --- Tune's own files ------------------------------------------------------------------------------------------

def tune_records(tune_dir: Path | None) -> pd.DataFrame:
    """Epoch rows from every trial's result.json (one JSON record a line, as Tune received them); a line cut
    short by a full disk is skipped. A retried epoch keeps its last record. The files in the run folder are
    Tune's copies of its driver's staging folder, rewritten whole from time to time: a driver killed during a
    copy leaves that one cut or empty, and the trial's epochs it no longer shows are trained again."""
    rows = []
    # result.json.<time>: a trial's records from before a restart from raybench's records (resume_entries),
    # read before the current result.json so that its records win
    files = sorted(tune_dir.glob("*/result.json*"), key=lambda p: (p.parent.name, p.name == "result.json", p.name)
                   ) if tune_dir and tune_dir.is_dir() else []
    for path in files:
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "train_loss" in rec and "epoch" in rec:
                name = rec.get("config", {}).get("trial", {}).get("name", path.parent.name)
                rows.append({**{k: rec.get(k) for k in EPOCH_COLUMNS}, "trial": name})
    if not rows:
        return pd.DataFrame(columns=list(EPOCH_COLUMNS))
    ep = pd.DataFrame(rows).astype({"epoch": int})
    return ep.drop_duplicates(["trial", "epoch"], keep="last").sort_values(["trial", "epoch"], ignore_index=True)


def tune_state_problem(tune_dir: Path | None) -> str | None:
    """Why Tune could not restore the run from its state files, or None. Tune itself logs a JSONDecodeError and
    silently starts a new, empty experiment (Ray 2.60), so the files are read here first."""
    if tune_dir is None or not tune_dir.is_dir():
        return None
    states = sorted(tune_dir.glob("experiment_state-*.json"))
    if not states:
        return None
    try:
        json.loads(states[-1].read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{states[-1]}: {type(e).__name__}: {e}"
    pkl = tune_dir / "tuner.pkl"
    try:
        import ray.cloudpickle as pickle
        pickle.loads(pkl.read_bytes())
    except Exception as e:  # cut short, missing: Tune.restore would raise on it
        return f"{pkl}: {type(e).__name__}: {e}"
    return None


def set_aside_tune_state(tune_dir: Path | None, label: str = "damaged") -> list[Path]:
    """Move Tune's run state out of Tune's sight, so that a new Tuner can start in the same folder."""
    if tune_dir is None:
        return []
    return [set_aside(p, label) for p in [*sorted(tune_dir.glob("experiment_state-*.json")), tune_dir / "tuner.pkl"]
            if p.exists()]


# --- checkpoints ------------------------------------------------------------------------------------------------

def newest_checkpoint_epoch(trial_dir: Path) -> int:
    """The epoch of the newest checkpoint of a trial that loads (0: none does). Read memory-mapped: a few KB of a
    large file are touched."""
    import torch
    best = 0
    for ckpt in trial_dir.glob("checkpoint_*") if trial_dir.is_dir() else []:
        try:
            best = max(best, int(torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True,
                                            mmap=True)["epoch"]))
        except Exception:  # missing, cut short, not ours: not a checkpoint to resume from
            continue
    return best


# --- the Parquet files -----------------------------------------------------------------------------------------

def check_results(run_dir: Path, tune_dir: Path | None) -> tuple[list[str], set[str]]:
    """Before Ray starts on --resume: every Parquet file of the run reads, or is set aside and rebuilt from what
    survives (epochs.parquet from Tune's result files; trials.parquet, by raybench.results.ResultsWriter, from
    experiment.json's trials and the epoch rows). Returns what to tell the user: what was recovered, and what each
    unfinished trial will redo; and the trials whose lost epochs are redone from epoch 1."""
    epochs_path, trials_path = run_dir / "epochs.parquet", run_dir / "trials.parquet"
    bad_epochs, bad_trials = unreadable(epochs_path), unreadable(trials_path)
    if not (bad_epochs or bad_trials):
        return [], set()
    notes, redo = [], set()
    if bad_epochs:
        aside = set_aside(epochs_path)
        ep = tune_records(tune_dir)
        if len(ep):
            write_atomic(ep, epochs_path)
        notes.append(f"{epochs_path.name} could not be read ({bad_epochs}); set aside as {aside.name}; recovered "
                     f"{len(ep)} epoch row(s) of {ep.trial.nunique()} trial(s) from Tune's result files"
                     + ("" if tune_dir else " (none: a remote --storage-path is not searched)"))
    else:
        ep = pd.read_parquet(epochs_path)
    if bad_trials:
        aside = set_aside(trials_path)
        notes.append(f"{trials_path.name} could not be read ({bad_trials}); set aside as {aside.name}; rebuilt "
                     "from experiment.json and the epoch rows (a trial's status from its last epoch: an error or "
                     "an ASHA stop is not in them, so such a trial runs again from its checkpoint)")
        status, total = {}, {}
    else:
        t = pd.read_parquet(trials_path).set_index("trial")
        status, total = t.status.to_dict(), t.epochs.to_dict()
    rows = dict(tuple(ep.sort_values("epoch").groupby("trial")))
    # Tune logs a result after raybench's callback has written its row: a driver killed between the two leaves a
    # trial with a checkpoint and no row in Tune's files, whose epochs must still be accounted for
    checkpointed = {c.parent.name for c in tune_dir.glob("*/checkpoint_*")} if tune_dir else set()
    for name in sorted(set(rows) | checkpointed):
        mine = rows.get(name, ep.iloc[:0])
        done = sorted(int(e) for e in mine.epoch)
        st = status.get(name, mine.status.iloc[-1] if len(mine) else None)
        last = newest_checkpoint_epoch(tune_dir / name) if tune_dir else 0
        lost = sorted(set(range(1, last + 1)) - set(done))
        if st in ENDED and not lost:
            continue
        if lost:
            redo.add(name)
        notes.append(f"{name}: epoch rows {_ranges(done) or 'none'} recovered"
                     + (f" of {total[name]}" if name in total else "")
                     + (f"; no record of epoch(s) {_ranges(lost)} survives and its checkpoint is past them: it is "
                        "trained again from epoch 1" if lost else
                        f"; it goes on after epoch {last} (its newest checkpoint that loads)" if last else
                        "; it starts again from epoch 1 (no checkpoint of it loads)"))
    return notes, redo


def ended(run_dir: Path) -> set[str]:
    """The trials trials.parquet shows ended (ENDED): a resume does not train them again."""
    trials = pd.read_parquet(Path(run_dir) / "trials.parquet")
    return set(trials.trial[trials.status.isin(ENDED)])


def all_ended(run_dir: Path, names: list[str]) -> bool:
    """Whether trials.parquet reads and shows every one of `names` ended: a resume has nothing to train."""
    try:
        done = ended(run_dir)
    except Exception:  # missing or unreadable: the resume rebuilds it and decides then
        return False
    return set(names) <= done


def write_atomic(df: pd.DataFrame, path: Path) -> None:
    """Readers (the notebook, a second shell) see the old file or the new one, never half of one; a full disk
    raises DiskFull naming the file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_parquet(df, tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC or "No space left on device" in str(e):
            raise DiskFull(path) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _ranges(nums: list[int]) -> str:
    out, start = [], None
    for i, n in enumerate(nums):
        start = n if start is None else start
        if i + 1 == len(nums) or nums[i + 1] != n + 1:
            out.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)


# --- a full disk -----------------------------------------------------------------------------------------------

def disk_full_path(exc: BaseException | None) -> str | None:
    """The path a full disk refused, when `exc` (or what it was raised from) says the disk was full."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return exc.filename or ""
        if "No space left on device" in str(exc) or "[Errno 28]" in str(exc):
            return ""
        exc = exc.__cause__ or exc.__context__
    return None


def space_needed(run_dir: Path, tune_dir: Path | None, unfinished: int) -> int:
    """Bytes of free space the run needs to go on: each unfinished trial writes a checkpoint beside its last one
    (Tune deletes the old one after), every Parquet file and Tune's state are rewritten through a temporary copy,
    and 2 MB cover Tune's result logs and small files."""
    def size(p: Path) -> int:
        return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    checkpoints = [size(c) for c in tune_dir.glob("*/checkpoint_*")] if tune_dir and tune_dir.is_dir() else []
    state = sum(size(p) for p in tune_dir.glob("*.json")) if tune_dir and tune_dir.is_dir() else 0
    parquet = sum(size(run_dir / f) for f in RESULT_FILES if (run_dir / f).exists())
    return max(checkpoints, default=0) * max(1, unfinished) + 2 * (parquet + state) + 2 * 2 ** 20


def free_bytes(path: str) -> int:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def disk_full_message(path: str, run_dir: Path, tune_dir: Path | None, unfinished: int, resume: str) -> str:
    where = path or str(tune_dir or run_dir)
    need = space_needed(run_dir, tune_dir, unfinished)
    have = free_bytes(where)
    return (f"no space left on the device of {where} ({megabytes(have)} free there); the run needs about "
            f"{megabytes(need)} free to continue: free {megabytes(max(0, need - have))} or more there, or move "
            f"{run_dir} to a disk with room, then continue with: {resume}")


# --- a run restarted from raybench's own records ---------------------------------------------------------------

def resume_entries(run_dir: Path, tune_dir: Path | None, entries: list[dict], redo: set = frozenset()) -> list[dict]:
    """Without Tune's state, the trials still to train are those trials.parquet does not show ended, and `redo`;
    each but those in `redo` is told its folder, where it looks for its newest checkpoint that loads
    (StudyTrial.setup). Tune starts each trial's result.json anew: the one there is kept beside it."""
    done = ended(run_dir)
    todo = [e for e in entries if e["name"] not in done or e["name"] in redo]
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    for e in todo:
        log = tune_dir / e["name"] / "result.json" if tune_dir else None
        if log and log.exists():
            log.rename(log.with_name(f"result.json.{stamp}"))
    print(f"[grid] {len(entries) - len(todo)} trial(s) have ended and are kept; {len(todo)} go on "
          + ("from their newest checkpoint that loads" if tune_dir else
             "from epoch 1 (checkpoints in a remote --storage-path are not searched)")
          + (f" ({len(redo)} from epoch 1, to redo lost epochs)" if redo else ""), flush=True)
    return [{**e, "resume_dir": str(tune_dir / e["name"])} if tune_dir and e["name"] not in redo else e
            for e in todo]
