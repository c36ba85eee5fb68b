"""How far each arithmetic path's float32 input gradient lies from float64, on MFV crops.

CaffeNet (porting/models/caffenet.prototxt) with Caffe's Xavier weights (real Caffe's
filler, seed 0, through the legacy worker; ``--no-caffe``: the same filler drawn by torch),
objective fc8[``--unit``], on MFV-like crops: each of the first ``--crops`` mean images of
``--means`` as the 2016 code starts from it, and after ``--steps`` gradient steps (step 1
grey level, no TV). For every crop, the gradient of the objective with respect to the input
is compared with the float64 port's (``net.double()``) on the same crop: relative L2 distance
(median and max over the crops) and the decisions (ReLU signs, max-pool winners) taken
otherwise than in float64. Paths:

* torch:          the port as it was: ``F.conv2d`` and ``F.linear``
* im2col:         Convolution as Caffe computes it, im2col + one matrix product per image
                  and group (``porting.layers.convolution.set_conv_path``)
* conv-float64:   every Convolution in float64, rounded to float32 once per layer
* blocked-ip:     InnerProduct's input gradient summed 128 outputs at a time
                  (``porting.layers.inner_product.set_inner_product_path``)
* im2col+blocked: both
* phases:         strided Convolutions' input gradient as one stride-1 convolution by output
                  phase (``set_conv_path(net, "phases")``; conv1 here, the others have stride 1)
* phases+blocked: phases and blocked-ip (MFV's inner products)
* caffe:          real Caffe 1.0 (OpenBLAS) through the worker: its data diff

and the seconds of one forward + backward (``--batch`` images, medians of ``--repeats``, the paths
interleaved so that a loaded machine slows all alike). ``--conv1 [BATCH ...]`` adds conv1's own
input gradient on the "torch", "im2col" and "phases" conv paths: the backward alone, timed at
each batch size (default 1 and 10), and its relative L2 from the float64 layer's. ``--layers`` adds, for one crop, each
weighted layer's own backward error (Caffe's top diff through the float64 layer, against
each framework's bottom diff).

    python benchmarks/bench_conv_accuracy.py [--crops 5] [--steps 5] [--repeats 5] [--threads 1]
        [--batch 1] [--conv1 1 10]

Measured here (2 shared cores under load, torch 2.13 CPU with MKL, 1 thread; Caffe 1.0 with
OpenBLAS in the legacy stack; 10 crops: mean_0-4 of n03032252, each at 0 and 5 steps):

    path             gradient median       max fc8 median  flips s/fwd+bwd x torch
    torch                   1.20e-06  5.94e-03   9.55e-07      2     0.213    1.00
    im2col                  1.21e-06  3.53e-03   9.25e-07      2     0.285    1.33
    conv-float64            1.12e-06  1.22e-06   8.60e-07      0     0.374    1.75
    blocked-ip              4.42e-07  5.94e-03   9.55e-07      2     0.228    1.07
    im2col+blocked          4.24e-07  3.53e-03   9.25e-07      2     0.283    1.33
    caffe                   4.88e-07  5.21e-07   6.17e-07      0         -       -

(the max: crops where one ReLU decision flipped against float64; fc8: the forward's relative
L2; flips: summed over the crops.) Timings again at load ~3 (``--no-caffe --crops 1``), x torch:
batch 1, 1 thread (torch 0.076 s): im2col 1.17, conv-float64 1.57, blocked-ip 0.96, both 1.17;
batch 10 (MFV's batched facets), 2 threads (torch 0.305 s): im2col 1.53, conv-float64 1.78,
blocked-ip 0.75, both 1.62 (1 thread at load ~4: im2col 2.03, blocked-ip 1.10). So MFV
(``FacetNet.from_caffe``) takes blocked-ip alone: as accurate as Caffe, at no cost. Each layer's own input
gradient on mean_0 (``--layers``): conv1 Caffe 9.4e-8, torch 1.9e-7, im2col 9.5e-8; conv2-5
1.0-1.9e-7 on all three; fc6 Caffe 2.4e-7, torch 8.1e-7, blocked 1.7e-7; fc7 Caffe 2.4e-7,
torch 7.8e-7, blocked 1.7e-7. So the port's distance from Caffe's accuracy was InnerProduct's
backward at batch 1 (MKL sums each input-gradient element over 4096 outputs in one chain),
not the convolutions; no convolution path alone closes it. The forward stays further from
float64 than Caffe's (fc8 9.3e-7 against 6.2e-7: fc6's forward 6.7e-7 against Caffe's
2.9e-7); summing its 9216 terms in blocks too measured 1.5e-7 but cost 2-3x on fc6/fc7
(column slices of the weights, or MKL's blocked sgemm at 4 rows or more).

The "phases" conv path, on the same shared machine, medians of 9, two runs each. 2 threads
at load 1-2: conv1's input gradient alone (``--conv1``) torch 0.006-0.011 s at batch 1 and
0.058 s at batch 10, im2col 0.49-0.55x and 0.92-1.06x, phases 0.31-0.35x and 0.26-0.28x; the
whole forward + backward (``--no-caffe``) at batch 10 torch 0.27 s, phases 0.89x,
phases+blocked 0.73-0.75x (blocked-ip 0.86-0.87x), at batch 1 (one run) torch 0.049 s, phases 0.91x,
phases+blocked 0.75x. 1 thread at load 1-3: conv1 torch 0.011 s and 0.109 s, phases
0.29-0.35x and 0.24-0.27x; whole net at batch 10 phases 0.82x. (2 threads at load 3 were
dominated by the other load, each small parallel op costing milliseconds: not quoted.)
Distances from float64: conv1's own gradient (seeded normal input and top gradient) torch
4.9e-7, im2col 1.9e-7, phases 2.1e-7; on Caffe's top diff (``--layers``, mean_0)
phases+blocked 9.3e-8 against Caffe's 9.4e-8 and torch's 1.9e-7; the net's input gradient,
median over crops, phases 1.17-1.20e-6 (torch 1.19-1.21e-6), phases+blocked 4.0-4.2e-7
(im2col+blocked 4.1-4.3e-7, Caffe 4.9e-7). The forward is torch's, so its flips and fc8 distance are torch's.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PROTOTXT = ROOT / "porting" / "models" / "caffenet.prototxt"
MEANS = ROOT.parent / "shared" / "reference-data" / "mfv-original" / "mean_images" / "n03032252"
PATHS = ("torch", "im2col", "conv-float64", "blocked-ip", "im2col+blocked", "phases", "phases+blocked")
CONV1_PATHS = ("torch", "im2col", "phases")


def xavier(net, seed: int = 0) -> None:
    """Caffe's Xavier filler drawn by torch: weights U(-a, a), a = sqrt(3 / fan_in); biases 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blobs in net.params.values():
            bound = (3.0 / blobs[0][0].numel()) ** 0.5
            blobs[0].copy_((torch.rand(blobs[0].shape, generator=generator) * 2 - 1) * bound)
            for bias in blobs[1:]:
                bias.zero_()


