"""A run that stopped on a full disk, or whose files were damaged while it stood, goes on with the README's
`--resume`: every (trial, epoch) once, nothing damaged deleted, and the run says what it recovered."""
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_grid
from test_grid import read_epochs, wait_for, write_experiment

SMALL, LARGER = "vit-p8-e32-l1-h2-m2", "vit-p4-e64-l2-h2-m2"  # checkpoints of about 0.2 MB and 0.9 MB


def every_epoch_once(run_dir: Path, epochs: int) -> pd.DataFrame:
    ep = pd.read_parquet(run_dir / "epochs.parquet")
    assert not ep.duplicated(["trial", "epoch"]).any()
    assert sorted(ep.groupby("trial").epoch.apply(list).tolist()) == [list(range(1, epochs + 1))] * 2, ep
    return ep


def resume_as_printed(text: str, **kw) -> subprocess.CompletedProcess:
    """The `--resume` command the run printed, as a user pastes it."""
    cmd = shlex.split(re.search(r"continue with: (python -m raybench\.grid .*--resume)", text).group(1))
    return subprocess.run([sys.executable, *cmd[1:], "--no-analysis"], capture_output=True, text=True,
                          timeout=300, **kw)


@pytest.fixture
def small_disk(tmp_path):
    """A 1.6 MB tmpfs: room for the run's files and one checkpoint of the larger trial, not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(disk)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_error_line_and_resume_continues_once_there_is_room(tmp_path, small_disk):
    exp = write_experiment(tmp_path / "full.yaml", [SMALL, LARGER], epochs=3, train_size=600)
    r = run_grid("--experiment", exp, "--gpus", 0, "--cpus", 2, "--results-dir", small_disk, "--name", "full",
                 "--no-analysis", "--no-dashboard", timeout=300)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-5000:]
    m = re.search(rf"no space left on the device of ({re.escape(str(small_disk))}\S*) .* needs about ([\d.]+) MB "
                  r"free to continue", errors[0])
    assert m, errors[0]
    run_dir = small_disk / "full"
    before = read_epochs(run_dir)  # whole: the rows written before the disk filled
    assert len(before) and not before.duplicated(["trial", "epoch"]).any()

    # space is freed: the disk grows by what the message asked for, and no more
    used = os.statvfs(small_disk)
    used_kb = (used.f_blocks - used.f_bfree) * used.f_frsize // 1024
    subprocess.run(["mount", "-o", f"remount,size={used_kb + int(float(m.group(2)) * 1000)}k", str(small_disk)],
                   check=True)
    again = resume_as_printed(errors[0])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    after = every_epoch_once(run_dir, 3)
    same = ["trial", "epoch", "pid", "finished_at"]
    finished = before.groupby("trial").epoch.max().pipe(lambda m: m[m == 3].index)
    for name in finished:  # a trial that had finished is not trained again
        assert after[after.trial == name][same].values.tolist() == before[before.trial == name][same].values.tolist()
    assert (pd.read_parquet(run_dir / "trials.parquet").status == "ok").all()


@pytest.mark.slow
def test_a_run_whose_tune_state_and_parquet_files_were_cut_resumes_from_its_own_records(tmp_path):
    """One trial at a time; the driver is stopped once the second trial has two epochs, by SIGHUP (a closed
    terminal) and Ctrl+C half a second later: the second signal ends it at once, keeping what was written. Then
    Tune's experiment_state-*.json, epochs.parquet and trials.parquet are each cut to half their bytes, as a full disk
    or a crash mid-write leaves them. `--resume` sets them aside (renamed, not deleted), rebuilds the epoch rows
    from Tune's result files and the trial rows from experiment.json and those, and continues the second trial
    from its newest checkpoint, without training the finished first trial again."""
    # The longest trial starts first (raybench.estimate.start_order): the second one is about half as long, slow
    # enough to be stopped mid-way.
    shorter = "vit-p4-e64-l1-h2-m2"
    exp = write_experiment(tmp_path / "cut.yaml", [shorter, LARGER], epochs=4, train_size=1200)
    first, second = f"{LARGER}-seed", f"{shorter}-seed"
    run_dir = tmp_path / "res" / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "raybench.grid", "--experiment", str(exp), "--gpus", "0",
                             "--cpus", "1", "--results-dir", str(tmp_path / "res"), "--name", "cut", "--no-analysis",
                             "--no-dashboard"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # two rows: Tune starts an epoch only once it has the last one's checkpoint, so epoch 1's is saved
        wait_for(lambda: (read_epochs(run_dir).trial == second).sum() >= 2, timeout=300)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)  # while Tune stops
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGHUP, out[-3000:]
    assert "SIGHUP: stopping the run; finished epochs are kept" in out and "Traceback" not in out, out[-3000:]
    assert "[grid] stopped by SIGHUP: " in out.strip().splitlines()[-1], out[-3000:]
    before = read_epochs(run_dir)
    assert sorted(before[before.trial == first].epoch) == [1, 2, 3, 4], out[-3000:]
    assert before[before.trial == second].epoch.max() < 4, out[-3000:]

    (state,) = (run_dir / "ray").glob("experiment_state-*.json")
    for path in (state, run_dir / "epochs.parquet", run_dir / "trials.parquet"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    r = resume_as_printed(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    said = [l for l in r.stdout.splitlines() if l.startswith("[grid] recovered: ")]
    assert any("epochs.parquet could not be read" in l and "epoch row(s) of 2 trial(s)" in l for l in said), said
    assert any("trials.parquet could not be read" in l for l in said), said
    assert any("Tune's state of the run cannot be read" in l for l in said), said
    assert "1 trial(s) have ended and are kept; 1 go on from their newest checkpoint" in r.stdout
    for name in (state.name, "epochs.parquet", "trials.parquet"):  # set aside, not deleted
        assert len(list(state.parent.glob(f"{name}.damaged-*")) + list(run_dir.glob(f"{name}.damaged-*"))) == 1

    after = every_epoch_once(run_dir, 4)
    same = ["trial", "epoch", "pid", "finished_at"]
    # the first trial was not trained again; the second went on from a checkpoint: its first epochs are the
    # rows of the first run, recovered from Tune's result files
    assert after[after.trial == first][same].values.tolist() == before[before.trial == first][same].values.tolist()
    assert after[(after.trial == second) & (after.epoch == 1)].pid.tolist() == \
        before[(before.trial == second) & (before.epoch == 1)].pid.tolist()
    trials = pd.read_parquet(run_dir / "trials.parquet").set_index("trial")
    assert (trials.status == "ok").all() and (trials.epochs_done == 4).all()
    assert trials.final_test_acc.to_dict() == after.sort_values("epoch").groupby("trial").test_acc.last().to_dict()
