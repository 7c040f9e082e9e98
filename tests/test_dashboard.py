"""The Ray dashboard while a grid runs: it answers on 127.0.0.1, shows the job and the trial actors under
their config names, and nothing the grid started listens beyond the loopback address. Watched during the
session's smoke run (conftest's smoke_watched), which starts the grid as a user does."""
from raybench.cluster import is_loopback
from raybench.experiments import load_experiment

SMOKE = load_experiment("smoke")


def test_dashboard_shows_job_and_trials_and_everything_listens_on_loopback(smoke_watched):
    trials = {t.name for t in SMOKE.trials}
    assert smoke_watched.dashboard_url and smoke_watched.dashboard_url.startswith("http://127.0.0.1:"), \
        smoke_watched.stdout
    assert trials <= smoke_watched.trial_actors, smoke_watched.trial_actors
    assert any(j.get("type") == "DRIVER" and j.get("status") == "RUNNING" for j in smoke_watched.jobs), \
        smoke_watched.jobs
    sockets = smoke_watched.sockets
    assert sockets and all(is_loopback(ip) for _, ip, _ in sockets), sockets
    # per-trial metrics also land as TensorBoard event files under the results folder
    assert {p.parent.name for p in smoke_watched.run_dir.rglob("events.out.tfevents.*")} == trials
