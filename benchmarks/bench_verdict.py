"""Does the verdict of `porting verify` tell correct ports from wrong ones? The full campaign.

Misses: every bug of the mutation catalogue (tests/mutations.py) is injected into a
correct port and verified against real Caffe's run of the correct model; the verdict must
fail and name the catalogue's layer (the departure, or else the first failing array or
shape). False alarms: correct ports verified against real Caffe must pass, on every
shared net (MFV CaffeNet, BVLC AlexNet, BVLC reference CaffeNet, BVLC GoogLeNet) x Caffe's
msra, xavier and gaussian (std 0.01) fillers x ``--seeds`` seeds (weights and inputs;
inputs uniform [-128, 128), BGR minus mean, batch 1), the pools and zoo fixtures likewise,
the random small nets of tests/property_nets.py, and the nets of tests/fixtures/trained/
trained by Caffe's own solver. A verifier error counts as a miss or a false alarm.

Prints the mutation table, the false-alarm table, "false alarms F of N, misses M of K"
and the wall time of each part; exits 1 on any miss or false alarm. Needs the legacy root
(`porting env build`) and root privileges; shared nets are skipped when
../shared/reference-data is absent. The defaults (19 mutations, 73 correct
ports, GoogLeNet 9 of them) took 3 min 5 s on 2 cores, 11 min 45 s while they were shared.

    .venv/bin/python benchmarks/bench_verdict.py [--seeds 3] [--no-googlenet] [--only mutations]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

import mutations as M  # noqa: E402


def _weights_maker(worker, folder: Path):
    made: dict = {}

    def make(prototxt, seed: int = 0, **filler) -> Path:
        key = (str(prototxt), seed, tuple(sorted(filler.items())))
        if key not in made:
            out = folder / f"{Path(prototxt).stem}-{len(made)}.caffemodel"
            worker.make_weights(prototxt, out, seed=seed, **filler)
            made[key] = out
        return made[key]

    return make


def _trainer(worker, folder: Path):
    """The tests' caffe_trained fixture, outside pytest: the same recipes, once per name."""
    from types import SimpleNamespace

    from conftest import TRAINED_RECIPES

    made: dict = {}

    def train(name: str):
        if name not in made:
            out = folder / f"{name}.caffemodel"
            result = worker.train(M.TRAINED / f"{name}_train.prototxt", out, M.TRAINED / f"{name}_deploy.prototxt",
                                  **TRAINED_RECIPES[name])
            made[name] = SimpleNamespace(deploy=M.TRAINED / f"{name}_deploy.prototxt", caffemodel=out,
                                         heldout={"data": result["data"], "label": result["label"]})
        return made[name]

    return train


def _attempt(fn):
    try:
        return fn()
    except Exception as err:  # a verifier crash is an outcome of the campaign, not its end
        return M.Outcome(False, None, f"ERROR {type(err).__name__}: {err}")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="weight/input seeds per net and filler")
    parser.add_argument("--no-googlenet", action="store_true", help="leave out BVLC GoogLeNet (the slowest)")
    parser.add_argument("--only", choices=("mutations", "false-alarms"))
    parser.add_argument("-v", "--verbose", action="store_true", help="print each outcome's summary")
    args = parser.parse_args()

    from porting.legacy import Worker

    folder = Path(tempfile.mkdtemp(prefix="bench-verdict-"))
    worker = Worker()
    make, train = _weights_maker(worker, folder), _trainer(worker, folder)
    cases: dict = {}

    def case(net, filler="msra", seed=0):
        key = (net, filler, seed)
        if key not in cases:
            cases[key] = M.make_case(net, worker, make, folder, filler, seed, seed, train)
        return cases[key]

    misses, mutation_rows, times = [], [], {}
    try:
        if args.only != "false-alarms":
            t0 = time.perf_counter()
            for m in tqdm(M.CATALOGUE, desc="mutations", file=sys.stderr):
                if not M.available(m.net):
                    mutation_rows.append([m.id, m.net, m.layer, "skipped", "-", "-"])
                    continue
                out = _attempt(lambda: M.run_mutation(m, case(m.net)))
                ok = not out.passed and out.departed_at == m.layer
                verdict = "ERROR" if out.summary.startswith("ERROR") else ("PASS" if out.passed else "FAIL")
                mutation_rows.append([m.id, m.net, m.layer, verdict, out.departed_at or "-", "yes" if ok else "NO"])
                if not ok:
                    misses.append((m.id, out.summary))
                if args.verbose:
                    tqdm.write(f"{m.id}: {out.summary}", file=sys.stderr)
            times["mutations"] = time.perf_counter() - t0

        alarms, alarm_rows = [], []
        if args.only != "mutations":
            t0 = time.perf_counter()
            plan = []
            for net in ("caffenet", "alexnet", "reference_caffenet", "googlenet", "pools", "zoo"):
                if net == "googlenet" and args.no_googlenet or not M.available(net):
                    continue
                plan += [(net, filler, seed) for filler in M.FILLERS for seed in range(args.seeds)]
            plan += [("trained", name, None) for name in ("resnet_tiny", "caffenet_tiny", "deconv_tiny")]
            plan += [("generated", g, None) for g in M.GENERATED]
            for net, filler, seed in tqdm(plan, desc="correct ports", file=sys.stderr):
                if net == "generated":
                    gseed, depth, focus = filler
                    label = f"generated seed {gseed} depth {depth} {focus}"
                    out = _attempt(lambda: M.run_correct(
                        M.generated_case(worker, gseed, depth, focus, folder / f"gen-{gseed}")))
                elif net == "trained":
                    label = f"{filler} (trained)"
                    out = _attempt(lambda: M.run_correct(case(filler)))
                else:
                    label = f"{net} {filler} seed {seed}"
                    out = _attempt(lambda: M.run_correct(case(net, filler, seed)))
                alarm_rows.append([label, "PASS" if out.passed else "FAIL",
                                   "-" if out.passed else out.departed_at or "-", out.flips or "-", out.worst or "-"])
                if not out.passed:
                    alarms.append((label, out.summary))
                if args.verbose:
                    tqdm.write(f"{label}: {out.summary}", file=sys.stderr)
            times["false alarms"] = time.perf_counter() - t0
    finally:
        worker.close()

    if mutation_rows:
        print("Mutations (a wrong port must fail, departing at the expected layer)\n")
        print(_table(["id", "net", "expected layer", "verdict", "departed at", "ok"], mutation_rows))
        print()
    if alarm_rows:
        print("Correct ports (must pass)\n")
        print(_table(["case", "verdict", "departed at", "rounding flips (layer n/total)",
                      "farthest array, max|port-caffe|/max|caffe|"], alarm_rows))
        print()
    for what, items in (("miss", misses), ("false alarm", alarms)):
        for label, summary in items:
            print(f"{what}: {label}: {summary}")
    counted = len([r for r in mutation_rows if r[3] != "skipped"])
    print(f"\nfalse alarms {len(alarms)} of {len(alarm_rows)}, misses {len(misses)} of {counted}")
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    return 1 if misses or alarms else 0


if __name__ == "__main__":
    sys.exit(main())
