"""Run the notebooks in nbs/ in place and keep the outputs of their examples (`make outputs`).

Cells are skipped exactly as `nbdev_test` skips them (`#| eval: false`, and the `gpu` and `slow` flags),
and a skipped cell keeps no output. Figures are saved as PNG, progress bars are off. The papermill
notebooks (20_reproduce, 21_figures) are left alone: their outputs belong to runs.

    python tools/outputs.py [NOTEBOOK ...]   # default: every notebook of nbs/ but the papermill ones
"""
import os, sys, time
from pathlib import Path
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from fastcore.xtras import working_directory
from nbdev.frontmatter import FrontmatterProc
from nbdev.process import NBProcessor

ROOT = Path(__file__).resolve().parents[1]
SKIP_FLAGS = {"gpu", "slow"}
PAPERMILL = {"20_reproduce.ipynb", "21_figures.ipynb"}


def skipped(cell) -> bool:
    "Whether `nbdev_test` would leave this cell out."
    if cell.cell_type != "code": return True
    d = getattr(cell, "directives_", {}) or {}
    return d.get("eval:", [""])[0].lower() == "false" or bool(SKIP_FLAGS & d.keys())


def run(fn: Path):
    "Execute `fn` as nbdev_test does and write it back with the outputs of the cells that ran."
    nb = NBProcessor(fn, procs=FrontmatterProc, process=True).nb
    shell = CaptureShell(fn, mpl_format="png")
    with working_directory(fn.parent): shell.run_all(nb, exc_stop=True, preproc=skipped)
    ran = {c.idx_: c for c in nb.cells if not skipped(c)}
    out = read_nb(fn)
    for i, c in enumerate(out.cells):
        if c.cell_type != "code": continue
        c.outputs = list(ran[i].get("outputs", [])) if i in ran else []
        c.execution_count = None
    write_nb(out, fn)


if __name__ == "__main__":
    names = sys.argv[1:] or sorted(p.name for p in (ROOT / "nbs").glob("*.ipynb") if p.name not in PAPERMILL)
    for n in names:
        t0 = time.perf_counter()
        run(ROOT / "nbs" / n)
        print(f"{n}: {time.perf_counter() - t0:.0f} s", flush=True)
