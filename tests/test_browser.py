"""The built book in a real browser (Chromium through Playwright), as a reader sees it with no network (every
request that is not to the local test server is aborted): pages load without JavaScript errors, printed tables
are tables, formulas are typeset by the book's own MathJax, nothing is wider than the text column of a 1280 px
window, the step-through player advances frame by frame, and every chapter's Colab button points at its notebook.

Needs `make book` first (the HTML in _build/html; FLASHLIB_BOOK_HTML overrides the folder) and Debian's chromium.
"""
import functools
import http.server
import json
import os
import pathlib
import re
import shutil
import threading
import urllib.parse

import pytest

pytestmark = pytest.mark.browser

ROOT = pathlib.Path(__file__).resolve().parents[1]
HTML = pathlib.Path(os.environ.get("FLASHLIB_BOOK_HTML", ROOT / "_build" / "html"))
EXECUTED = HTML.parent / "jupyter_execute"      # the executed notebooks, outputs included (jupyter-book writes it)
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
HARMLESS = ("Identifier 'THEBE_JS_URL' has already been declared",)
SHOTS = (pathlib.Path("/tmp/stepthrough_1.png"), pathlib.Path("/tmp/stepthrough_2.png"))


def chapter_pages():
    return sorted(p.relative_to(HTML).as_posix() for d in ("notebooks", "book") for p in (HTML / d).glob("*.html"))


