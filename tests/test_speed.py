"""The fast paths must not change what a trial learns: the frozen-backbone feature cache against the uncached
loop, and torch.compile against eager. Speed itself is measured by `python -m raybench.bench`, not here."""
import dataclasses

import pytest
import torch

from conftest import TINY_VIT
from raybench.configs import DataSpec, ResNetConfig, SwinConfig, TrialSpec, default_recipe
from raybench.sizing import CACHE_OFF_AUGMENT, CACHE_OFF_DISABLED, CACHE_OFF_NOT_FROZEN, CACHE_ON
from raybench.train import Trial
from raybench.train import compile_warm_up


def swin_ft_spec(path, epochs=2, **recipe):
    model = SwinConfig(path, finetune=True, num_classes=10)
    r = dataclasses.replace(default_recipe("seed", model), epochs=epochs, lr=3e-3, **recipe)
    return TrialSpec(model, r, DataSpec("synthetic", train_size=2000, test_size=500), seed=0)


def run(spec, data, **kw):
    return list(Trial(spec, device="cpu", threads=1, dataset=data, **kw).epochs())


@pytest.fixture(scope="module")
def cached_swin_run(tiny_swin_dir, small_synthetic):
    """The two epochs of the cached Swin fine-tune, run once for the tests that compare against them."""
    return run(swin_ft_spec(tiny_swin_dir), small_synthetic)


def test_cached_features_train_the_head_like_the_uncached_loop(cached_swin_run, tiny_swin_dir, small_synthetic):
    cached, plain = cached_swin_run, run(swin_ft_spec(tiny_swin_dir), small_synthetic, feature_cache=False)
    assert [r["feature_cache"] for r in cached] == [CACHE_ON] * 2
    assert [r["feature_cache"] for r in plain] == [CACHE_OFF_DISABLED] * 2
    for c, p in zip(cached, plain):
        # Same shuffles and the same head updates; only the batches the backbone sees differ (in order in
        # the feature pass, shuffled in the loop), which can move float sums in the last bits.
        assert c["test_acc"] == pytest.approx(p["test_acc"], abs=0.01)
        assert c["train_acc"] == pytest.approx(p["train_acc"], abs=0.01)
        assert c["train_loss"] == pytest.approx(p["train_loss"], rel=1e-3)
        assert c["test_loss"] == pytest.approx(p["test_loss"], rel=1e-3)
    assert cached[-1]["test_acc"] > 0.3  # the head learnt something, so the comparison means something
    assert cached[0]["cache_time_s"] > 0 and cached[1]["cache_time_s"] == 0.0
    assert all(r["cache_time_s"] == 0.0 for r in plain)


def test_augmentation_turns_the_cache_off_and_says_so(tiny_swin_dir, small_synthetic):
    recs = run(swin_ft_spec(tiny_swin_dir, epochs=1, augment=("flip",)), small_synthetic)
    assert recs[0]["feature_cache"] == CACHE_OFF_AUGMENT and recs[0]["cache_time_s"] == 0.0


def test_models_that_train_their_backbone_are_not_cached(tiny_swin_dir):
    scratch = SwinConfig(tiny_swin_dir, finetune=False, num_classes=10)
    for model in (scratch, TINY_VIT):
        trial = Trial(TrialSpec(model, default_recipe("seed", model), DataSpec("synthetic", train_size=64,
                                                                              test_size=32)), device="cpu")
        assert trial.feature_cache == CACHE_OFF_NOT_FROZEN


def test_a_resumed_cached_trial_recomputes_its_features(cached_swin_run, tiny_swin_dir, small_synthetic, tmp_path):
    spec, full = swin_ft_spec(tiny_swin_dir, epochs=2), cached_swin_run
    first = Trial(spec, device="cpu", threads=1, dataset=small_synthetic)
    next(first.epochs())
    first.save(tmp_path / "state.pt")
    resumed = Trial(spec, device="cpu", threads=1, dataset=small_synthetic)
    resumed.load(tmp_path / "state.pt")
    rest = list(resumed.epochs())
    assert [r["epoch"] for r in rest] == [2] and rest[0]["cache_time_s"] > 0
    assert rest[0]["test_acc"] == pytest.approx(full[1]["test_acc"], abs=1e-9)


