"""The house rules of the package, checked on its files: one-way imports in the README's module order, no imports hidden
in function bodies, every module importable on its own, every export cell followed by the cell that shows or tests it,
and one name for λ."""
import ast, json, re, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "adamerging_nb"


def module_order() -> list[str]:
    "The modules of the README's 'What is here' table, top to bottom."
    text = (ROOT / "README.md").read_text()
    section = text.split("## What is here", 1)[1].split("\n## ", 1)[0]
    return [m for row in section.splitlines() if row.startswith("|") for m in re.findall(r"`([a-z_]+)`", row.split("|")[2])]


def package_imports(tree: ast.AST) -> list[tuple[ast.stmt, str]]:
    "Every import of a module of this package in `tree`, with the module's name."
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1: out += [(node, node.module or a.name) for a in node.names] if node.module is None else [(node, node.module)]
            elif (node.module or "").startswith("adamerging_nb."): out.append((node, node.module.split(".")[1]))
            elif node.module == "adamerging_nb": out += [(node, a.name) for a in node.names if (PKG / f"{a.name}.py").exists()]
        elif isinstance(node, ast.Import):
            out += [(node, a.name.split(".")[1]) for a in node.names if a.name.startswith("adamerging_nb.")]
    return out


def test_the_readme_lists_every_module_once():
    modules = module_order()
    files = sorted(p.stem for p in PKG.glob("*.py") if not p.stem.startswith("_"))
    assert sorted(modules) == files and len(set(modules)) == len(modules), (modules, files)


@pytest.mark.parametrize("module", sorted(p.stem for p in PKG.glob("*.py") if not p.stem.startswith("_")))
def test_imports_run_one_way(module):
    "A module imports only modules above it in the README's list, and never inside a function body."
    order = module_order()
    tree = ast.parse((PKG / f"{module}.py").read_text())
    top_level = {id(n) for n in tree.body}
    for node, name in package_imports(tree):
        assert id(node) in top_level, f"{module}.py line {node.lineno}: imports {name} inside a function or block"
        assert order.index(name) < order.index(module), f"{module}.py imports {name}, which comes after it in the README's list"


def test_each_module_imports_on_its_own_in_order():
    for m in module_order():
        r = subprocess.run([sys.executable, "-c", f"import adamerging_nb.{m}"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, f"import adamerging_nb.{m} alone fails:\n{r.stderr[-2000:]}"


def library_notebooks():
    for nb in sorted((ROOT / "nbs").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        if any("".join(c["source"]).startswith("#| default_exp") for c in cells): yield nb, cells


def test_every_export_cell_is_followed_by_the_cell_that_shows_or_tests_it():
    missing = []
    for nb, cells in library_notebooks():
        for i, c in enumerate(cells):
            body = [l for l in "".join(c["source"]).splitlines()[1:] if l.strip() and not l.strip().startswith("#")]
            if all(re.match(r"(import |from \S+ import )|\s", l) for l in body): continue  # the imports of the notebook
            if c["cell_type"] == "code" and "".join(c["source"]).startswith("#| export"):
                nxt = cells[i + 1] if i + 1 < len(cells) else None
                if nxt is None or nxt["cell_type"] != "code" or "".join(nxt["source"]).startswith(("#| export", "#| hide", "#| eval: false")):
                    first = "".join(c["source"]).splitlines()[1][:60] if len(c["source"]) > 1 else ""
                    missing.append(f"{nb.name} cell {i}: {first}")
    assert not missing, "export cells without a cell that shows or tests them right below:\n" + "\n".join(missing)


def test_lambda_has_one_public_name():
    "λ is `lambdas` in public names; `merge_weight` (FusionBench's name) is the wrappers' parameter."
    old = re.compile(r"\b(save_weights|load_weights|official_merge_weights|official_coefficients|layer_weights|coefficient_matrix|"
                     r"extra_zeros|ties_extra_zeros)\b|\bscaling=|\.weights\b")
    hits = [f"{p.name}:{i + 1}: {l.strip()[:100]}" for p in PKG.glob("*.py") for i, l in enumerate(p.read_text().splitlines()) if old.search(l)]
    assert not hits, "\n".join(hits)


def test_readme_is_what_the_home_page_notebook_gives():
    "README.md is generated from nbs/index.ipynb (`make readme`), never edited by hand."
    import importlib.util
    spec = importlib.util.spec_from_file_location("readme_tool", ROOT / "tools" / "readme.py")
    tool = importlib.util.module_from_spec(spec); spec.loader.exec_module(tool)
    assert (ROOT / "README.md").read_text() == tool.readme(), "run `make readme` and commit README.md"
    text = (ROOT / "README.md").read_text()
    assert text.index("make reproduce") < text.index("## The result") < text.index("## Quick start")
    for fig in ("mini_vs_official_task_trajectories.png", "mini_vs_official_layer_heatmaps.png"):
        assert f"](figures/{fig})" in text and (ROOT / "figures" / fig).stat().st_size > 10_000
