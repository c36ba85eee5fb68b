"""The pytest plugin of the package (entry point ``pytest11``: ``porting``).

Options, for a user's suite that verifies a PyTorch port against a golden file
(``porting reference dump``), on the command line or in the ini file (paths in the ini
file are relative to its folder, on the command line to the current folder):

  --porting-golden PATH       ini ``porting_golden``      the golden file
  --porting-prototxt PATH     ini ``porting_prototxt``    the prototxt it was dumped from
  --porting-caffemodel PATH   ini ``porting_caffemodel``  its caffemodel
                              (both default to the names the golden file records, beside it)

Fixture ``porting_verify``: ``porting_verify(module, mapping=None, torch_input=None, ...)``
is ``porting.testing.assert_matches_caffe`` bound to those files (``.golden`` the path); a test that uses it
without a golden file configured fails, saying how to give one. The plugin adds nothing
else to a run (no hook runs per test) and imports the verifier only when the fixture is used.
"""
from __future__ import annotations

from pathlib import Path

import pytest

_OPTIONS = (("golden", "the golden file (porting reference dump) porting_verify checks against"),
            ("prototxt", "the prototxt the golden file was dumped from (default: its recorded name, beside it)"),
            ("caffemodel", "the caffemodel the golden file was dumped from (default: its recorded name, beside it)"))


def pytest_addoption(parser) -> None:
    group = parser.getgroup("porting", "verifying a PyTorch port against Caffe (golden files)")
    for name, text in _OPTIONS:
        group.addoption(f"--porting-{name}", dest=f"porting_{name}", metavar="PATH", default=None, help=text)
        parser.addini(f"porting_{name}", text + "; relative to the ini file", default="")


def configured_path(config, name: str) -> Path | None:
    """``--porting-NAME`` (relative to where pytest was started) or ini ``porting_NAME``
    (relative to the ini file's folder); None when neither is set."""
    given = config.getoption(f"porting_{name}")
    if given:
        return Path(config.invocation_params.dir, given)
    given = config.getini(f"porting_{name}")
    if given:
        return Path(config.inipath.parent if config.inipath else config.rootpath, given)
    return None


@pytest.fixture
def porting_verify(request):
    """``porting.testing.assert_matches_caffe`` bound to the configured golden file."""
    from porting.testing import assert_matches_caffe

    golden = configured_path(request.config, "golden")
    if golden is None:
        pytest.fail("porting_verify needs a golden file: --porting-golden PATH, or porting_golden = PATH "
                    "in the ini file (write one with `porting reference dump`)", pytrace=False)
    files = {"prototxt": configured_path(request.config, "prototxt"),
             "caffemodel": configured_path(request.config, "caffemodel")}

    def check(module, mapping=None, **options):
        __tracebackhide__ = True
        return assert_matches_caffe(module, golden, mapping, **{**files, **options})

    check.golden = golden
    return check
