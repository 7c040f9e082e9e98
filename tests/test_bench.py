"""The benchmark runs and writes well-formed results. No timing assertions: speed varies by machine and load;
docs/benchmarks.md records what was measured where."""
import json
import os
import platform
import statistics
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import TINY_VIT, free_port
from raybench import bench
from raybench.results import write_atomic


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # swin-micro-ft: the frozen-backbone path, whose feature cache adds the raybench-head rows.
    rc = bench.main(["--models", f"{TINY_VIT.name},swin-micro-ft", "--images", "128", "--repeats", "2", "--device",
                     "cpu", "--threads", "2", "--warmup-batches", "1", "--out", str(out)])
    assert rc == 0
    return out


def test_bench_writes_json_parquet_and_markdown(tiny_bench):
    result = json.loads((tiny_bench / "bench.json").read_text())
    assert {"command", "machine", "args", "rows", "summary", "grid_overhead"} <= set(result)
    machine = result["machine"]
    assert machine["torch_version"] == torch.__version__ and machine["cpu_count"] == os.cpu_count()
    # the CPU as the OS names it: bench results are compared across machines by this field
    cpuinfo = Path("/proc/cpuinfo")
    models = {line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
              if line.startswith("model name")}
    assert machine["cpu_model"] in (models or {platform.processor()})
    rows = pd.read_parquet(tiny_bench / "bench.parquet")
    for col in ("bench", "device", "model", "loop", "repeat", "batch_size", "images", "epoch_time_s", "images_per_s",
                "cache_time_s", "compile_time_s", "feature_cache", "workers", "precision", "error", "torch_version"):
        assert col in rows, col
    assert (rows.error == "").all()
    assert (rows.epoch_time_s > 0).all() and (rows.images_per_s > 0).all()
    assert set(rows.loop) == {"reference", "raybench", "raybench-head"}
    assert set(rows[rows.loop == "raybench-head"].model) == {"swin-micro-ft"}
    assert (rows[(rows.model == "swin-micro-ft") & (rows.loop == "raybench")].cache_time_s > 0).all()
    assert rows.groupby(["model", "loop"]).size().eq(2).all()
    md = (tiny_bench / "bench.md").read_text()
    assert "| cpu | " + TINY_VIT.name in md and "reference" in md and "raybench" in md
    assert f"- machine: {machine['cpu_model']}, {machine['cpus_usable']} usable CPUs" in md


def test_ratio_is_raybench_median_over_reference_median_from_the_same_rows(tiny_bench):
    result = json.loads((tiny_bench / "bench.json").read_text())
    rows = pd.read_parquet(tiny_bench / "bench.parquet")
    for s in result["summary"]:
        mine = rows[(rows.model == s["model"]) & (rows.loop == s["loop"])]
        ref = rows[(rows.model == s["model"]) & (rows.loop == "reference")]
        median = statistics.median(mine.images_per_s)
        assert s["images_per_s_median"] == pytest.approx(median)
        assert s["images_per_s_min"] <= s["images_per_s_median"] <= s["images_per_s_max"]
        assert s["ratio_to_reference"] == pytest.approx(median / statistics.median(ref.images_per_s))


def test_rows_say_their_precision_and_both_precisions_time_side_by_side(tiny_bench, tmp_path):
    import torch
    from raybench.train import resolve_precision
    rows = pd.read_parquet(tiny_bench / "bench.parquet")
    auto = resolve_precision("auto", torch.device("cpu"))
    assert set(rows[rows.loop == "reference"].precision) == {"fp32"}
    assert set(rows[rows.loop.str.startswith("raybench")].precision) == {auto}
    assert bench.main(["--models", TINY_VIT.name, "--images", "128", "--repeats", "1", "--device", "cpu", "--threads",
                       "2", "--warmup-batches", "1", "--precision", "fp32,bf16", "--out", str(tmp_path)]) == 0
    rows = pd.read_parquet(tmp_path / "bench.parquet")
    assert sorted(zip(rows.loop, rows.precision)) == [("raybench", "bf16"), ("raybench", "fp32"),
                                                       ("reference", "fp32")]
    summary = {(s["loop"], s["precision"]): s for s in json.loads((tmp_path / "bench.json").read_text())["summary"]}
    bf16, fp32 = summary["raybench", "bf16"], summary["raybench", "fp32"]
    assert bf16["ratio_to_fp32"] == pytest.approx(bf16["images_per_s_median"] / fp32["images_per_s_median"])
    assert fp32["ratio_to_fp32"] is None
    assert "| raybench | bf16 |" in (tmp_path / "bench.md").read_text()


