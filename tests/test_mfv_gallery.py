"""The sweep gallery (index.html): its content from the manifest, and the page in a real
headless browser (Debian's chromium: skips when it is absent; CI installs it): it
renders, every image loads from the disk without a server, no console error.
"""
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mfv.cli import main
from mfv.gallery import write_gallery
from mfv.report import _g
from test_mfv_sweep import sweep_args, write_inputs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE = 'cello <b>"bold"</b> & co'
# Appended to a copy of the page: after load (lazy images made eager), the title says how
# many images there are and which did not load.
PROBE = """<script>
for (const i of document.images) i.loading = 'eager';
window.addEventListener('load', () => {
  const images = [...document.images];
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'));
  document.title = 'PROBE ' + JSON.stringify({images: images.length, broken: broken});
});
</script>"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """An in-process sweep of units 0 and 2, 2 facets each, class names from a synset list."""
    folder = tmp_path_factory.mktemp("gallery")
    inputs = write_inputs(folder / "inputs", units=(0, 2))
    synsets = folder / "synset_words.txt"
    synsets.write_text(f"n00 tench, Tinca tinca\nn01 goldfish\nn02 {HOSTILE}\n")
    out = folder / "out"
    assert main(sweep_args(inputs, out, "0,2", 2, "--no-ray", "--synsets", str(synsets))) == 0
    return out


def sections(page: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r'<section class="unit" id="unit-(\d+)">(.*?)</section>',
                                                             page, re.S)}


def test_page_shows_each_unit_its_facets_means_names_and_objectives(swept):
    page = (swept / "index.html").read_text()
    manifest = json.loads((swept / "manifest.json").read_text())
    found = sections(page)
    assert sorted(found) == [0, 2]
    assert "<h2>unit 0: tench (n00)</h2>" in found[0]
    assert "<h2>unit 2: cello &lt;b&gt;&quot;bold&quot;&lt;/b&gt; &amp; co (n02)</h2>" in found[2]
    assert "<b>" not in found[2].split("</h2>")[0]
    for unit, html in found.items():
        sources = re.findall(r'<img src="([^"]+)"', html)
        assert sources == [f"{unit}/facet_0.png", f"{unit}/facet_1.png", f"{unit}/mean_0.png", f"{unit}/mean_1.png"]
        assert all((swept / s).is_file() for s in sources)
        for f in range(2):
            objective = manifest["facets"][str(unit)][str(f)]["objective"]
            assert f"facet {f} &middot; seed 5<br>objective <b>{_g(objective, 4)}</b>" in html
        # the mean image shown is the start image, 8-bit
        start = np.asarray(Image.open(manifest["units"][str(unit)]["means"][1]))
        np.testing.assert_array_equal(np.asarray(Image.open(swept / str(unit) / "mean_1.png")), start)


def test_failed_and_missing_facets_and_embedding(swept, tmp_path):
    manifest = json.loads((swept / "manifest.json").read_text())
    del manifest["facets"]["2"]["1"]
    manifest["failed"] = [{"unit": 2, "facets": [1], "error": "ValueError: <bad> & worse", "at": "now"}]
    manifest["settings"]["facets"] = 3
    page = sections(write_gallery(swept, manifest).read_text())
    assert "failed: ValueError: &lt;bad&gt; &amp; worse" in page[2]
    assert page[0].count("not done yet") == 1 and page[2].count("not done yet") == 1
    # embedded: the page alone, moved elsewhere, still has its pictures
    lone = tmp_path / "lone.html"
    shutil.copy(write_gallery(swept, embed=True), lone)
    text = lone.read_text()
    assert text.count('<img src="data:image/png;base64,') == 8 and 'src="0/' not in text
    assert main(["gallery", str(swept)]) == 0   # and back to links
    assert 'src="0/facet_0.png"' in (swept / "index.html").read_text()
    assert main(["gallery", str(tmp_path)]) == 2


def chromium(page: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                           "--virtual-time-budget=5000", *flags, page.as_uri()],
                          capture_output=True, text=True, timeout=120)


def probe(page: Path) -> tuple[dict, list[str]]:
    """(the probe's verdict, the console lines) of a copy of ``page`` beside it."""
    probed = page.with_name(f"probe_{page.name}")
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    done = chromium(probed, "--window-size=1000,800", "--dump-dom")
    title = re.search(r"<title>PROBE (.*?)</title>", done.stdout)
    assert title, f"the page did not load: {done.stderr[-2000:]}"
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return json.loads(title.group(1).replace("&quot;", '"')), console


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (CI installs it)")
def test_gallery_renders_in_headless_chromium(swept, tmp_path):
    verdict, console = probe(swept / "index.html")
    assert verdict == {"images": 8, "broken": []} and console == []
    # the checks can fail: a missing picture and a script error are seen
    bad = swept / "bad.html"
    bad.write_text((swept / "index.html").read_text().replace("2/facet_1.png", "2/gone.png")
                   .replace("</body>", "<script>undefinedFunction();</script></body>"))
    verdict, console = probe(bad)
    assert verdict["broken"] == ["2/gone.png"] and any("undefinedFunction" in line for line in console)
    # and it draws: a screenshot of the page as it is, the pictures' colours in it
    shot = tmp_path / "shot.png"
    chromium(swept / "index.html", "--window-size=900,700", f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 1000   # text alone would give a few hundred greys
