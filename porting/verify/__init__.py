"""Compare a port with real Caffe blob by blob, and say whether the port is right.

One idea per module:

* ``keys``: the array-key scheme (``top/<layer>/<i>/<kind>``, ``blob/<name>/<kind>``)
  and which layer output is which blob (``NetValues``);
* ``run``: the objective, the inputs and the port's own arrays (float32, float64, pinned);
* ``metrics``: per-blob metrics and the comparison rows;
* ``attribution``: each layer's own error in each framework against its float32 rounding
  bound, the point of departure, decision flips and their kind;
* ``verdict``: the pass/fail rule (invariant to float32 rounding) and its prose;
* ``reference``: golden files, Caffe's arrays of one run stored to verify without Caffe.

Arrays are float32 (float64 for the exact evaluation), NCHW, in the net's own units.
The backward pass seeds ``objective.seed(shape)`` (one-hot on the objective unit, for
every image of the batch; at the spatial centre for a 4-D blob, as MFV does) as the diff
of the objective blob's final value and runs the backward from the last layer writing
that blob down, as the legacy worker's ``run_net(top_diffs={blob: seed})`` does.
"""
from porting.verify.attribution import (DecisionFlips, Departure, LocalCheck, ancestors, decision_flips,
                                        find_departure, local_checks)
from porting.verify.keys import NetValues, Value, blob_key, parse_key, top_key
from porting.verify.metrics import BlobMetrics, Row, blob_metrics, closest, compare_rows, top_classes, topk_agreement
from porting.verify.run import (EXACT, Objective, default_objective, float64_twin, parse_objective, port_arrays,
                                random_inputs)
from porting.verify.verdict import Verification, explain, first_beyond_tolerance, summarise, verify_arrays, verify_port

__all__ = [
    "BlobMetrics", "DecisionFlips", "Departure", "EXACT", "LocalCheck", "NetValues", "Objective", "Row", "Value",
    "Verification", "ancestors", "blob_key", "blob_metrics", "closest", "compare_rows", "decision_flips",
    "default_objective", "explain", "find_departure", "first_beyond_tolerance", "float64_twin", "local_checks",
    "parse_key", "parse_objective", "port_arrays", "random_inputs", "summarise", "top_classes", "top_key",
    "topk_agreement", "verify_arrays", "verify_port",
]
