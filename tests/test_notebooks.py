"Papermill runs of the reproduction and figures notebooks on the tiny pool, and their bad-parameter errors."
import json, os
from pathlib import Path
import pandas as pd
import pytest

pm = pytest.importorskip("papermill")
NBS = Path(__file__).resolve().parents[1] / "nbs"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_nb(name, out, **params):
    out.mkdir(parents=True, exist_ok=True)
    return pm.execute_notebook(str(NBS / name), str(out / name), parameters=params, kernel_name="python3", progress_bar=False, cwd=str(out))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    run_nb("11_reproduce.ipynb", d, pool="tiny", seeds=2, steps=4, log_every=2, eval_every=2, output_dir=str(d))
    return d


def test_reproduce_writes_every_file(tiny_run):
    for f in ["config.json", "results.csv", "results.md", "accuracies.csv", "lambdas.csv", "layers.csv", "eval_log.csv", "11_reproduce.ipynb"]:
        assert (tiny_run / f).stat().st_size > 0, f
    res = pd.read_csv(tiny_run / "results.csv")
    measured = res[res.source == "measured"]
    assert measured.method.value_counts().max() == 1  # one row per method
    assert {"pretrained", "individual", "weight_averaging", "task_arithmetic", "ties_merging",
            "tw_adamerging", "tw_adamergingpp", "lw_adamerging", "lw_adamergingpp"} <= set(measured.method)
    assert {"task0", "task1", "task2", "avg"} <= set(res.columns)
    lam = pd.read_csv(tiny_run / "lambdas.csv")
    assert list(lam.columns) == ["method", "step", "layer", "task", "lambda"]
    assert sorted(lam.step.unique()) == [0, 2, 4]
    assert (lam[lam.method.str.startswith("tw")].layer == -1).all()
    n_layers = len(pd.read_csv(tiny_run / "layers.csv"))
    assert lam.query("method == 'lw_adamerging' and step == 0").shape[0] == 3 * n_layers
    acc = pd.read_csv(tiny_run / "accuracies.csv")
    assert acc.accuracy.between(0, 1).all()
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["params"]["pool"] == "tiny" and cfg["seed"] == 0 and "torch" in cfg["versions"]
    assert set(cfg["timings"]) == {"load_pool_s", "methods_s"} and "lw_adamerging" in cfg["adaptation_profile"]
    for m in ["tw_adamerging", "tw_adamergingpp", "lw_adamerging", "lw_adamergingpp"]:
        assert (tiny_run / "weights" / f"{m}.safetensors").stat().st_size > 0
    for f in ["task_trajectories", "layer_heatmaps", "results", "accuracy_vs_step"]:
        for ext in ("png", "pdf"): assert (tiny_run / "figures" / f"{f}.{ext}").stat().st_size > 0


def test_figures_notebook(tiny_run, tmp_path):
    run_nb("12_figures.ipynb", tmp_path, run_dir=str(tiny_run), output_dir=str(tmp_path / "figs"), prefix="tiny_")
    names = {p.name for p in (tmp_path / "figs").iterdir()}
    for stem in ["official_task_trajectories", "official_layer_heatmaps", "official_accuracy_vs_step", "tiny_task_trajectories",
                 "tiny_layer_heatmaps", "tiny_results", "tiny_vs_official_accuracy_vs_step"]:
        assert {f"{stem}.png", f"{stem}.pdf"} <= names, stem
    assert all((tmp_path / "figs" / n).stat().st_size > 0 for n in names)


def failing_cell(err_nb_path):
    nb = json.loads(Path(err_nb_path).read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    return next(i for i, c in enumerate(cells) if any(o.get("output_type") == "error" for o in c.get("outputs", [])))


@pytest.mark.parametrize("params, message", [
    (dict(pool="vit-b-99"), "is not a known pool"),
    (dict(pool="vit-b-32-ta8"), "needs checkpoint_root"),
    (dict(pool="vit-b-32-ta8", checkpoint_root="/no/such/folder"), "is not a folder"),
    (dict(pool="tiny", methods="adamerging"), "unknown methods"),
    (dict(pool="tiny", recipe="papr"), "known recipes"),
])
def test_bad_parameter_stops_in_first_cell_using_it(tmp_path, params, message):
    with pytest.raises(pm.PapermillExecutionError) as e:
        run_nb("11_reproduce.ipynb", tmp_path, output_dir=str(tmp_path / "out"), **params)
    assert message in str(e.value.evalue)
    # code cells: 0 parameters, 1 injected parameters, 2 the first cell that uses them
    assert failing_cell(tmp_path / "11_reproduce.ipynb") == 2
    assert not (tmp_path / "out" / "results.csv").exists()


def test_figures_notebook_missing_run(tmp_path):
    with pytest.raises(pm.PapermillExecutionError) as e:
        run_nb("12_figures.ipynb", tmp_path, run_dir=str(tmp_path / "nothing"), output_dir=str(tmp_path / "f"))
    assert "holds no lambdas.csv" in str(e.value.evalue)
