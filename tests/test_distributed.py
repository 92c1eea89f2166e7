"""Distributed runs on the CPU: two gloo processes against one process, and a process killed mid-run.

Each run is `python -m adamerging_nb.cli reproduce` on the `tiny` pool (three tasks), started here with the
environment torchrun would give it (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so that the test can kill one
process by its pid.
"""
import os
os.environ["HF_HUB_OFFLINE"] = "1"
import signal, socket, subprocess, sys, time
from pathlib import Path
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--pool", "tiny", "--methods", "pretrained,task_arithmetic,tw_adamerging,lw_adamerging", "--seeds", "1", "--device", "cpu",
        "--log_every", "2", "--batch_size", "4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def launch(out: Path, world: int, extra=(), port: int | None = None) -> list[subprocess.Popen]:
    "Start `world` processes of one run, as torchrun would (one process: no distributed environment at all)."
    port, procs = port or free_port(), []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        if world > 1: env |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "adamerging_nb.cli", "reproduce", *ARGS, "--output_dir", str(out), *extra],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs, timeout=600) -> list[tuple[int, str]]:
    return [(p.wait(timeout), p.stdout.read()) for p in procs]


def lambdas(run: Path, method: str) -> torch.Tensor: return load_file(run / "lambdas" / f"{method}.safetensors")["lambdas"]


def test_two_processes_give_the_single_process_lambdas_and_table(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    (rc1, log1), = finish(launch(one, 1, ["--steps", "6"]))
    assert rc1 == 0, log1
    done = finish(launch(two, 2, ["--steps", "6"]))
    assert [rc for rc, _ in done] == [0, 0], done
    for m in ("tw_adamerging", "lw_adamerging"):
        a, b = lambdas(one, m), lambdas(two, m)
        assert (a - b).abs().max() < 1e-6, (m, (a - b).abs().max())
        assert not torch.equal(b, torch.full_like(b, 0.3))  # λ moved
    r1, r2 = pd.read_csv(one / "results.csv"), pd.read_csv(two / "results.csv")
    assert list(r1.method) == list(r2.method)
    pd.testing.assert_frame_equal(r1, r2, atol=1e-9)  # every row, every task: accuracies are counts of the same predictions
    assert not (two / "checkpoints").exists() or all(p.stat().st_size for p in (two / "checkpoints").iterdir())
    assert '"processes": 2' in (two / "config.json").read_text()


def test_more_processes_than_tasks_is_refused(tmp_path):
    done = finish(launch(tmp_path / "run", 4, ["--steps", "2"]), timeout=300)
    assert all(rc != 0 for rc, _ in done)
    assert "4 processes for 3 tasks" in done[0][1], done[0][1]


def test_a_killed_process_stops_the_other_and_the_run_resumes(tmp_path):
    run, whole = tmp_path / "run", tmp_path / "whole"
    extra = ["--steps", "1000", "--checkpoint_every", "20", "--timeout_s", "30", "--methods", "lw_adamerging"]
    procs = launch(run, 2, extra)
    ck = run / "checkpoints" / "lw_adamerging-seed0.safetensors"
    t0 = time.time()
    while not ck.exists() and time.time() - t0 < 300: time.sleep(0.2)
    assert ck.exists(), "no checkpoint was written"
    time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    t1 = time.time()
    rc0, log0 = procs[0].wait(120), procs[0].stdout.read()
    assert rc0 != 0 and time.time() - t1 < 60, log0  # an error, well within the collective timeout, not a hang
    assert "a process of the run stopped" in log0, log0
    procs[1].wait()
    resumed = finish(launch(run, 2, extra + ["--resume", "true"]))
    assert [rc for rc, _ in resumed] == [0, 0], resumed
    assert [rc for rc, _ in finish(launch(whole, 2, extra))] == [0, 0]
    assert torch.equal(lambdas(run, "lw_adamerging"), lambdas(whole, "lw_adamerging"))  # resumed = uninterrupted, bit for bit