def repository():
    url = re.search(r"^\s+url:\s*(\S+)", (ROOT / "_config.yml").read_text(), re.M).group(1)
    return url.rstrip("/").split("github.com/")[1]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    if not (HTML / "index.html").exists():
        pytest.skip(f"no built book at {HTML}: run `make book` first")
    handler = functools.partial(QuietHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (make test does it)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def open_page(browser, url, offsite=None):
    """A page in a 1280 px window with the network cut off: requests to hosts other than 127.0.0.1 are aborted
    (and their URLs appended to offsite). Returns the page and the list its JavaScript errors go to."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    def local_only(route):
        if urllib.parse.urlparse(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            if offsite is not None:
                offsite.append(route.request.url)
            route.abort()
    page.route("**/*", local_only)
    page.goto(url, wait_until="load")
    return page, errors


def test_chapter_pages_load_without_javascript_errors(server, browser):
    pages = chapter_pages()
    assert pages, f"no chapter pages under {HTML}/notebooks or {HTML}/book"
    bad = {}
    for rel in pages:
        page, errors = open_page(browser, f"{server}/{rel}")
        page.wait_for_timeout(200)
        errors = [e for e in errors if not any(h in e for h in HARMLESS)]
        if errors:
            bad[rel] = errors
        page.close()
    assert not bad


def test_stepthrough_player_advances_frame_by_frame(server, browser):
    rel = "notebooks/07_flashattention.html"
    if not (HTML / rel).exists():
        pytest.skip(f"{rel} is not in this build")
    page, errors = open_page(browser, f"{server}/{rel}")
    img = page.locator("img[id^='_anim_img']").first
    player = page.locator(".animation").first
    next_button = page.locator("button[onclick$='.next_frame()']").first
    img.scroll_into_view_if_needed()
    srcs = [img.get_attribute("src")]
    player.screenshot(path=str(SHOTS[0]))
    for _ in range(4):
        next_button.click()
        srcs.append(img.get_attribute("src"))
    player.screenshot(path=str(SHOTS[1]))
    assert all(a != b for a, b in zip(srcs, srcs[1:])), "the frame did not change on a next-frame click"
    assert len(set(srcs)) == len(srcs)
    assert not [e for e in errors if not any(h in e for h in HARMLESS)]
    page.close()


def test_colab_buttons_point_at_the_notebooks(server, browser):
    owner_repo = repository()
    notebooks = [rel for rel in chapter_pages() if rel.startswith("notebooks/")]
    assert notebooks
    for rel in notebooks:
        page, _ = open_page(browser, f"{server}/{rel}")
        hrefs = [a.get_attribute("href") for a in page.locator("a[href*='colab.research.google.com']").all()]
        name = pathlib.PurePosixPath(rel).stem
        expected = f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{name}.ipynb"
        assert expected in hrefs, (rel, hrefs)
        assert (ROOT / "notebooks" / f"{name}.ipynb").exists()
        page.close()


# A Markdown table's separator row, as raw text or after smart quotes turned "---" into "—".
LITERAL_TABLE = re.compile(r"\|\s*:?-{3,}|\|\s*—\s*\|")
SEPARATOR_ROW = re.compile(r"^\|(?:\s*:?-{3,}:?\s*\|)+\s*$", re.M)


def reader_text(page):
    """The text of the article without the code of code cells and code blocks (outputs stay in)."""
    return page.evaluate("""() => {
        const a = document.querySelector('article').cloneNode(true);
        for (const el of a.querySelectorAll('.cell_input, pre, script, style')) {
            if (!el.closest('.cell_output')) el.remove();
        }
        return a.textContent;
    }""")


def markdown_tables_in_outputs(rel):
    """How many Markdown tables the executed notebook behind page rel printed (text/markdown outputs)."""
    path = EXECUTED / pathlib.PurePosixPath(rel).with_suffix(".ipynb")
    if not path.exists():
        return None
    cells = json.loads(path.read_text())["cells"]
    blobs = [o.get("data", {}).get("text/markdown", "") for c in cells for o in c.get("outputs", [])]
    return sum(len(SEPARATOR_ROW.findall("".join(b) if isinstance(b, list) else b)) for b in blobs)


def test_printed_tables_are_tables(server, browser):
    """No page shows a Markdown table as text, and every table a notebook printed is an HTML <table>."""
    literal, missing, counted = {}, {}, 0
    for rel in chapter_pages():
        page, _ = open_page(browser, f"{server}/{rel}")
        hits = LITERAL_TABLE.findall(reader_text(page))
        if hits:
            literal[rel] = hits[:3]
        expected = markdown_tables_in_outputs(rel)
        if expected:
            counted += expected
            found = page.locator("div.cell_output table").count()
            if found < expected:
                missing[rel] = (expected, found)
        page.close()
    assert not literal, f"pages with a literal Markdown table: {literal}"
    assert not missing, f"Markdown tables printed by code but not rendered as <table> (printed, found): {missing}"
    if EXECUTED.exists():
        assert counted >= 10, f"only {counted} printed tables found under {EXECUTED}: the chapters print more"


def test_formulas_are_typeset_offline(server, browser):
    """Every formula becomes MathJax output with the network cut off (MathJax is served by the book), and no
    TeX delimiter is left in the text."""
    pages = [rel for rel in chapter_pages() if 'class="math' in (HTML / rel).read_text()]
    assert len(pages) >= 5, "the chapters have formulas"
    bad = {}
    for rel in pages:
        offsite = []
        page, _ = open_page(browser, f"{server}/{rel}", offsite)
        try:
            page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise",
                                   timeout=15000)
            page.evaluate("() => MathJax.startup.promise")
        except Exception as e:
            bad[rel] = f"MathJax did not start ({type(e).__name__}); off-site requests: {offsite[:3]}"
            page.close()
            continue
        untypeset = page.evaluate("""() => [...document.querySelectorAll('span.math, div.math')]
            .filter(el => !el.querySelector('mjx-container')).map(el => el.textContent.slice(0, 40))""")
        text = reader_text(page)
        raw = [m for m in ("\\(", "\\[", "$$") if m in text]
        if untypeset or raw:
            bad[rel] = {"not typeset": untypeset[:3], "TeX left in the text": raw}
        page.close()
    assert not bad


# Outputs and code that must fit the text column. The step-through players (.animation) are checked by their
# own test: their frames are meant to fill the column.
BLOCKS = ("div.cell_input pre, div.cell_output pre, div.cell_output table, div.cell_output img, "
          "div.cell_output details")


def test_code_and_outputs_fit_the_column_at_1280px(server, browser):
    too_wide = {}
    for rel in chapter_pages():
        page, _ = open_page(browser, f"{server}/{rel}")
        wide = page.evaluate("""(sel) => {
            const col = document.querySelector('article.bd-article').getBoundingClientRect();
            return [...document.querySelectorAll(sel)].filter(el => !el.closest('.animation')).flatMap(el => {
                const r = el.getBoundingClientRect();
                const scrolls = el.scrollWidth > el.clientWidth + 1;
                return (r.right > col.right + 1 || scrolls)
                    ? [`${el.tagName.toLowerCase()} ${Math.round(r.width)}px (scroll ${el.scrollWidth}) > ` +
                       `column ${Math.round(col.width)}px: ${(el.textContent || el.src || '').slice(0, 50)}`] : [];
            });
        }""", BLOCKS)
        if wide:
            too_wide[rel] = wide[:3]
        page.close()
    assert not too_wide


def test_player_frames_fill_the_column_at_twice_its_pixels(server, browser):
    """Every step-through player's frame is as wide as the text column (not a thumbnail, not overflowing) at a
    1280 px window, and its PNG has at least twice the pixels it is shown at, so it stays sharp on a high-DPI screen."""
    found, bad = 0, {}
    for rel in chapter_pages():
        page, _ = open_page(browser, f"{server}/{rel}")
        frames = page.evaluate("""() => {
            const art = document.querySelector('article.bd-article'), css = getComputedStyle(art);
            const column = art.clientWidth - parseFloat(css.paddingLeft) - parseFloat(css.paddingRight);
            return [...document.querySelectorAll(".animation img[id^='_anim_img']")].map(img => ({
                shown: img.getBoundingClientRect().width, natural: img.naturalWidth, column: column}));
        }""")
        page.close()
        found += len(frames)
        wrong = [f for f in frames if not (0.95 * f["column"] <= f["shown"] <= f["column"] + 1
                                           and f["natural"] >= 2 * f["shown"] - 2)]
        if wrong:
            bad[rel] = wrong[:2]
    assert found, "no step-through player in the built book"
    assert not bad, bad
