"""The trainable Tune runs, built by hand as Tune builds it: restored from a checkpoint, and handed another trial
(reuse_actors) against fresh ones."""
import pytest

from raybench.experiments import load_experiment
from raybench.records import TIME_COLUMNS


@pytest.fixture(scope="module")
def local_ray():
    """A Ray of this process for the tests that build a StudyTrial by hand (it asks Ray for its node and GPU
    ids), started once for them all (conftest sends them to one worker)."""
    import ray
    ray.init(address="local", num_cpus=1, include_dashboard=False)  # never a cluster another test left
    yield
    ray.shutdown()


def test_a_trial_restored_from_its_final_checkpoint_reports_it_ended(tmp_path, local_ray):
    """Tune can restore a trial from the checkpoint of its last epoch (a driver stopped between the two
    snapshots); the trainable then has no epoch left and must say the trial ended, not raise."""
    from raybench.trainable import StudyTrial
    spec = load_experiment("smoke", epochs=1, train_size=64, test_size=32).trials[0]
    config = {"trial": {"name": spec.name, "spec": spec.to_dict(), "resources": {"cpu": 1, "gpu": 0}}}
    first = StudyTrial(config=config)
    assert first.step()["status"] == "ok"
    first.save_checkpoint(str(tmp_path))
    restored = StudyTrial(config=config)
    restored.load_checkpoint(str(tmp_path))
    rec = restored.step()
    assert rec["done"] and rec["status"] == "ok" and rec["epoch"] == 1 and "train_loss" not in rec


# What a record measures rather than computes: seconds, throughput, clock times and the process's peak memory
# (on CPU the process's high-water mark, which a reused process carries over from its last trial).
MEASURED = {*TIME_COLUMNS, "images_per_s", "started_at", "finished_at", "peak_memory_mb"}


def test_a_reused_actor_gives_the_same_epoch_records_as_a_fresh_one(local_ray):
    """Tune's reuse_actors hands a finished trial's actor the next trial (reset_config). Two trials of
    different models (the second a ResNet with BatchNorm, the first a ViT) run through one StudyTrial, and
    each in its own fresh StudyTrial: the epoch records agree on everything but the measured fields."""
    import raybench.trainable as trainable_module
    from raybench.trainable import StudyTrial
    exp = load_experiment("smoke", epochs=2, train_size=96, test_size=48)
    specs = [next(t for t in exp.trials if t.name.startswith(p)) for p in ("vit-p8-e32-l1", "resnet18")]
    configs = [{"trial": {"name": s.name, "spec": s.to_dict(), "resources": {"cpu": 1, "gpu": 0},
                          "memory_bytes": 0}} for s in specs]

    def records(trainable):
        out = []
        while not (out and out[-1]["done"]):
            out.append({k: v for k, v in trainable.step().items() if k not in MEASURED})
        return out

    reused = StudyTrial(config=configs[0])
    first_run = records(reused)
    assert reused.reset_config(configs[1]) is True
    second_run = records(reused)
    fresh = []
    for c in configs:  # as in a new process: no dataset kept from an earlier trial
        trainable_module._datasets.clear()
        fresh.append(records(StudyTrial(config=c)))
    assert [first_run, second_run] == fresh
    assert [r["epoch"] for r in second_run] == [1, 2] and second_run[-1]["status"] == "ok"
    assert first_run[0]["train_loss"] != second_run[0]["train_loss"]  # two different trials were compared
    # the second trial trained on the dataset the first one loaded, unchanged by the first one's training


def test_a_trial_whose_checkpoint_is_gone_or_cut_goes_on_from_the_newest_one_that_loads(tmp_path, local_ray):
    """Tune restores a trial from the checkpoint it holds as the newest. When that one is cut short (a full
    disk) the trial goes on from the newest one in its folder that loads, and trains the next epoch exactly as
    it did the first time; when none is left (a folder deleted by hand) it starts again from epoch 1, saying
    so with its next record (the grid prints it)."""
    import shutil
    from raybench.trainable import StudyTrial
    spec = load_experiment("smoke", epochs=3, train_size=64, test_size=32).trials[0]
    config = {"trial": {"name": spec.name, "spec": spec.to_dict(), "resources": {"cpu": 1, "gpu": 0},
                        "memory_bytes": 0}}
    first, saved, records = StudyTrial(config=config), [], []
    for i in range(2):
        records.append(first.step())
        saved.append(tmp_path / f"checkpoint_00000{i}")
        saved[-1].mkdir()
        first.save_checkpoint(str(saved[-1]))
    state = saved[1] / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])

    restored = StudyTrial(config=config)
    restored.restore(str(saved[1]))
    rec = restored.step()
    assert rec["epoch"] == 2 and rec["train_loss"] == records[1]["train_loss"]
    assert "could not be restored" in rec["note"] and "goes on from the checkpoint of epoch 1" in rec["note"]
    assert "note" not in restored.step()  # said once

    shutil.rmtree(saved[0])
    again = StudyTrial(config=config)
    again.restore(str(saved[0]))
    rec = again.step()
    assert rec["epoch"] == 1 and rec["train_loss"] == records[0]["train_loss"]
    assert "does not exist" in rec["note"] and "starts again from epoch 1" in rec["note"]


def test_the_driver_prints_its_trials_step_notes_and_none_of_their_other_output(local_ray, capsys):
    """A long epoch's step notes (raybench.train) reach the driver's output; Ray's and Tune's own logging in the
    trial processes does not."""
    import time
    import ray
    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    from raybench.records import step_note
    from raybench.session import forward_step_notes
    note = step_note("vit-p8-e32-l1-h2-m2-seed", 2, 3, 40, 94, 30.2, 40.1)

    @ray.remote
    def trial_process():
        print("a log line of the trial's process")
        print(note, flush=True)
    saved = list(dispatcher.handlers)
    forward_step_notes()
    try:
        ray.get(trial_process.remote())
        out, deadline = "", time.monotonic() + 20
        while note not in out and time.monotonic() < deadline:  # Ray's log monitor reads worker logs every ~0.1 s
            time.sleep(0.2)
            out += capsys.readouterr().out
    finally:
        dispatcher.handlers = saved
    assert note in out and "a log line" not in out, out
