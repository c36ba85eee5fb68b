"""Mutation testing of the verifier (porting.verify) against real Caffe 1.0.

Misses: each bug of the catalogue (tests/mutations.py) is injected into a correct port,
which is verified against real Caffe's run of the *correct* model (one run per net,
weights and inputs, shared by all mutations of that net); the verdict must fail and name
the catalogue's layer (the departure, or else the first array that cannot be compared or
is beyond tolerance). False alarms: a correct port must pass on the shared nets (MFV
CaffeNet, BVLC AlexNet at batch 1), on the pools and zoo fixtures, under Caffe's msra,
xavier and gaussian (std 0.01) fillers and several seeds, on random small nets of
tests/property_nets.py, and on the nets trained by Caffe's solver (``caffe_trained``).
Inputs: uniform [-128, 128) (BGR, 0-255 minus the mean) for pixel nets, N(0, 1) for the
zoo, the held-out synthetic images for trained nets, the generator's own for random nets.

The full campaign (all shared nets x 3 fillers x 3 seeds, GoogLeNet included) is
benchmarks/bench_verdict.py; this subset took 36 s on 2 cores (150 s while they were shared).
"""
from __future__ import annotations

import pytest

import mutations as M


@pytest.fixture(scope="session")
def case(caffe_worker, caffe_weights, caffe_trained, tmp_path_factory):
    """get(net, filler="msra", seed=0) -> mutations.Case; Caffe runs once per key per session."""
    folder = tmp_path_factory.mktemp("mutation-cases")
    made: dict[tuple, M.Case] = {}

    def get(net: str, filler: str = "msra", seed: int = 0) -> M.Case:
        if not M.available(net):
            pytest.skip(f"{M.NETS[net].prototxt.name} absent (shared reference data)")
        key = (net, filler, seed)
        if key not in made:
            made[key] = M.make_case(net, caffe_worker, caffe_weights, folder, filler, seed, seed, caffe_trained)
        return made[key]

    return get


# ---------------------------------------------------------------------------- misses

@pytest.mark.caffe
@pytest.mark.parametrize("mutation", M.CATALOGUE, ids=[m.id for m in M.CATALOGUE])
def test_mutation_fails_at_its_layer(mutation, case):
    outcome = M.run_mutation(mutation, case(mutation.net))
    assert not outcome.passed, f"{mutation.id} ({mutation.bug}) passed: {outcome.summary}"
    assert outcome.departed_at == mutation.layer, (
        f"{mutation.id}: blamed {outcome.departed_at}, expected {mutation.layer}: {outcome.summary}")


# ---------------------------------------------------------------------------- false alarms

CORRECT = [("caffenet", "msra", 0), ("caffenet", "gaussian", 1), ("caffenet", "xavier", 2),
           ("alexnet", "gaussian", 3)] + [
    (net, filler, seed) for net in ("pools", "zoo") for seed, filler in enumerate(M.FILLERS)]


@pytest.mark.caffe
@pytest.mark.parametrize("net,filler,seed", CORRECT, ids=[f"{n}-{f}-{s}" for n, f, s in CORRECT])
def test_correct_port_passes(net, filler, seed, case):
    outcome = M.run_correct(case(net, filler, seed))
    assert outcome.passed, f"false alarm on {net} ({filler}, seed {seed}): {outcome.summary}"


@pytest.mark.caffe
@pytest.mark.parametrize("name", ["resnet_tiny", "caffenet_tiny", "deconv_tiny"])
def test_correct_port_passes_on_trained_weights(name, case):
    outcome = M.run_correct(case(name))
    assert outcome.passed, f"false alarm on trained {name}: {outcome.summary}"


@pytest.mark.caffe
@pytest.mark.parametrize("seed,depth,focus", M.GENERATED, ids=[f"{s}-{d}-{f}" for s, d, f in M.GENERATED])
def test_correct_port_passes_on_generated_net(seed, depth, focus, caffe_worker, tmp_path):
    outcome = M.run_correct(M.generated_case(caffe_worker, seed, depth, focus, tmp_path))
    assert outcome.passed, (f"false alarm on `python tests/property_nets.py --seed {seed} --depth {depth} "
                            f"--focus {focus}`: {outcome.summary}")


# ---------------------------------------------------------------------------- the catalogue itself

def test_catalogue_names_real_layers_and_changes_the_port(tmp_path):
    """Every bug (at least 19, distinct ids) targets a layer of its net and changes the
    port's float32 output there on the net's inputs (zero weights aside: the port's
    own default blobs, so the check needs no Caffe); input-side bugs change the input blob."""
    import torch

    from porting import load_caffe
    from porting.verify import port_arrays

    assert len(M.CATALOGUE) >= 19 and len({m.id for m in M.CATALOGUE}) == len(M.CATALOGUE)
    for m in M.CATALOGUE:
        if not M.available(m.net):
            continue
        spec = M.NETS[m.net]
        net = load_caffe(spec.prototxt)
        names = [s.name for s in net.graph.layers]
        assert m.layer in names, f"{m.id}: no layer {m.layer} in {spec.prototxt.name}"
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for blobs in net.params.values():
                for b in blobs:
                    b.copy_(torch.rand(b.shape, generator=gen) + 0.5)  # positive: every bug shows
        inputs = M.make_inputs(spec if spec.inputs != "heldout" else M.NetSpec(spec.prototxt, inputs="normal"),
                               net.graph, 0)
        key = f"top/{m.layer}/0/data"
        before = port_arrays(net, inputs)
        m.inject(net)
        after = port_arrays(net, inputs)
        assert key in before and key in after, (m.id, key)
        assert before[key].shape != after[key].shape or not (before[key] == after[key]).all(), (
            f"{m.id} leaves {key} unchanged")
