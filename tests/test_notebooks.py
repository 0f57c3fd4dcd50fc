"""Every notebook is stored clean, opens in Colab on a GPU, and starts with the standard set-up cell."""
import json
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import nbmeta  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TOC = (ROOT / "_toc.yml").read_text()


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_clean_and_colab_ready(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code), "outputs must be stripped"
    assert nb["metadata"]["accelerator"] == "GPU" and "colab" in nb["metadata"]
    assert "".join(code[0]["source"]) == nbmeta.setup_source(), "run tools/nbmeta.py on it"
    assert f"notebooks/{path.stem}" in TOC, "every notebook is a chapter of the book"
    titles = [l for c in nb["cells"] if c["cell_type"] == "markdown"
              for l in "".join(c["source"]).splitlines() if re.match(r"# ", l)]
    assert len(titles) == 1, f"one '# ' title per chapter, found {titles}"


def test_install_cell_and_colab_button_name_one_repository():
    config = (ROOT / "_config.yml").read_text()
    url = re.search(r"^\s+url:\s*(\S+)", config, re.M).group(1)
    assert f"git+{url}@" in nbmeta.setup_source()
    assert "colab_url" in config and "--no-deps" in nbmeta.setup_source()


def test_install_cell_pins_the_books_own_release():
    """The set-up cell installs the tag v<flashlib.__version__>, the version pyproject.toml builds the wheel with."""
    import tomllib

    import flashlib
    assert nbmeta.release_tag() == f"v{flashlib.__version__}"
    assert f'@v{flashlib.__version__}"' in nbmeta.setup_source()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "flashlib.__version__"}


def test_readme_has_a_colab_badge_per_chapter():
    """README's badges open each notebook at the address of the book's Colab button (python tools/nbmeta.py --badges)."""
    readme = (ROOT / "README.md").read_text()
    assert len(nbmeta.colab_badges()) == len(NOTEBOOKS)
    for line in nbmeta.colab_badges():
        assert line in readme, f"README lacks: {line}"
    assert nbmeta.colab_url("notebooks/x.ipynb").startswith("https://colab.research.google.com/github/")