@contextlib.contextmanager
def arithmetic(net, path: str):
    """The net with ``path``'s arithmetic for a while (see the module docstring)."""
    from porting.layers.convolution import Convolution, set_conv_path
    from porting.layers.inner_product import set_inner_product_path

    set_conv_path(net, next((p for p in ("im2col", "phases") if p in path), "torch"))
    set_inner_product_path(net, "blocked" if "blocked" in path else "torch")
    wrapped = []
    if path == "conv-float64":
        for layer in net.modules():
            if isinstance(layer, Convolution):
                plain = layer._convolve
                layer._convolve = lambda x, w, b, plain=plain: plain(
                    x.double(), w.double(), None if b is None else b.double()).to(x.dtype)
                wrapped.append(layer)
    try:
        yield net
    finally:
        for layer in wrapped:
            del layer._convolve
        set_conv_path(net, "torch")
        set_inner_product_path(net, "torch")


def gradient(net, x: np.ndarray, unit: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """d fc8[unit] / d input and fc8 (float64 copies), and each deciding layer's bottoms as
    this forward saw them."""
    xt = torch.tensor(x[None], dtype=dtype, requires_grad=True)
    with torch.enable_grad():
        fc8 = net(xt, end="fc8")["fc8"]
        (grad,) = torch.autograd.grad(fc8[0, unit], xt)
    bottoms = layer_bottoms(net.graph, lambda name, i: net.layer_outputs[name][i].detach())
    return grad[0].double(), fc8.detach()[0].double(), bottoms


def forward_backward(net, x: torch.Tensor, unit: int) -> None:
    """What one MFV step asks of the net: fc8, then d fc8[unit] / d input (per image)."""
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        torch.autograd.grad(net(x, end="fc8")["fc8"][:, unit].sum(), x)


def layer_bottoms(graph, top) -> dict:
    """{layer name: [its bottoms as it read them]}; ``top(layer, i)`` gives a layer's own top i."""
    last, out = {}, {}
    for spec in graph.layers:
        if all(b in last for b in spec.bottoms) and spec.bottoms:
            out[spec.name] = [last[b] for b in spec.bottoms]
        for i, name in enumerate(spec.tops):
            last[name] = (spec.name, i)
    return {name: [torch.as_tensor(np.asarray(top(*key))).detach().double() for key in keys]
            for name, keys in out.items() if _has_decisions(graph, name)}


def _has_decisions(graph, name) -> bool:
    spec = next(s for s in graph.layers if s.name == name)
    return spec.module.type_name in ("ReLU", "Pooling")


def flips(net64, bottoms: dict, exact: dict) -> int:
    """Decisions (ReLU signs, max-pool winners) taken otherwise than on the float64 bottoms."""
    modules = {spec.name: spec.module for spec in net64.graph.layers}
    total = 0
    for name, xs in exact.items():
        if name not in bottoms:
            continue
        mine, theirs = modules[name].decisions(bottoms[name]), modules[name].decisions(xs)
        if mine is None:
            continue
        total += sum(int((a != b).sum()) for a, b in zip(mine, theirs))
    return total


def rel_l2(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((candidate - reference).norm() / reference.norm())


def crops(facet_net, means: Path, count: int, steps: int, unit: int) -> list[tuple[str, np.ndarray]]:
    """Each mean image as the net's input, and after ``steps`` plain gradient steps."""
    from mfv.means import load_rgb
    from mfv.step import gradient_step

    out = []
    for i in range(count):
        path = means / f"mean_{i}.jpg"
        if not path.exists():
            break
        x = facet_net.preprocessing.to_net(load_rgb(path).astype(np.float32))
        out.append((f"mean_{i}", x))
        for _ in range(steps):
            x = gradient_step(facet_net, x, "fc8", unit, 1).x
        if steps:
            out.append((f"mean_{i}+{steps}", x))
    if not out:  # no mean images here: noise around the 2016 background, then the steps
        rng = np.random.RandomState(0)
        for i in range(count):
            from mfv.crops import noise_start

            x = facet_net.preprocessing.to_net(noise_start(rng, 227, 227).astype(np.float32))
            for _ in range(steps):
                x = gradient_step(facet_net, x, "fc8", unit, 1).x
            out.append((f"noise_{i}+{steps}", x))
    return out


def local_errors(net, net64, caffe: dict, unit: int, x: np.ndarray) -> list[str]:
    """Each weighted layer's own input-gradient error: Caffe's top diff through the float64
    layer against Caffe's bottom diff and each torch path's (relative L2)."""
    last, lines = {}, []
    modules32 = {s.name: s.module for s in net.graph.layers}
    for spec in net64.graph.layers:
        source = last.get(spec.bottoms[0]) if spec.bottoms else None
        for t in spec.tops:
            last[t] = spec.name
        if spec.module.type_name not in ("Convolution", "InnerProduct") or source is None:
            continue
        bottom = torch.tensor(caffe[f"top/{source}/0/data"])
        top_diff = torch.tensor(caffe[f"top/{spec.name}/0/diff"])
        if not float(top_diff.abs().max()):
            continue
        xd = bottom.double().requires_grad_(True)
        (exact,) = torch.autograd.grad(spec.module(xd)[0], xd, top_diff.double())
        row = [f"{spec.name:6s} caffe {rel_l2(torch.tensor(caffe[f'top/{source}/0/diff']).double(), exact):.2e}"]
        for path in ("torch", "im2col+blocked", "phases+blocked"):
            with arithmetic(copy.deepcopy(modules32[spec.name]), path) as layer:
                xf = bottom.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(layer(xf)[0], xf, top_diff)
            row.append(f"{path} {rel_l2(grad.double(), exact):.2e}")
        lines.append("  ".join(row))
    return lines


def conv1_table(net, batches, repeats: int, seed: int = 0) -> list[str]:
    """conv1's own input gradient on each of ``CONV1_PATHS``: seconds of the backward alone
    (autograd.grad of a kept forward graph; medians of ``repeats``, the paths interleaved) at
    each batch size, and the relative L2 distance from the float64 layer's gradient (one seeded
    normal input and top gradient at the first batch size)."""
    from porting.layers.convolution import set_conv_path

    conv1 = next(s.module for s in net.graph.layers if s.name == "conv1")
    layer64 = copy.deepcopy(conv1).double()
    generator = torch.Generator().manual_seed(seed)
    rows = {p: [] for p in CONV1_PATHS}
    errors = {}
    for n in batches:
        x = torch.randn((n,) + tuple(conv1.bottom_shapes[0][1:]), generator=generator).requires_grad_(True)
        dy = torch.randn((n,) + tuple(conv1.top_shapes[0][1:]), generator=generator)
        layers = {p: set_conv_path(copy.deepcopy(conv1), p) for p in CONV1_PATHS}
        tops = {p: layer(x)[0] for p, layer in layers.items()}
        if not errors:
            x64 = x.detach().double().requires_grad_(True)
            (exact,) = torch.autograd.grad(layer64(x64)[0], x64, dy.double())
            for p, top in tops.items():
                (grad,) = torch.autograd.grad(top, x, dy, retain_graph=True)
                errors[p] = rel_l2(grad.double(), exact)
        seconds = {p: [] for p in CONV1_PATHS}
        for _ in range(repeats):
            for p, top in tops.items():
                start = time.perf_counter()
                torch.autograd.grad(top, x, dy, retain_graph=True)
                seconds[p].append(time.perf_counter() - start)
        for p in CONV1_PATHS:
            rows[p].append(statistics.median(seconds[p]))
    head = f"{'path':8s} {'vs float64':>10s} " + " ".join(f"{f's batch {n}':>11s} {'x torch':>7s}" for n in batches)
    lines = [head]
    for p in CONV1_PATHS:
        cells = " ".join(f"{t:11.4f} {t / rows['torch'][i]:7.2f}" for i, t in enumerate(rows[p]))
        lines.append(f"{p:8s} {errors[p]:10.2e} {cells}")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--means", type=Path, default=MEANS, help="folder of mean_0.jpg ...")
    parser.add_argument("--crops", type=int, default=5, help="mean images to start from")
    parser.add_argument("--steps", type=int, default=5, help="gradient steps after each start (0: starts only)")
    parser.add_argument("--unit", type=int, default=498)
    parser.add_argument("--repeats", type=int, default=5, help="timed forward+backward runs per path")
    parser.add_argument("--batch", type=int, default=1, help="images per timed forward+backward")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--no-caffe", action="store_true", help="skip real Caffe (torch-drawn Xavier weights)")
    parser.add_argument("--layers", action="store_true", help="each weighted layer's own error on the first crop")
    parser.add_argument("--conv1", type=int, nargs="*", metavar="BATCH",
                        help="also time conv1's own input gradient per conv path at these batch sizes (default 1 10)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from porting.net import load_caffe

    from mfv.step import FacetNet

    with contextlib.ExitStack() as stack:
        worker = weights = None
        if not args.no_caffe:
            from porting.legacy import Worker

            worker = stack.enter_context(Worker())
            weights = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "xavier.caffemodel"
            worker.make_weights(PROTOTXT, weights, filler="xavier", seed=0)
        net = load_caffe(PROTOTXT, weights)
        if weights is None:
            xavier(net)
        facet_net = FacetNet.from_caffe(net)
        from porting.layers.convolution import set_conv_path
        from porting.layers.inner_product import set_inner_product_path

        set_conv_path(net, "torch"), set_inner_product_path(net, "torch")  # whatever from_caffe chose
        net64 = copy.deepcopy(net).double()
        inputs = crops(facet_net, args.means, args.crops, args.steps, args.unit)
        names = list(PATHS) + (["caffe"] if worker else [])
        errors = {p: [] for p in names}
        forward = {p: [] for p in names}
        flipped = {p: [] for p in names}
        seed = np.zeros((1, 1000), np.float32)
        seed[0, args.unit] = 1
        for label, x in inputs:
            exact, exact_fc8, exact_bottoms = gradient(net64, x, args.unit, torch.float64)
            for path in PATHS:
                with arithmetic(net, path):
                    grad, fc8, bottoms = gradient(net, x, args.unit)
                errors[path].append(rel_l2(grad, exact))
                forward[path].append(rel_l2(fc8, exact_fc8))
                flipped[path].append(flips(net64, bottoms, exact_bottoms))
            if worker:
                caffe = worker.run_net(PROTOTXT, weights, inputs={"data": x[None]}, top_diffs={"fc8": seed})
                errors["caffe"].append(rel_l2(torch.tensor(caffe["blob/data/diff"][0]).double(), exact))
                forward["caffe"].append(rel_l2(torch.tensor(caffe["blob/fc8/data"][0]).double(), exact_fc8))
                flipped["caffe"].append(flips(net64, layer_bottoms(
                    net.graph, lambda name, i: caffe[f"top/{name}/{i}/data"]), exact_bottoms))
                if args.layers and label == inputs[0][0]:
                    layers = local_errors(net, net64, caffe, args.unit, x)
            print(f"{label:12s} " + "  ".join(f"{p} {errors[p][-1]:.2e}" for p in names), flush=True)

        seconds = {p: [] for p in PATHS}
        batch = torch.tensor(np.stack([inputs[i % len(inputs)][1] for i in range(args.batch)]))
        for _ in range(args.repeats):
            for path in PATHS:
                with arithmetic(net, path):
                    start = time.perf_counter()
                    forward_backward(net, batch, args.unit)
                    seconds[path].append(time.perf_counter() - start)
        base = statistics.median(seconds["torch"])
        print(f"\nCaffeNet, fc8[{args.unit}], {len(inputs)} crops; timed at batch {args.batch}, "
              f"torch threads {torch.get_num_threads()}")
        print(f"{'path':16s} {'gradient median':>15s} {'max':>9s} {'fc8 median':>10s} {'flips':>6s} "
              f"{'s/fwd+bwd':>9s} {'x torch':>7s}")
        for path in names:
            timing = (f"{statistics.median(seconds[path]):9.3f} {statistics.median(seconds[path]) / base:7.2f}"
                      if path in seconds else f"{'-':>9s} {'-':>7s}")
            print(f"{path:16s} {statistics.median(errors[path]):15.2e} {max(errors[path]):9.2e} "
                  f"{statistics.median(forward[path]):10.2e} {sum(flipped[path]):6d} {timing}")
        if args.conv1 is not None:
            batches = args.conv1 or [1, 10]
            print(f"\nconv1's input gradient alone (backward only, medians of {args.repeats}; "
                  f"relative L2 to float64 at batch {batches[0]}), torch threads {torch.get_num_threads()}:")
            print("\n".join(conv1_table(net, batches, args.repeats)))
        if args.layers and worker:
            print("\neach layer's own input gradient, " + inputs[0][0] + " (relative L2 to float64):")
            print("\n".join(layers))


if __name__ == "__main__":
    main()
