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
    run_nb("20_reproduce.ipynb", d, pool="tiny", seeds=2, steps=4, log_every=2, eval_every=2, output_dir=str(d))
    return d


def test_reproduce_writes_every_file(tiny_run):
    for f in ["config.json", "results.csv", "results.md", "accuracies.csv", "lambdas.csv", "layers.csv", "eval_log.csv", "20_reproduce.ipynb"]:
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
    assert "lw_adamerging" in cfg["adaptation_profile"] and cfg["wall_s"] > 0 and cfg["peak_rss_gib"] > 0
    phases = {r["phase"]: r for r in cfg["phases"]}
    assert {"pool", "task vectors", "TIES", "adaptation", "evaluation", "merges", "tables", "figures"} <= set(phases)
    assert phases["task vectors"]["calls"] == 1 and phases["TIES"]["calls"] == 1  # once per run, whatever the number of rows
    for m in ["tw_adamerging", "tw_adamergingpp", "lw_adamerging", "lw_adamergingpp"]:
        assert (tiny_run / "lambdas" / f"{m}.safetensors").stat().st_size > 0
    for f in ["task_trajectories", "layer_heatmaps", "results", "accuracy_vs_step"]:
        for ext in ("png", "pdf"): assert (tiny_run / "figures" / f"{f}.{ext}").stat().st_size > 0


def test_figures_notebook_refuses_a_changed_run(tiny_run, tmp_path):
    import shutil
    run = tmp_path / "run"; shutil.copytree(tiny_run, run)
    (run / "lambdas.csv").write_text((run / "lambdas.csv").read_text().replace(",0.3", ",0.9", 1))
    with pytest.raises(pm.PapermillExecutionError) as e:
        run_nb("21_figures.ipynb", tmp_path / "f", run_dir=str(run), output_dir=str(tmp_path / "figs"))
    assert "lambdas.csv is missing or changed since the run wrote it" in str(e.value.evalue)


def test_figures_notebook(tiny_run, tmp_path):
    run_nb("21_figures.ipynb", tmp_path, run_dir=str(tiny_run), output_dir=str(tmp_path / "figs"), prefix="tiny_")
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
    (dict(pool="vit-b-99"), "pool='vit-b-99': pool must be one of 'vit-b-32-ta8'"),
    (dict(pool="vit-b-32-ta8"), "pool 'vit-b-32-ta8' needs checkpoint_root"),
    (dict(pool="vit-b-32-ta8", checkpoint_root="/no/such/folder"), "checkpoint_root='/no/such/folder' is not a folder"),
    (dict(pool="tiny", methods="adamerging"), "methods='adamerging': methods must be 'all' or a comma-separated list"),
    (dict(pool="tiny", recipe="papr"), "recipe='papr': recipe must be one of 'paper', 'fusionbench'"),
    (dict(pool="tiny", steps=-5), "steps=-5: steps must be a finite number >= 0"),
    (dict(pool="tiny", batch_size=-4), "batch_size=-4: batch_size must be a finite number >= 0"),
    (dict(pool="tiny", seeds=0), "seeds=0: seeds must be a finite number >= 1"),
    (dict(pool="tiny", lr=float("nan")), "lr=nan: lr must be a finite number >= 0"),
    (dict(pool="tiny", steps=2.5), "steps=2.5: steps must be a int"),
    (dict(pool="mini", checkpoint_root="/tmp"), "checkpoint_root='/tmp': pool 'mini' does not use checkpoint_root"),
    (dict(pool="tiny", data_source="ftp"), "data_source='ftp': data_source must be one of '', 'hf', 'disk', 'folder'"),
    (dict(pool="tiny", eval_every=3, log_every=2), "eval_every=3: eval_every must be a multiple of log_every=2"),
])
def test_bad_parameter_stops_in_first_cell_using_it(tmp_path, params, message):
    with pytest.raises(pm.PapermillExecutionError) as e:
        run_nb("20_reproduce.ipynb", tmp_path, output_dir=str(tmp_path / "out"), **params)
    assert message in str(e.value.evalue)
    # code cells: 0 parameters, 1 injected parameters, 2 the first cell that uses them
    assert failing_cell(tmp_path / "20_reproduce.ipynb") == 2
    assert not (tmp_path / "out").exists()  # nothing was claimed, loaded or written


def test_parameters_cells_match_their_declarations():
    "The parameters cell of each notebook is the declaration in `runs`: same names, order, types, defaults and comments."
    from adamerging_nb.runs import REPRODUCE, FIGURES
    for name, spec in (("20_reproduce.ipynb", REPRODUCE), ("21_figures.ipynb", FIGURES)):
        nb = json.loads((NBS / name).read_text())
        cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
        lines = "".join(cell["source"]).splitlines()
        want = [f"{k}: {p.type.__name__} = {json.dumps(p.default) if isinstance(p.default, str) else repr(p.default)}  # {p.help}" for k, p in spec.items()]
        assert lines == want, name


def test_two_runs_into_one_folder_at_once(tmp_path):
    "Started together into one folder: one claims it, the other stops in its first cell, naming the first."
    import subprocess, sys
    out = tmp_path / "run"
    cmd = lambda i: [sys.executable, "-m", "papermill", str(NBS / "20_reproduce.ipynb"), str(tmp_path / f"nb{i}.ipynb"), "-p", "pool", "tiny",
                     "-p", "steps", "2", "-p", "seeds", "1", "-p", "methods", "pretrained,tw_adamerging", "-r", "output_dir", str(out), "--no-progress-bar"]
    procs = [subprocess.Popen(cmd(i), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0 and codes[1] != 0, outs
    loser = outs[[p.returncode for p in procs].index(codes[1])]
    assert "is in use by another run (pid" in loser, loser[-2000:]
    assert json.loads((out / "config.json").read_text())["params"]["steps"] == 2


def test_overwrite_starts_from_an_empty_folder(tmp_path):
    out = tmp_path / "run"
    run_nb("20_reproduce.ipynb", tmp_path / "a", pool="tiny", steps=2, seeds=1, methods="pretrained,tw_adamerging,lw_adamerging", output_dir=str(out))
    assert (out / "lambdas" / "lw_adamerging.safetensors").exists()
    with pytest.raises(pm.PapermillExecutionError) as e:
        run_nb("20_reproduce.ipynb", tmp_path / "b", pool="tiny", steps=3, seeds=1, methods="pretrained,tw_adamerging", output_dir=str(out))
    assert "already holds a different run (parameters differ: ['methods', 'steps'])" in str(e.value.evalue)
    nb = run_nb("20_reproduce.ipynb", tmp_path / "c", pool="tiny", steps=3, seeds=1, methods="pretrained,tw_adamerging", output_dir=str(out), overwrite=True)
    said = "".join(o.get("text", "") for c in nb["cells"] for o in c.get("outputs", []))
    assert "overwrite: moved the earlier run of" in said
    assert not (out / "lambdas" / "lw_adamerging.safetensors").exists()  # nothing of the earlier run beside the new one
    assert sorted(json.loads((out / "config.json").read_text())["files"]) == sorted(
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name not in ("config.json", "run.json", ".lock")
        and p.parent.name != "figures" and p.parent.name != "checkpoints")


def test_figures_notebook_missing_run(tmp_path):
    with pytest.raises(pm.PapermillExecutionError) as e:
        run_nb("21_figures.ipynb", tmp_path, run_dir=str(tmp_path / "nothing"), output_dir=str(tmp_path / "f"))
    assert "holds no finished run (no config.json)" in str(e.value.evalue)
