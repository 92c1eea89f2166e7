"""Figure functions on real file round-trips: a run's lambdas.csv, atomic and reproducible saving, the committed figures."""
import matplotlib

matplotlib.use("Agg")

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from adamerging_nb.plots import (lambda_matrix, draw_official_figures, plot_layer_heatmaps,
                                 plot_task_trajectories, save_figure, task_trajectory_table)

FIGURES = Path(__file__).resolve().parents[1] / "figures"


def run_lambdas(tmp_path: Path) -> Path:
    "A lambdas.csv as a run writes it: every method in one long file, task-wise rows with layer -1."
    tasks, rows = ["a", "b", "c"], []
    for step in (0, 10, 20):
        for k, t in enumerate(tasks):
            for m in ("tw_adamerging", "tw_adamergingpp"):
                rows.append(dict(method=m, step=step, layer=-1, task=t, **{"lambda": 0.3 + 0.01 * step * (k + 1)}))
            for m in ("lw_adamerging", "lw_adamergingpp"):
                rows += [dict(method=m, step=step, layer=l, task=t, **{"lambda": 0.3 + 0.001 * step * l}) for l in range(5)]
    path = tmp_path / "lambdas.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_run_lambdas_csv_round_trip(tmp_path):
    df = pd.read_csv(run_lambdas(tmp_path))
    t = task_trajectory_table(df, "tw_adamergingpp")
    assert list(t.columns) == ["a", "b", "c"] and list(t.index) == [0, 10, 20]
    m = lambda_matrix(df, "lw_adamerging")  # the last step of the trajectory
    np.testing.assert_allclose(m.loc["a"].to_numpy(), 0.3 + 0.02 * np.arange(5))
    fig = plot_task_trajectories(df, source="mini")
    assert [line.get_ydata()[0] for line in fig.axes[0].get_lines()] == [0.3] * 3
    plt.close(fig)
    names = ["conv1.weight", "ln_pre.weight", "transformer.resblocks.0.ln_1.weight", "transformer.resblocks.0.ln_1.bias", "ln_post.weight"]
    fig = plot_layer_heatmaps(df, layer_names=names, source="mini")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["stem", "0", "post"]
    plt.close(fig)


def test_save_figure_is_atomic(tmp_path):
    fig = plt.figure()
    fig.add_subplot().plot([0, 1], [0, 1])
    old = save_figure(fig, tmp_path / "f")
    before = [p.read_bytes() for p in old]

    def broken(target, **kw):  # writes half a file, then fails
        target.write(b"half") if hasattr(target, "write") else Path(target).write_bytes(b"half")
        raise OSError("disk full")

    fig.savefig = broken
    with pytest.raises(OSError, match="disk full"):
        save_figure(fig, tmp_path / "f")
    assert [p.read_bytes() for p in old] == before  # the previous figures are untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.pdf", "f.png"]  # and no temporary file is left
    plt.close(fig)


def test_official_figures_are_reproducible(tmp_path):
    files = draw_official_figures(tmp_path / "a") + draw_official_figures(tmp_path / "b")
    assert len(files) == 12 and all(p.stat().st_size > 10_000 for p in files)
    for p in files[:6]:
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes(), p.name  # same data, same bytes


def test_committed_official_figures_are_documented():
    readme = (FIGURES / "README.md").read_text()
    for stem in ("official_task_trajectories", "official_layer_heatmaps", "official_accuracy_vs_step"):
        for ext in ("png", "pdf"):
            assert (FIGURES / f"{stem}.{ext}").stat().st_size > 10_000
        assert stem in readme


def test_results_bars_read_a_runs_results_table():
    evaluate = pytest.importorskip("adamerging_nb.evaluate")
    from adamerging_nb.plots import plot_results_bars
    from adamerging_nb.reference import TA8
    acc = {m: {t: 0.5 + 0.01 * i for i, t in enumerate(TA8)} for m in ("task_arithmetic", "tw_adamerging")}
    table = evaluate.results_table(acc)  # what a run writes as results.csv: wide, with paper_* and diff_* columns
    fig = plot_results_bars(table, per_task=True, source="test")
    ours = [p.get_height() for p in fig.axes[0].patches][: len(table)]
    measured = table.set_index("method")["avg"]
    assert np.allclose([h for h in ours if np.isfinite(h)], measured.dropna().to_numpy())
    assert sum(ax.axison for ax in fig.axes) == 9
    plt.close(fig)
