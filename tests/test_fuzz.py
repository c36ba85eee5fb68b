"""FUZZ (issue 9): 2,500 seeded hostile inputs, none may fail.

The inputs are those of ``python tests/fuzz_models.py --seed 2016 --count 2500
--no-reference`` (the corpus of this repository only, so every checkout draws the same
files): mutated prototxts and caffemodels of every family in ``tests/fuzz_models.py``,
each run in a worker forked from a process of its own under a 3 GB address-space limit and a 10 s CPU-time alarm.
Each must load and run, or be refused with one printable ``PortingError`` line naming the
file; the walker must read every caffemodel as protobuf does (tests/test_walker_protobuf.py's
rule); a converted net must compute the same blobs; ``porting inspect`` must exit 0, or 2
with one stderr line. 12 s on 2 idle cores, about 60 s on 2 busy ones. On failure the
message holds the table of distinct failures; ``python tests/fuzz_models.py --seed 2016
--count 2500 --no-reference --out DIR`` saves a reproducer for each and ``--replay
DIR/NN-...`` shows its traceback.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SEED, COUNT = 2016, 2500

# The campaign runs in a process of its own, as from the command line: its workers are
# forked from it under a 3 GB address-space limit, which must not include the memory this
# test session has gathered (Caffe workers, nets of earlier tests).
_CAMPAIGN = f"""
import json, os
from fuzz_models import build_seeds, run_campaign
campaign = run_campaign({SEED}, {COUNT}, jobs=min(2, os.cpu_count() or 1), seeds=build_seeds(reference=False))
print(json.dumps({{"outcomes": dict(campaign.outcomes), "failures": campaign.failures, "table": campaign.table()}}))
"""


def test_fuzz_hostile_files_2500_inputs_no_failure():
    out = subprocess.run([sys.executable, "-c", _CAMPAIGN], capture_output=True, text=True,
                         cwd=Path(__file__).parent, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    campaign = json.loads(out.stdout.splitlines()[-1])
    table = campaign["table"]
    print(table)
    assert sum(campaign["outcomes"].values()) == COUNT
    assert campaign["outcomes"].get("ok", 0) > COUNT // 10, table  # the mutations still reach the forward
    assert campaign["failures"] == 0, "\n" + table
