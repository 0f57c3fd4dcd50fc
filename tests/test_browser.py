"""The built book in a real browser (Chromium through Playwright): pages load without JavaScript errors, the
step-through player advances frame by frame, and every notebook chapter's Colab button points at its notebook.

Needs `make book` first (the HTML in _build/html; FLASHLIB_BOOK_HTML overrides the folder) and Debian's chromium.
"""
import functools
import http.server
import os
import pathlib
import re
import shutil
import threading

import pytest

pytestmark = pytest.mark.browser

ROOT = pathlib.Path(__file__).resolve().parents[1]
HTML = pathlib.Path(os.environ.get("FLASHLIB_BOOK_HTML", ROOT / "_build" / "html"))
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


@pytest.fixture(scope="module")
def server():
    if not (HTML / "index.html").exists():
        pytest.skip(f"no built book at {HTML}: run `make book` first")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(HTML))
    handler.log_message = lambda *a: None
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


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
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
    rel = "notebooks/08_flashattention.html"
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
