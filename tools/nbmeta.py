"""Normalise notebooks for the repository: strip outputs, set Colab GPU metadata, write the set-up cell, give every
cell an id.
Run it on every notebook you add or edit, before committing (tests/test_notebooks.py checks the result).

    python tools/nbmeta.py notebooks/*.ipynb
"""
import hashlib
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETUP_MARK = "# Set-up"
# The set-up cell installs the book's own release: the tag v<flashlib.__version__> of the one repository URL in
# _config.yml. --no-deps: Colab has flashlib's dependencies (pyproject.toml says which; tests/test_colab.py checks).
SETUP = """# Set-up. In Colab: install flashlib (Colab has torch, CuPy, Numba).
# Without a GPU, flashlib.setup() selects Numba's CUDA simulator
# and the GPU figures come from recorded runs.
import sys
if "google.colab" in sys.modules:
    %pip install -q --no-deps "flashlib @ git+{url}@{tag}"
import flashlib
GPU = flashlib.setup()"""

META = {
    "accelerator": "GPU",
    "colab": {"provenance": [], "gpuType": "T4"},
    "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
    "language_info": {"name": "python"},
}


def repository_url():
    return re.search(r"^\s+url:\s*(\S+)", (ROOT / "_config.yml").read_text(), re.M).group(1)


def repository_branch():
    return re.search(r"^\s+branch:\s*(\S+)", (ROOT / "_config.yml").read_text(), re.M).group(1)


def colab_url(path):
    """The address the book's Colab launch button opens for notebook `path` (relative to the repository)."""
    owner_repo = repository_url().removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{owner_repo}/blob/{repository_branch()}/{path}"


def colab_badges():
    """README lines: one 'Open in Colab' badge per chapter notebook (python tools/nbmeta.py --badges prints them)."""
    lines = []
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        title = next(l[2:] for c in cells if c["cell_type"] == "markdown"
                     for l in "".join(c["source"]).splitlines() if l.startswith("# "))
        lines.append(f"| {nb.stem[:2]} | {title} | [![Open In Colab](https://colab.research.google.com/assets/"
                     f"colab-badge.svg)]({colab_url(nb.relative_to(ROOT).as_posix())}) |")
    return lines


def release_tag():
    """'v' + flashlib.__version__, read from flashlib/__init__.py (the tag a release of the book carries)."""
    return "v" + re.search(r'^__version__ = "([^"]+)"', (ROOT / "flashlib" / "__init__.py").read_text(), re.M).group(1)


def setup_source():
    return SETUP.format(url=repository_url(), tag=release_tag())


def normalise(path):
    nb = json.load(open(path))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    cell = {"cell_type": "code", "id": "setup", "metadata": {}, "source": setup_source(), "outputs": [], "execution_count": None}
    if code and "".join(code[0]["source"]).startswith(SETUP_MARK):
        code[0]["source"] = cell["source"]
    else:
        first_code = nb["cells"].index(code[0]) if code else len(nb["cells"])
        nb["cells"].insert(min(first_code, 1), cell)
    ids = {c.get("id") for c in nb["cells"]}
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] == "code":
            c["outputs"], c["execution_count"] = [], None
        c.get("metadata", {}).pop("execution", None)
        if not c.get("id"):  # nbformat 4.5 wants an id on every cell: one from the cell's text, unique in the notebook
            n, new = 0, None
            while new is None or new in ids:
                new, n = hashlib.sha1(f"{i} {n} {''.join(c['source'])}".encode()).hexdigest()[:8], n + 1
            c["id"] = new
            ids.add(new)
    nb["metadata"] = {**{k: v for k, v in nb.get("metadata", {}).items() if k not in ("widgets",)}, **META}
    json.dump(nb, open(path, "w"), indent=1, ensure_ascii=False)
    open(path, "a").write("\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--badges"]:
        print("\n".join(colab_badges()))
    for p in sys.argv[1:]:
        if p != "--badges":
            normalise(p)
