"""A local preview of the docs site without Quarto (`make docs-html`).

Renders the notebooks that `nbdev_proc_nbs` processed into `_proc/` (hidden cells gone, `show_doc`
run) to HTML with nbconvert, one page per notebook, each with a navigation bar, into `_docs_html/`
(`index.html` is the home page). Quarto builds the real site from the same `_proc/` files.

    python tools/docs_html.py [--mathjax URL]   # MathJax from its CDN unless a URL or local path is given
"""
import argparse, html, re
from pathlib import Path
import nbformat, yaml
from nbconvert import HTMLExporter
from nbconvert.preprocessors import TagRemovePreprocessor

ROOT = Path(__file__).resolve().parents[1]
PROC, OUT = ROOT / "_proc", ROOT / "_docs_html"


def _frontmatter(nb) -> dict:
    "The Quarto frontmatter that nbdev's processing put in the first raw cell (title, description, ...)."
    for c in nb.cells:
        if c.cell_type == "raw" and c.source.lstrip().startswith("---"):
            return yaml.safe_load(c.source.strip().strip("-")) or {}
    return {}


def _title(nb, fallback: str) -> str:
    "The page title: the frontmatter's, else the first heading."
    if t := _frontmatter(nb).get("title"): return str(t)
    for c in nb.cells:
        if c.cell_type == "markdown" and (m := re.search(r"^#\s+(.+)$", c.source, re.M)): return m.group(1).strip()
    return fallback


def _as_quarto_shows(nb):
    "What Quarto would show: the title and description as a heading, no input of `echo: false` cells, no Quarto-only attributes."
    fm = _frontmatter(nb)
    for c in nb.cells:
        if c.cell_type == "code" and re.search(r"^#\|\s*echo:\s*false", c.source, re.M): c.metadata.setdefault("tags", []).append("remove_input")
        for o in c.get("outputs", []):
            if "text/markdown" in o.get("data", {}): o["data"]["text/markdown"] = re.sub(r"\{target=[^}]*\}", "", o["data"]["text/markdown"])
    nb.cells = [c for c in nb.cells if c.cell_type != "raw"]
    if fm.get("title"):
        desc = f"\n\n> {fm['description']}" if fm.get("description") else ""
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(f"# {fm['title']}{desc}"))
    return nb


def build(mathjax: str | None = None) -> list[Path]:
    "Write one HTML page per processed notebook and return them."
    sources = sorted(PROC.glob("*.ipynb"), key=lambda p: (p.name != "index.ipynb", p.name))
    if not sources: raise SystemExit(f"no notebooks in {PROC}: run nbdev_proc_nbs first (make docs-html does)")
    nbs = {p: nbformat.read(p, as_version=4) for p in sources}
    pages = [(p.with_suffix(".html").name, _title(nb, p.stem)) for p, nb in nbs.items()]
    nav = " · ".join(f"[{html.escape(t)}]({f})" for f, t in pages)
    exporter = HTMLExporter(template_name="lab")
    exporter.register_preprocessor(TagRemovePreprocessor(remove_input_tags={"remove_input"}, enabled=True), enabled=True)
    if mathjax: exporter.mathjax_url = mathjax
    OUT.mkdir(exist_ok=True)
    written = []
    for (p, nb), (name, title) in zip(nbs.items(), pages):
        nb = _as_quarto_shows(nb)
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(f"<small>{nav}</small>"))
        nb.metadata["title"] = title
        body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
        (OUT / name).write_text(body)
        written.append(OUT / name)
    return written


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mathjax", default=None, help="MathJax URL or path (default: nbconvert's CDN)")
    files = build(ap.parse_args().mathjax)
    print(f"{len(files)} pages in {OUT}; open {OUT / 'index.html'}")
