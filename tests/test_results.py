"""trials.parquet's row of a trial, as the Tune callback keeps it: what was asked at the start, what the
device did once epochs arrive."""
import pandas as pd

from conftest import TINY_VIT
from raybench.configs import DataSpec, TrialSpec, default_recipe
from raybench.records import DIVERGED, EPOCH_COLUMNS, OK, STOPPED_EARLY
from raybench.results import ResultsWriter, trial_rows, write_atomic


def test_trials_record_the_precision_asked_then_the_one_the_device_used(tmp_path):
    model = TINY_VIT
    specs = [TrialSpec(model, default_recipe("seed", model), DataSpec("synthetic", train_size=64, test_size=32)),
             TrialSpec(model, default_recipe("improved", model), DataSpec("synthetic", train_size=64, test_size=32),
                       precision="fp32")]
    writer = ResultsWriter(tmp_path, trial_rows(specs, {s.name: {"cpu": 1, "gpu": 0} for s in specs}))
    trials = pd.read_parquet(tmp_path / "trials.parquet").set_index("trial")
    assert trials.precision.to_dict() == {specs[0].name: "auto", specs[1].name: "fp32"}
    epoch = {k: None for k in EPOCH_COLUMNS} | dict(trial=specs[0].name, epoch=1, train_loss=1.0, train_acc=0.5,
                                                    test_loss=1.0, test_acc=0.5, train_time_s=1.0, device="cpu",
                                                    precision="bf16")
    write_atomic(pd.DataFrame([epoch]), tmp_path / "epochs.parquet")
    writer._update_trial(specs[0].name, status="running")
    trials = pd.read_parquet(tmp_path / "trials.parquet").set_index("trial")
    assert trials.precision.to_dict() == {specs[0].name: "bf16", specs[1].name: "fp32"}


def test_a_trial_stopped_by_the_scheduler_is_not_a_failure_and_a_diverged_one_is(tmp_path):
    """The grid's exit status is 0 exactly when all_ok(): ASHA's early stops keep it 0 (test_grid's ASHA run
    ends 1 because a trial there also diverges)."""
    model = TINY_VIT
    specs = [TrialSpec(model, default_recipe(recipe, model), DataSpec("synthetic", train_size=64, test_size=32))
             for recipe in ("seed", "improved")]
    writer = ResultsWriter(tmp_path, trial_rows(specs, {s.name: {"cpu": 1, "gpu": 0} for s in specs}))
    assert not writer.all_ok()  # pending trials have not ended
    writer._update_trial(specs[0].name, status=OK)
    writer._update_trial(specs[1].name, status=STOPPED_EARLY)
    assert writer.all_ok()
    writer._update_trial(specs[1].name, status=DIVERGED)
    assert not writer.all_ok()


def test_a_trial_row_says_what_the_model_is_so_the_analysis_never_parses_its_name(tiny_models):
    from raybench.configs import SWIN_SHORT, SwinConfig
    models = [TINY_VIT, tiny_models["resnet18-imagenet"], tiny_models["swin-ft"],
              SwinConfig(SWIN_SHORT["small"], finetune=False, num_classes=10)]
    data = DataSpec("synthetic", train_size=64, test_size=32)
    specs = [TrialSpec(m, default_recipe("seed", m), data) for m in models]
    rows = trial_rows(specs, {s.name: {"cpu": 1, "gpu": 0} for s in specs})
    folder = tiny_models["swin-ft"].short  # a checkpoint folder raybench has no short name for: its slug
    assert [[r[k] for k in ("stem", "pretrained", "finetune", "swin_size")] for r in rows] == [
        [None, False, False, None], ["imagenet", False, False, None], [None, True, True, folder],
        [None, False, False, "small"]]
