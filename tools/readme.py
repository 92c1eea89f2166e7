"""Write README.md from nbs/index.ipynb (nbdev's convention: the home page is the README).

Markdown cells are copied as they are; code cells become Python blocks followed by their saved
outputs (text as a plain block, Markdown as Markdown). Cells marked `#| hide` are left out, and
links into `../` (from `nbs/`) are made relative to the repository root.

    python tools/readme.py          # write README.md
    python tools/readme.py --check  # fail if README.md differs from what index.ipynb gives
"""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _text(x) -> str: return "".join(x) if isinstance(x, list) else x


def readme(nb_path: Path = ROOT / "nbs" / "index.ipynb") -> str:
    "The README's text from the home-page notebook."
    parts = []
    for c in json.loads(nb_path.read_text())["cells"]:
        src = _text(c["source"]).strip("\n")
        if c["cell_type"] == "raw" or src.startswith("#| hide"): continue
        if c["cell_type"] == "markdown": parts.append(src); continue
        code = "\n".join(l for l in src.splitlines() if not l.startswith("#|")).strip("\n")
        if not re.search(r"^#\| *echo: *false", src, re.M): parts.append(f"```python\n{code}\n```")
        for o in c.get("outputs", []):
            if o["output_type"] == "stream" and o["name"] == "stdout": parts.append("```\n" + _text(o["text"]).rstrip("\n") + "\n```")
            elif o["output_type"] in ("display_data", "execute_result"):
                d = o["data"]
                if "text/markdown" in d: parts.append(_text(d["text/markdown"]).strip("\n"))
                elif "text/plain" in d: parts.append("```\n" + _text(d["text/plain"]).rstrip("\n") + "\n```")
    text = "\n\n".join(parts) + "\n"
    return re.sub(r"\]\(\.\./", "](", text)  # ../figures/x.png from nbs/ is figures/x.png from the root


if __name__ == "__main__":
    want = readme()
    if "--check" in sys.argv:
        if (ROOT / "README.md").read_text() != want:
            sys.exit("README.md is not what nbs/index.ipynb gives: run `make readme` (python tools/readme.py) and commit it")
    else:
        tmp = ROOT / "README.md.tmp"; tmp.write_text(want); tmp.replace(ROOT / "README.md")
