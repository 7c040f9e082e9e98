"""The GPU check's driver, run here on CPU at tiny sizes (`--device cpu`): it writes report.md and report.json,
prints the report's path last, and a part that fails or runs out of time is a row with its error while the
later parts still run. What it measures on a GPU is not checked here: docs/benchmarks.md records that."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raybench import gpucheck

REPO = Path(__file__).resolve().parent.parent


def check(*args, timeout=240):
    """`python -m raybench.gpucheck --device cpu ARGS` in a fresh process, as the script runs it."""
    return subprocess.run([sys.executable, "-m", "raybench.gpucheck", "--device", "cpu", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    # A study whose first trial diverges (lr 1e12): that trial is a row with its error, the next trial still
    # runs; the study part fails, and the bench after it still runs (parts run in the order given).
    exp = out / "diverging.yaml"
    exp.write_text(json.dumps({"name": "diverging", "dataset": {"name": "synthetic"}, "num_classes": 10,
                               "epochs": 1, "models": [{"name": "vit-p8-e32-l1-h2-m2", "recipe": {"lr": 1e12}},
                                                       "vit-p8-e32-l2-h2-m2"]}))
    r = check("--parts", "tests,study,bench", "--study-experiment", exp, "--study-images", 256,
              "--bench-models", "vit-p8-e32-l1-h2-m2", "--out", out)
    return out, r


def test_the_check_writes_its_report_and_prints_its_path_last(cpu_check):
    out, r = cpu_check
    assert r.stdout.strip().splitlines()[-1] == str(out / "report.md"), r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["machine"]["torch_version"] and report["machine"]["date_utc"]
    assert [p["part"] for p in report["parts"]] == ["tests", "study", "bench:vit-p8-e32-l1-h2-m2"]
    for p in report["parts"]:
        assert Path(p["log"]).read_text().startswith("$ "), p  # each part's output kept
    md = (out / "report.md").read_text()
    for p in report["parts"]:
        assert f"| {p['part']} | {p['status']} |" in md
    import torch
    from raybench.train import resolve_precision
    used = resolve_precision("auto", torch.device("cpu"))  # the trials' default: bf16 on a CPU that has it
    assert "synthetic" in md and f"Precision: {used}" in md  # caveats: the data, and the precision used


def test_a_failing_part_is_a_row_with_its_error_and_the_rest_still_runs(cpu_check):
    out, r = cpu_check
    assert r.returncode == 1  # not every part ok
    report = json.loads((out / "report.json").read_text())
    parts = {p["part"]: p for p in report["parts"]}
    study = parts["study"]
    assert study["status"] == "failed" and "vit-p8-e32-l1-h2-m2-seed: non-finite training loss" in study["error"]
    diverged, ok = report["study"]
    assert diverged["status"] == "diverged" and ok["status"] == "ok" and ok["epoch_time_s"] > 0
    assert "| study | failed | " in (out / "report.md").read_text()
    assert parts["tests"]["status"] == parts["bench:vit-p8-e32-l1-h2-m2"]["status"] == "ok", parts


def test_the_cuda_tests_count_as_skipped_without_cuda(cpu_check):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the cuda tests run instead of skipping")
    out, _ = cpu_check
    report = json.loads((out / "report.json").read_text())
    t = report["tests"]
    assert report["parts"][0]["status"] == "ok"
    assert t["tests"] == t["skipped"] >= 6 and t["passed"] == t["failed"] == t["errors"] == 0, t
    assert any("needs a CUDA device" in why for why in t["skip_reasons"]), t


def test_bench_and_study_rows_carry_what_was_measured(cpu_check):
    out, _ = cpu_check
    report = json.loads((out / "report.json").read_text())
    assert {s["loop"] for s in report["bench"]} == {"reference", "raybench"}
    assert all(s["model"] == "vit-p8-e32-l1-h2-m2" and s["images_per_s_median"] > 0 for s in report["bench"])
    row = report["study"][1]
    assert row["trial"] == "vit-p8-e32-l2-h2-m2-seed" and row["images"] == 256 and row["device"] == "cpu"
    assert row["epoch_time_s"] > 0 and row["peak_memory_mb"] > 0 and row["estimate_mb"] > 0
    # the share rule's numerator: forward, backward (about twice the forward) for a batch of 64
    from raybench.complexity import complexity
    from raybench.configs import parse_model_name
    forward = complexity(parse_model_name("vit-p8-e32-l2-h2-m2", num_classes=10)).flops
    assert row["step_gflops"] == pytest.approx(3 * forward * 64 / 1e9)
    assert row["rule_compute_share"] == pytest.approx(row["step_gflops"] * 1e9 / 1e12)
    assert row["busy_fraction"] is None and "no GPU" in row["note"]  # no GPU: not measured, and said so


def test_a_part_over_its_budget_is_stopped_and_reported(tmp_path):
    r = check("--parts", "tests", "--time-scale", 0.01, "--out", tmp_path, timeout=120)  # 1.2 s for pytest
    assert r.returncode == 1 and r.stdout.strip().splitlines()[-1] == str(tmp_path / "report.md")
    (part,) = json.loads((tmp_path / "report.json").read_text())["parts"]
    assert part["status"] == "timed out" and part["error"].startswith("timed out after 1 s"), part
    assert part["seconds"] < 30  # stopped, not waited for


def test_bad_input_is_refused_before_any_part_runs(tmp_path, capsys):
    assert gpucheck.main(["--parts", "tests,nope", "--out", str(tmp_path / "a")]) == 2
    assert "--parts='tests,nope'" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert gpucheck.main(["--device", "cpu", "--time-scale", "0", "--out", str(tmp_path / "b")]) == 2
    assert "--time-scale=0: must be a finite number > 0" in capsys.readouterr().err
    assert gpucheck.main(["--device", "cpu", "--time-scale", "nan", "--out", str(tmp_path / "b")]) == 2
    assert "--time-scale=nan: must be a finite number > 0" in capsys.readouterr().err
    assert gpucheck.main(["--device", "cpu", "--bench-models", "vit-p3", "--out", str(tmp_path / "b")]) == 2
    assert "model name 'vit-p3'" in capsys.readouterr().err
    assert gpucheck.main(["--device", "cpu", "--study-only", "zzz", "--out", str(tmp_path / "b")]) == 2
    assert "--only='zzz' matches no trial" in capsys.readouterr().err and not (tmp_path / "b").exists()
    import torch
    if not torch.cuda.is_available():
        assert gpucheck.main(["--out", str(tmp_path / "c")]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_busy_fraction_averages_the_samples_inside_the_window_and_overlaps_are_counted():
    samples = [(0.5, 100.0), (1.0, 40.0), (1.5, 60.0), (2.5, 0.0)]
    assert gpucheck.busy_fraction(samples, 0.5, 2.0) == pytest.approx(0.5)  # 40 and 60: (start, end]
    assert gpucheck.busy_fraction(samples, 3.0, 4.0) is None
    assert gpucheck.max_at_once([(0, 2), (1, 3), (2, 4)]) == 2  # (0, 2) ends as (2, 4) starts
    assert gpucheck.max_at_once([(0, 1), (1, 2)]) == 1


def test_without_nvml_or_nvidia_smi_the_busy_sampler_says_why_it_measures_nothing():
    if shutil.which("nvidia-smi"):
        pytest.skip("nvidia-smi is here: the sampler would use it")
    with gpucheck.BusySampler() as sampler:
        pass
    assert sampler.read is None and sampler.samples == [] and "NVML unavailable" in sampler.why, sampler.why


def test_the_script_parses_and_passes_shellcheck():
    script = REPO / "scripts" / "gpu-check.sh"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    r = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