def test_the_compile_warm_up_leaves_training_unchanged(small_synthetic):
    """The warm-up's passes, run eagerly here, must leave no trace: BatchNorm statistics (ResNet) and the
    dropout RNG (ViT) are restored, gradients dropped, the optimiser untouched."""
    data = dataclasses.replace(small_synthetic, train_x=small_synthetic.train_x[:200],
                               train_y=small_synthetic.train_y[:200], test_x=small_synthetic.test_x[:100],
                               test_y=small_synthetic.test_y[:100])
    for model in (ResNetConfig("imagenet", num_classes=10), dataclasses.replace(TINY_VIT, dropout=0.2)):
        spec = TrialSpec(model, dataclasses.replace(default_recipe("seed", model), epochs=1),
                         DataSpec("synthetic", train_size=200, test_size=100))
        warmed = Trial(spec, device="cpu", threads=1, dataset=data)
        assert compile_warm_up(warmed) > 0
        keys = ("train_loss", "train_acc", "test_loss", "test_acc")
        assert [[r[k] for k in keys] for r in warmed.epochs()] == [[r[k] for k in keys] for r in run(spec, data)]


def test_a_compiled_trial_bounds_its_compile_workers_by_its_cpus(small_synthetic, monkeypatch):
    """Inductor would start min(32, host CPUs) compile workers per trial; a trial given one CPU gets one."""
    from torch._inductor import config
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    spec = TrialSpec(TINY_VIT, default_recipe("seed", TINY_VIT), DataSpec("synthetic", train_size=64, test_size=32))
    with config.patch(compile_threads=4):  # torch's own way to set its config for a while
        Trial(spec, device="cpu", threads=1, dataset=small_synthetic)  # eager: Inductor is not involved
        assert config.compile_threads == 4
        Trial(dataclasses.replace(spec, compile=True), device="cpu", threads=1, dataset=small_synthetic)
        assert config.compile_threads == 1
        monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")  # a user's lower bound stays
        Trial(dataclasses.replace(spec, compile=True), device="cpu", threads=2, dataset=small_synthetic)
        assert config.compile_threads == 1


def _inductor_works() -> str:
    """'' when torch.compile can build a CPU kernel here, else why not."""
    try:
        torch.compile(lambda x: (x * 2).sin())(torch.ones(4))
        return ""
    except Exception as e:  # no C compiler, unsupported Python, ...
        return f"torch.compile (inductor) does not work here: {type(e).__name__}: {str(e)[:200]}"


@pytest.mark.slow
def test_compiled_trial_matches_eager_and_reports_compile_time_apart(small_synthetic):
    why = _inductor_works()
    if why:
        pytest.skip(why)
    model = TINY_VIT
    # 512 training images in batches of 64 and 256 test images: one batch shape each, so one compile each.
    data = dataclasses.replace(small_synthetic, train_x=small_synthetic.train_x[:512],
                               train_y=small_synthetic.train_y[:512], test_x=small_synthetic.test_x[:256],
                               test_y=small_synthetic.test_y[:256])
    spec = TrialSpec(model, dataclasses.replace(default_recipe("seed", model), epochs=2),
                     DataSpec("synthetic", train_size=512, test_size=256))
    eager = run(spec, data)
    compiled = run(dataclasses.replace(spec, compile=True), data)
    assert compiled[0]["compiled"] and not eager[0]["compiled"]
    assert compiled[0]["compile_time_s"] > 0 and compiled[1]["compile_time_s"] == 0.0
    for c, e in zip(compiled, eager):
        # Inductor fuses and reorders float ops: equal up to rounding, not bit for bit.
        assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-3)
        assert c["test_loss"] == pytest.approx(e["test_loss"], rel=1e-3)
        assert c["test_acc"] == pytest.approx(e["test_acc"], abs=0.02)
