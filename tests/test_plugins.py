"""Layer plugins through the real entry-point mechanism, without installing anything.

Each test writes a distribution's ``<name>-<version>.dist-info`` (METADATA and
entry_points.txt) next to its modules in a temporary folder and runs ``porting`` in a
subprocess with that folder on PYTHONPATH, where ``importlib.metadata`` finds it as it
finds an installed package. The example plugin (examples/porting-layer-shufflechannel) is
declared from its own pyproject.toml, and its own test runs there with the plugin loaded
through its entry point; broken plugins must each give one warning line naming their
distribution and entry point, leave the registry as it was, and never a traceback.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "porting-layer-shufflechannel"


def _site(tmp_path: Path, name: str, version: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
    """A folder that importlib.metadata reads as the installed distribution ``name``."""
    site = tmp_path / "site"
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(
        "[porting.layers]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for module, text in modules.items():
        (site / f"{module}.py").write_text(text)
    return site


def _run(site: Path, *args: str, code: str | None = None) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "porting", *args] if code is None else [sys.executable, "-c", code, *args]
    return subprocess.run(command, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def _example_site(tmp_path: Path) -> tuple[Path, str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    site = _site(tmp_path, project["name"], project["version"], project["entry-points"]["porting.layers"], {})
    shutil.copy(EXAMPLE / "porting_shufflechannel.py", site)
    return site, f"plugin {project['name']} {project['version']}"


SHUFFLE_NET = """name: "shuffle"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 6 dim: 1 dim: 2 } } }
layer { name: "shuf" type: "ShuffleChannel" bottom: "data" top: "shuf" shuffle_channel_param { group: 3 } }
"""


def test_example_plugin_through_its_entry_point(tmp_path):
    site, origin = _example_site(tmp_path)
    prototxt = tmp_path / "shuffle.prototxt"
    prototxt.write_text(SHUFFLE_NET)
    inspect = _run(site, "inspect", str(prototxt))
    assert inspect.returncode == 0 and inspect.stderr == "", inspect.stderr
    row = next(line for line in inspect.stdout.splitlines() if line.startswith("shuf "))
    assert "ShuffleChannel" in row and row.endswith(f"yes ({origin})") and "1x6x1x2" in row
    layers = json.loads(_run(site, "layers", "--json").stdout)
    entry = next(r for r in layers["layers"] if r["type"] == "ShuffleChannel")
    assert entry["origin"] == origin and entry["params"] == {"shuffle_channel_param": ["group"]}
    assert layers["plugin_problems"] == []
    # A net runs: channel c = i * 2 + j (i < 3, j < 2) goes to j * 3 + i.
    run = _run(site, str(prototxt), code="import sys, torch, porting\n"
               "net = porting.load_caffe(sys.argv[1])\n"
               "x = torch.arange(12.0).reshape(1, 6, 1, 2)\n"
               "print(net(x)['shuf'][0, :, 0, 0].tolist())\n")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == [0.0, 4.0, 8.0, 2.0, 6.0, 10.0]
    # A prototxt written back keeps the fork field (group: 3, not the default 1).
    again = tmp_path / "again.prototxt"
    run = _run(site, str(prototxt), str(again), code="import sys, porting\n"
               "from porting.parse import read_prototxt\n"
               "from porting.write import write_prototxt\n"
               "write_prototxt(sys.argv[2], read_prototxt(sys.argv[1]))\n"
               "net = porting.load_caffe(sys.argv[2])\n"
               "print(next(s.module.group for s in net.graph.layers if s.name == 'shuf'))\n")
    assert run.returncode == 0, run.stderr
    assert "shuffle_channel_param" in again.read_text() and run.stdout.strip() == "3"
    # Without the plugin the type is unsupported: nothing registers it by default.
    plain = subprocess.run([sys.executable, "-m", "porting", "layers", "--json"], capture_output=True, text=True,
                           timeout=600, cwd=ROOT)
    assert "ShuffleChannel" not in {r["type"] for r in json.loads(plain.stdout)["layers"]}


def test_example_plugins_own_test(tmp_path):
    """The example's own test, with the plugin loaded through its entry point."""
    site, _ = _example_site(tmp_path)
    out = _run(site, "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests"),
               code="import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout


GOOD_THEN_CLASH = '''from porting.layers import CaffeLayer, register


@register("PluginFine")  # registered first: left out with the rest of its plugin
class Fine(CaffeLayer):
    pass


@register("ReLU")
class MyReLU(CaffeLayer):
    pass
'''

BROKEN = {
    "clash with a built-in": ({"mine": "plug_clash"}, {"plug_clash": GOOD_THEN_CLASH},
                              "layer type 'ReLU' is already registered (built-in: porting.layers.neuron.ReLU)"),
    "import error": ({"mine": "plug_imports"}, {"plug_imports": "import porting_no_such_dependency\n"},
                     "ModuleNotFoundError: No module named 'porting_no_such_dependency'"),
    "module missing": ({"mine": "plug_nowhere"}, {}, "ModuleNotFoundError: No module named 'plug_nowhere'"),
    "not a CaffeLayer": ({"mine": "plug_thing:Thing"}, {"plug_thing": "class Thing:\n    pass\n"},
                         "plug_thing:Thing is not a CaffeLayer subclass registered with porting.layers.register"),
    "a function": ({"mine": "plug_func:make"}, {"plug_func": "def make():\n    pass\n"},
                   "plug_func:make is a function, not a module or a CaffeLayer subclass"),
    "registers a non-CaffeLayer": (
        {"mine": "plug_module"},
        {"plug_module": "import torch\nfrom porting.layers import register\n\n\n@register('Odd')\n"
                        "class Odd(torch.nn.Module):\n    pass\n"},
        "register('Odd'): 'Odd' is not a subclass of porting.layers.CaffeLayer"),
    "registers nothing": ({"mine": "plug_empty"}, {"plug_empty": "X = 1\n"}, "module plug_empty registered no layer type"),
    "a refused type": (
        {"mine": "plug_python"},
        {"plug_python": "from porting.layers import CaffeLayer, register\n\n\n@register('Python')\n"
                        "class Py(CaffeLayer):\n    pass\n"},
        "layer type 'Python' is refused (Python layers run arbitrary code and are never executed) and cannot be "
        "registered"),
    "a fork field Caffe has": (
        {"mine": "plug_field"},
        {"plug_field": "from porting.layers import CaffeLayer, ForkParam, register\n\n\n@register('Forked')\n"
                       "class Forked(CaffeLayer):\n"
                       "    fork_param = ForkParam('forked_param', 106, 'ForkedParameter', {'k': (1, 'int32', 0)})\n"},
        "Forked's fork field forked_param = 106 clashes with a field of Caffe's LayerParameter"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_plugin_gives_one_line_and_changes_nothing(tmp_path, case):
    entry_points, modules, reason = BROKEN[case]
    site = _site(tmp_path, "porting-layer-broken", "2.5", entry_points, modules)
    out = _run(site, "layers", "--json")
    (name, value), = entry_points.items()
    expected = (f"layer plugin porting-layer-broken 2.5 (entry point {name} = {value} in group porting.layers) "
                f"not loaded: {reason}")
    assert out.returncode == 0 and out.stderr == expected + "\n", out.stderr
    data = json.loads(out.stdout)
    assert data["plugin_problems"] == [expected]
    origins = {r["type"]: r["origin"] for r in data["layers"]}
    assert set(origins.values()) == {"built-in"} and "PluginFine" not in origins and "Forked" not in origins
    assert origins["ReLU"] == "built-in" and [r["type"] for r in data["refused"]] == ["Python"]


def test_a_broken_plugin_leaves_the_others_loaded(tmp_path):
    """Two distributions: the broken one is left out, the example still loads and runs."""
    site, origin = _example_site(tmp_path)
    info = site / "porting_layer_broken-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: porting-layer-broken\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[porting.layers]\nclash = plug_clash\n")
    (site / "plug_clash.py").write_text(GOOD_THEN_CLASH)
    prototxt = tmp_path / "shuffle.prototxt"
    prototxt.write_text(SHUFFLE_NET)
    out = _run(site, "inspect", str(prototxt))
    assert out.returncode == 0 and len(out.stderr.splitlines()) == 1, out.stderr
    assert "porting-layer-broken 1.0 (entry point clash = plug_clash" in out.stderr
    assert f"yes ({origin})" in out.stdout and "Traceback" not in out.stdout + out.stderr
