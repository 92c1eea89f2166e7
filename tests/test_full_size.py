"""Both real pools end to end at full model size on the CPU, from stand-ins in the real formats (`make test-full-size`).

Stand-ins written by `python -m adamerging_nb.standins`: Task Arithmetic's pickled ViT-B/32 modules and heads, the
Hugging Face folders of FusionBench's pool, and the eight test sets in Task Arithmetic's folder layouts (3 random
images per task). Then, with short settings: `20_reproduce` on `vit-b-32-ta8` (paper recipe) and on
`vit-b-32-ta8-hf` (fusionbench recipe), `21_figures` on the first, one adaptation step of ViT-B/16 stand-ins, and a
CPU run of the GPU check. Set FULL_SIZE_REPORT to a path to keep the measured phases as JSON.
"""
import json, os, subprocess, sys, time
from pathlib import Path
import pandas as pd
import pytest
import torch

pm = pytest.importorskip("papermill")
pytestmark = pytest.mark.slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")
NBS = Path(__file__).resolve().parents[1] / "nbs"
ROWS = ["pretrained", "individual", "weight_averaging", "task_arithmetic", "ties_merging",
        "tw_adamerging", "tw_adamergingpp", "lw_adamerging", "lw_adamergingpp"]
PHASES = ["pool", "checkpoints", "test sets", "heads", "task vectors", "TIES", "merges", "adaptation", "evaluation", "tables", "figures"]
SHORT = dict(steps=2, batch_size=2, seeds=1, log_every=1, device="cpu", check_size=False, data_source="folder")
REPORT: dict = {}


def run_nb(name, out, **params):
    out.mkdir(parents=True, exist_ok=True)
    return pm.execute_notebook(str(NBS / name), str(out / name), parameters=params, kernel_name="python3", progress_bar=False, cwd=str(out))


def timed(name, fn):
    t0 = time.perf_counter(); out = fn(); REPORT.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    timed("stand-ins", lambda: subprocess.run([sys.executable, "-m", "adamerging_nb.standins", str(d / "standins"), "--hf", "--images", "3"],
                                              check=True, capture_output=True, text=True))
    yield d
    if path := os.environ.get("FULL_SIZE_REPORT"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(REPORT, indent=1))


def check_run(run, pool, recipe):
    from adamerging_nb.runs import read_run  # checks the seal and every file's checksum
    cfg = read_run(run)
    res = pd.read_csv(run / "results.csv")
    measured = res[res.source == "measured"]
    assert sorted(measured.method) == sorted(ROWS)
    assert measured[["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD", "avg"]].notna().all().all()
    lam = pd.read_csv(run / "lambdas.csv")
    assert set(lam.method) == {m for m in ROWS if "adamerging" in m} and set(lam.step) == {0, 1, 2}
    layers = pd.read_csv(run / "layers.csv")
    assert len(layers) == 152 and layers.name.iloc[0] == "class_embedding"  # every floating-point tensor of the ViT-B/32 image tower
    assert lam.query("method == 'lw_adamerging' and step == 0").shape[0] == 8 * 152
    for f in ["task_trajectories", "layer_heatmaps", "results"]:
        assert (run / "figures" / f"{f}.png").stat().st_size > 10_000
    phases = {r["phase"]: r for r in cfg["phases"]}
    assert set(PHASES) <= set(phases), set(PHASES) - set(phases)
    assert phases["task vectors"]["calls"] == 1 and phases["TIES"]["calls"] == 1  # once per run, not once per row
    assert cfg["peak_rss_gib"] < 16, cfg["peak_rss_gib"]  # this machine has 24 GiB
    from adamerging_nb.gpu_check import memory_plan, plan_peaks
    plan = plan_peaks(memory_plan("ViT-B-32", test_images=24, activations_gib=16 * 0.05))["host"]
    assert 0.8 * plan < cfg["peak_rss_gib"] < 1.15 * plan, (cfg["peak_rss_gib"], plan)  # the memory plan holds, and nothing else is kept
    REPORT[pool] = {"recipe": recipe, "wall_s": cfg["wall_s"], "peak_rss_gib": cfg["peak_rss_gib"], "phases": cfg["phases"]}
    return cfg


