"""A run that stopped on a full disk goes on with the README's `--resume` once there is room: every (trial, epoch)
once; a trial with a checkpoint but no surviving row is trained again from epoch 1. (A run whose files a killed
driver left cut short: tests/test_offpath.py; a trial whose checkpoint is gone or cut: tests/test_trainable.py.)"""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_grid
from test_grid import read_epochs, write_experiment

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
    # one CPU: the trials run one after the other, the second in the first one's process (Tune's reuse_actors)
    r = run_grid("--experiment", exp, "--gpus", 0, "--cpus", 1, "--results-dir", small_disk, "--name", "full",
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
    assert before.pid.nunique() == 1, before[["trial", "epoch", "pid"]]

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


def test_a_trial_with_a_checkpoint_and_no_surviving_row_is_trained_again_from_epoch_1(tmp_path):
    """A driver killed after raybench wrote an epoch's row but before Tune logged it (Tune's loggers come after
    raybench's callback), then the Parquet files found cut: the rows are rebuilt from Tune's result files, where
    trial b has none although its epoch-1 checkpoint loads. Going on after that checkpoint would leave epoch 1
    without a row, so b is trained again from epoch 1; a goes on after its checkpoint."""
    import torch
    from raybench import recover
    run_dir = tmp_path / "run"
    tune_dir = run_dir / "ray"
    for name, logged in (("a", True), ("b", False)):
        (tune_dir / name / "checkpoint_000000").mkdir(parents=True)
        torch.save({"epoch": 1}, tune_dir / name / "checkpoint_000000" / recover.STATE_FILE)
        record = {"epoch": 1, "train_loss": 2.3, "test_acc": 0.1, "config": {"trial": {"name": name}}}
        (tune_dir / name / "result.json").write_text(json.dumps(record) + "\n" if logged else "")
    for cut in ("epochs.parquet", "trials.parquet"):  # as the killed driver left them (tests/test_offpath.py)
        (run_dir / cut).write_bytes(b"PAR1 and then nothing")
    notes, redo = recover.check_results(run_dir, tune_dir)
    assert redo == {"b"}
    assert "recovered 1 epoch row(s) of 1 trial(s) from Tune's result files" in notes[0], notes
    assert notes[2:] == ["a: epoch rows 1 recovered; it goes on after epoch 1 (its newest checkpoint that loads)",
                         "b: epoch rows none recovered; no record of epoch(s) 1 survives and its checkpoint is past "
                         "them: it is trained again from epoch 1"]
    assert pd.read_parquet(run_dir / "epochs.parquet").trial.tolist() == ["a"]
