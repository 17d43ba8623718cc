"""The page in a real browser: headless Chromium renders the three tabs, and a screenshot for the README.

Chromium is driven from its command line (no selenium): `--dump-dom` after the page's scripts ran
(`--virtual-time-budget`), `--screenshot` for the picture. Offline: no background networking, a fresh
profile per run. `MMFT_UPDATE_SCREENSHOT=1` also copies the screenshot to docs/screenshot.png (a test
run never changes tracked files otherwise).
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

import app as app_py
from mmft.app_ui import Settings, create_app, launch
from mmft.speech import Transcriber
from tests.hub_server import free_port
from tests.test_app import fake_asr, standin_round  # noqa: F401 (standin_round is a fixture)

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync", "--hide-scrollbars",
         "--window-size=1280,1000", "--virtual-time-budget=20000"]
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "screenshot.png"

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: apt-get install chromium")]


@pytest.fixture(scope="module")
def page(standin_round, tmp_path_factory):
    """The app's URL, serving the trained demo round when it is built (the screenshot shows it), else a stand-in."""
    demo_round = app_py.DEMO_ROUND if app_py.DEMO_ROUND.is_dir() else standin_round
    app = create_app(Settings(demo_round=demo_round), transcriber=Transcriber(fn=fake_asr),
                     examples_dir=tmp_path_factory.mktemp("examples"))
    try:
        _, url, _ = launch(app, port=free_port(), prevent_thread_lock=True, quiet=True)
        yield url
    finally:
        app.close()


def chromium(url: str, profile: Path, *args: str) -> str:
    done = subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args, url],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_three_tabs_render(page, tmp_path):
    dom = chromium(page, tmp_path / "profile", "--dump-dom")
    tabs = re.findall(r'<button[^>]*role="tab"[^>]*>\s*([^<]*?)\s*<', dom)
    assert tabs == ["Image", "Audio", "Text"]
    assert "Serving the bundled shapes demo round" in dom and "--repo OWNER/NAME" in dom
    assert "What colour is the shape?" in dom  # the examples


def test_screenshot(page, tmp_path):
    shot = tmp_path / "screenshot.png"
    chromium(page, tmp_path / "profile", f"--screenshot={shot}")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1000)
    assert len(image.getcolors(maxcolors=1 << 20)) > 100  # rendered, not a blank page
    assert (249, 115, 22) in {rgb for _, rgb in image.getcolors(maxcolors=1 << 20)}  # the orange Ask button
    if os.environ.get("MMFT_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copy(shot, DOCS_SCREENSHOT)