def test_standins_in_the_real_formats(base):
    root = base / "standins"
    from adamerging_nb.models import read_ta_encoder, read_ta_head, hf_image_encoder
    assert (root / "ViT-B-32" / "zeroshot.pt").stat().st_size > 300e6  # image tower and text-side tensors, float32
    enc = read_ta_encoder(root / "ViT-B-32" / "SVHN" / "finetuned.pt")
    assert sum(p.numel() for p in enc.parameters()) == 87_849_216
    assert read_ta_head(root / "ViT-B-32" / "head_SUN397.pt").shape == (397, 512)
    assert hf_image_encoder(root / "hf" / "clip-vit-base-patch32_gtsrb", projection=enc.proj).proj.shape == (768, 512)
    assert len(list((root / "data" / "dtd" / "test").iterdir())) == 47


def test_vit_b_32_ta8_paper_recipe(base):
    run = base / "ta8"
    timed("vit-b-32-ta8", lambda: run_nb("20_reproduce.ipynb", run, pool="vit-b-32-ta8", recipe="paper", checkpoint_root=str(base / "standins"),
                                         data_root=str(base / "standins" / "data"), cache_dir=str(base / "run-cache"), output_dir=str(run), **SHORT))
    check_run(run, "vit-b-32-ta8", "paper")


def test_vit_b_32_ta8_hf_fusionbench_recipe(base):
    run = base / "ta8-hf"
    timed("vit-b-32-ta8-hf", lambda: run_nb("20_reproduce.ipynb", run, pool="vit-b-32-ta8-hf", recipe="fusionbench",
                                            checkpoint_root=str(base / "standins" / "hf"), data_root=str(base / "standins" / "data"),
                                            cache_dir=str(base / "run-cache"), output_dir=str(run), **SHORT))
    cfg = check_run(run, "vit-b-32-ta8-hf", "fusionbench")
    assert (base / "run-cache" / "heads").is_dir() and {r["phase"] for r in cfg["phases"]} >= {"heads"}  # built from the text tower, cached


def test_figures_of_the_full_size_run(base):
    if not (base / "ta8" / "config.json").exists(): pytest.skip("needs the vit-b-32-ta8 run")
    out = base / "figs"
    timed("21_figures", lambda: run_nb("21_figures.ipynb", out, run_dir=str(base / "ta8"), output_dir=str(out), prefix="ta8_"))
    for f in ["task_trajectories", "layer_heatmaps"]:
        assert (out / f"ta8_{f}.png").stat().st_size > 10_000 and (out / f"ta8_{f}.pdf").stat().st_size > 5_000


def test_vit_b_16_one_adaptation_step(base):
    from adamerging_nb.standins import write_standins
    from adamerging_nb.models import ta8_pool
    from adamerging_nb.methods import merge_pool
    from adamerging_nb.phases import PhaseLog, recording
    root = base / "b16"
    write_standins(root, "ViT-B-16", images=2, log=lambda s: None)
    with recording(PhaseLog()) as log:
        pool = ta8_pool(root, "ViT-B-16", data_source="folder", data_root=root / "data", check_size=False)
        _, res = merge_pool(pool, "lw_adamerging", steps=1, batch_size=1, batches_per_task=1, progress=False)
    assert sum(p.numel() for p in pool.pretrained.parameters()) == 86_192_640 and pool.pretrained.conv1.kernel_size == (16, 16)
    assert res.lambdas.shape == (8, 152) and (res.lambdas - 0.3).abs().max() > 0  # one Adam step moved λ
    REPORT["ViT-B-16 one step"] = {"phases": log.as_rows()}


def test_gpu_check_on_the_cpu(base):
    out = base / "gpu-check"  # reuses the ViT-B/32 stand-ins (work/standins)
    p = timed("gpu_check", lambda: subprocess.run(
        [sys.executable, "-m", "adamerging_nb.gpu_check", str(out), "--work", str(base), "--device", "cpu", "--steps", "2", "--seeds", "1",
         "--batch_size", "2", "--cache_images", "3", "--bench_steps", "2", "--methods", "pretrained,ties_merging,lw_adamergingpp"],
        capture_output=True, text=True))
    assert p.returncode == 0, p.stderr[-3000:]
    from adamerging_nb.files import read_sealed_json
    rep = read_sealed_json(out / "gpu_check.json")
    assert rep["complete"] and list(rep["stages"]) == ["stand-ins", "table", "adamerging-bench", "report"]
    assert rep["stages"]["stand-ins"]["seconds"] < 60  # found, not written again (bar the small caches)
    assert list(rep["stages"]["table"]["average"]) == ["pretrained", "ties_merging", "lw_adamergingpp"]
    assert "engine fp32" in rep["stages"]["adamerging-bench"]["results"]["recipes"][0]["variants"]
    REPORT["gpu_check on the CPU"] = {k: v["seconds"] for k, v in rep["stages"].items()}