def test_the_compile_warm_up_set_ends_on_a_short_batch_like_a_real_trial():
    from raybench.sizing import EVAL_BATCH
    # the default CPU run (512 images, a test set of 102, batch 64) divides evenly; CIFAR-100's 50,000 do not
    assert bench.warm_up_sizes(512, 102, 64, 3) == (4 * 64 + 50_000 % 64, 102)
    n, n_test = bench.warm_up_sizes(10_000, 2_000, 64, 3)  # the default CUDA run: its own short batches
    assert (n % 64, n_test % EVAL_BATCH) == (10_000 % 64, 2_000 % EVAL_BATCH) and n > 64 and n_test > EVAL_BATCH
    assert bench.warm_up_sizes(60, 20, 64, 3) == (60, 20)  # less than a batch: taken whole


def test_study_needs_cuda_and_bad_input_is_refused(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: --study would run the full-size study")
    assert bench.main(["--study", "seed", "--out", "unused"]) == 2
    assert "needs CUDA" in capsys.readouterr().err
    assert bench.main(["--models", "vit-p3", "--out", "unused"]) == 2
    assert "model name 'vit-p3'" in capsys.readouterr().err
    assert bench.main(["--device", "tpu", "--out", "unused"]) == 2
    assert bench.main(["--precision", "fp32,fp16", "--out", "unused"]) == 2
    assert "'fp16'; accepted: auto, bf16, fp32" in capsys.readouterr().err
    assert bench.main(["--grid-cpus-per-trial", "inf", "--out", "unused"]) == 2
    assert "--grid-cpus-per-trial=inf: must be a finite number > 0" in capsys.readouterr().err


def test_grid_trial_times_sums_a_runs_epochs(tmp_path):
    ep = pd.DataFrame({"trial": ["a", "a", "b"], "epoch": [1, 2, 1], "train_time_s": [1.0, 2.0, 3.0],
                       "eval_time_s": [0.5, 0.5, 0.5], "cache_time_s": [0.25, 0.0, 0.0],
                       "started_at": [100.0, 103.0, 101.0], "finished_at": [102.5, 106.0, 105.0]})
    write_atomic(ep, tmp_path / "epochs.parquet")
    t = bench.grid_trial_times(tmp_path)
    assert (t["trials"], t["epochs"]) == (2, 3)
    assert t["trial_time_s"] == pytest.approx(6.0 + 1.5 + 0.25)
    assert t["compile_time_s"] == 0.0  # a run written without the column
    assert t["epochs_window_s"] == pytest.approx(6.0)


@pytest.mark.slow
def test_grid_overhead_on_two_tiny_trials_that_follow_each_other_in_one_process(tmp_path):
    """The bench's grid (`--no-dashboard`, every CPU of the machine to each trial: one trial at a time) against
    the same trials without Ray. Without the dashboard the second trial follows the first in the process Tune
    started for it (with the dashboard on, every trial gets its own actor, so the dashboard lists it under its
    own name), and the phases the grid writes account for its time.

    Meanwhile the default address file names a Ray that is gone, as a `ray start --head` whose processes died
    leaves /tmp/ray/ray_current_cluster; `ray.init()` would join that and refuse num_cpus/num_gpus (Ray 2.60).
    The default run must not care. (Here rather than in a grid of its own: one local Ray start fewer.)"""
    from ray._common.utils import get_ray_address_file
    path = Path(get_ray_address_file(None))
    before = path.read_text() if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"127.0.0.1:{free_port()}")  # nothing answers there
    try:
        g = bench.grid_overhead("smoke", "vit-p8-*", float(os.cpu_count() or 1))
    finally:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(before)
    assert g["grid"]["trials"] == g["sequential"]["trials"] == 2
    assert g["grid"]["epochs"] == g["sequential"]["epochs"] == 4
    assert g["grid_wall_s"] > g["grid"]["trial_time_s"] > 0 and g["sequential_wall_s"] > 0
    assert g["grid_wall_over_sequential_wall"] == pytest.approx(g["grid_wall_s"] / g["sequential_wall_s"])
    phases = g["grid_phases"]
    assert phases["actor_processes"] == 1 and phases["between_trials_n"] == 1  # one process ran both trials
    spent = sum(phases[k] for k in ("before_ray", "ray_start", "tune_run", "ray_shutdown", "report_and_analysis"))
    assert 0 < spent <= g["grid_wall_s"] and phases["first_epoch_after_s"] > 0 and phases["after_last_epoch_s"] >= 0
