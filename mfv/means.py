"""Mean images of a unit's facets (MFV section 2): cluster a class's images by their codes
and average the images nearest each cluster centre.

Pipeline: each image (RGB, squashed to the net's input size with bilinear resampling
when it is not that size already) -> the net's preprocessing -> its code at ``layer``
(fc7 by default) -> PCA to 50 dimensions -> t-SNE to 2-D -> k-means with k clusters in
the embedding -> per cluster, the m members nearest its centroid (in the embedding)
-> their pixel mean, RGB 0-255, float64. scikit-learn does PCA, t-SNE and k-means,
all seeded.

The authors' published clusters (227x227 member images, mean_<k>.jpg) are reproduced by
averaging the members exactly as they are: the members already have the net's input
size, and the plain mean matches their mean_<k>.jpg to 1.7-3.7 grey levels (mean
absolute error), the residual being their JPEG save at quality 75 (re-encoding our mean
so brings it to 1.0-1.2). tests/test_mfv_means.py holds these measurements.

Many classes at once (``class_means``, `mfv means --classes-root`): one folder of images
per class in, OUT/<class>/ out with the files above. The codes are computed in the calling
process, in batches on the net's device, and cached in OUT/<class>/codes_<layer>.npz
(per image: name, size, mtime, sha256, code; and ``net_key``), so clustering again with
another k or m needs no forward pass. Each class's clustering (PCA, t-SNE, k-means, means,
files) is a Ray task when a Ray session is given (``mfv.distributed``), else runs
in-process; both run it in one thread and write the same bytes. OUT/<class>/means.json is
written last: a rerun skips a class whose outputs were made with the same parameters from
the same images.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from porting.errors import PortingError, escaped, shown
from porting.files import file_digest

from mfv.files import save_figure, save_json, save_npy, save_npz, save_png, truncating_uint8
from mfv.step import FacetNet

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp"}


def list_images(sources) -> list[Path]:
    """Image files of ``sources``: folders (their image files, sorted by name) and files, in order."""
    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            raise PortingError("no such file or folder", path)
    if not found:
        raise PortingError("no images found (looked for " + ", ".join(sorted(IMAGE_SUFFIXES)) + ")",
                           ", ".join(str(s) for s in sources))
    return found


def load_rgb(path, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image file as RGB uint8, H x W x 3; squashed to ``size`` (height, width) with
    bilinear resampling when given and different."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if size is not None and image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise PortingError(f"cannot read image: {err}", path) from None


def mean_image(paths, size: tuple[int, int] | None = None) -> np.ndarray:
    """Pixel mean of the images, RGB 0-255, H x W x 3, float64 (all must share a size)."""
    total = None
    for path in paths:
        rgb = load_rgb(path, size).astype(np.float64)
        if total is not None and rgb.shape != total.shape:
            raise PortingError(f"image is {rgb.shape[1]}x{rgb.shape[0]}, others are "
                               f"{total.shape[1]}x{total.shape[0]}; give a size", path)
        total = rgb if total is None else total + rgb
    return total / len(paths)


def image_codes(net: FacetNet, paths, layer: str = "fc7", batch_size: int = 16,
                progress: bool = True) -> np.ndarray:
    """Each image's code at ``layer``, flattened: (N, D) float32. For a Caffe net the
    code is the blob after a full forward, as pycaffe shows it (fc7 after relu7)."""
    prep = net.preprocessing
    codes = []
    for start in tqdm(range(0, len(paths), batch_size), disable=not progress, desc=f"codes {layer}", unit="batch"):
        batch = np.stack([prep.to_net(load_rgb(p, prep.input_size)) for p in paths[start:start + batch_size]])
        with torch.no_grad():
            out = net.blob_output(torch.from_numpy(batch).to(net.device), layer)
        codes.append(out.reshape(len(batch), -1).cpu().numpy().astype(np.float32))
    return np.concatenate(codes)


@dataclass
class Clusters:
    embedding: np.ndarray      # (N, 2) t-SNE embedding
    labels: np.ndarray         # (N,) cluster of each image
    centroids: np.ndarray      # (k, 2) k-means centres in the embedding
    members: list              # per cluster: indices of its m images nearest the centre, nearest first
    distances: list            # per cluster: their distances to the centre


def cluster_codes(codes: np.ndarray, k: int = 10, m: int = 15, seed: int = 0, pca_dims: int = 50,
                  tsne_iterations: int = 1000) -> Clusters:
    """PCA (to ``pca_dims``, fewer when there are fewer images) -> t-SNE 2-D -> k-means.

    A cluster with fewer than m images gives all of them. Perplexity is 30, or
    (N - 1) / 3 for fewer than 91 images (t-SNE needs it below N).
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = len(codes)
    if n < max(k, 4):
        raise ValueError(f"need at least {max(k, 4)} images for {k} clusters, got {n}")
    dims = min(pca_dims, n, codes.shape[1])
    reduced = PCA(n_components=dims, random_state=seed).fit_transform(np.asarray(codes, dtype=np.float64))
    perplexity = min(30.0, (n - 1) / 3.0)
    embedding = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                     max_iter=tsne_iterations, random_state=seed).fit_transform(reduced)
    kmeans = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(embedding)
    members, distances = [], []
    for c in range(k):
        index = np.flatnonzero(kmeans.labels_ == c)
        dist = np.linalg.norm(embedding[index] - kmeans.cluster_centers_[c], axis=1)
        order = np.argsort(dist, kind="stable")[:m]
        members.append(index[order])
        distances.append(dist[order])
    return Clusters(embedding, kmeans.labels_, kmeans.cluster_centers_, members, distances)


def plot_embedding(clusters: Clusters, means: list[np.ndarray], title: str = ""):
    """The paper's Fig. 4 layout: the 2-D embedding coloured by cluster, each cluster's
    mean image placed beside its centre. Returns a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    fig, ax = plt.subplots(figsize=(10, 10))
    colors = plt.get_cmap("tab10" if len(means) <= 10 else "tab20")
    for c in range(len(means)):
        points = clusters.embedding[clusters.labels == c]
        ax.scatter(points[:, 0], points[:, 1], s=8, color=colors(c % colors.N), alpha=0.6, label=f"cluster {c}")
    span = np.ptp(clusters.embedding, axis=0).max() or 1.0
    centre = clusters.embedding.mean(axis=0)
    for c, mean in enumerate(means):
        away = clusters.centroids[c] - centre
        away = away / (np.linalg.norm(away) or 1.0) * 0.16 * span
        box = AnnotationBbox(OffsetImage(truncating_uint8(mean), zoom=0.3), clusters.centroids[c] + away,
                             xycoords="data", frameon=True,
                             bboxprops={"edgecolor": colors(c % colors.N), "linewidth": 2})
        ax.add_artist(box)
        ax.annotate(str(c), clusters.centroids[c], fontsize=12, weight="bold")
    ax.margins(0.2)
    ax.set_title(title or "t-SNE embedding of image codes, k-means clusters and their mean images")
    ax.set_xticks([])
    ax.set_yticks([])
    plt.close(fig)
    return fig


@dataclass
class MeansResult:
    paths: list                # the images, in code order
    clusters: Clusters
    means: list                # per cluster: RGB 0-255 float64 mean of its members
    files: dict                # what was written


def facet_means(net: FacetNet, sources, out_dir, layer: str = "fc7", k: int = 10, m: int = 15, seed: int = 0,
                batch_size: int = 16, progress: bool = True, tsne_iterations: int = 1000) -> MeansResult:
    """Run the pipeline and write, under ``out_dir``: mean_<c>.png (8-bit, truncating as
    the 2016 code) and mean_<c>.npy (float64 RGB), clusters.json (members with paths and
    distances, per-image labels, parameters), embedding.npy and embedding.png (the plot)."""
    paths = list_images(sources)
    codes = image_codes(net, paths, layer, batch_size, progress)
    return write_means(paths, codes, out_dir, net.preprocessing.input_size, layer=layer, k=k, m=m, seed=seed,
                       tsne_iterations=tsne_iterations)


def write_means(paths, codes: np.ndarray, out_dir, size: tuple[int, int] | None, layer: str = "fc7", k: int = 10,
                m: int = 15, seed: int = 0, tsne_iterations: int = 1000) -> MeansResult:
    """``facet_means`` from the codes on: cluster, average the members (squashed to
    ``size``), write the files."""
    clusters = cluster_codes(codes, k=k, m=m, seed=seed, tsne_iterations=tsne_iterations)
    means = [mean_image([paths[i] for i in members], size) for members in clusters.members]
    out = Path(out_dir)
    files = {}
    for c, mean in enumerate(means):
        files[f"mean_{c}.png"] = save_png(out / f"mean_{c}.png", truncating_uint8(mean))
        files[f"mean_{c}.npy"] = save_npy(out / f"mean_{c}.npy", mean)
    files["embedding.npy"] = save_npy(out / "embedding.npy", clusters.embedding)
    files["clusters.json"] = save_json(out / "clusters.json", {
        "layer": layer, "k": k, "m": m, "seed": seed, "images": [str(p) for p in paths],
        "labels": clusters.labels.tolist(),
        "clusters": [{"cluster": c, "size": int((clusters.labels == c).sum()),
                      "centroid": clusters.centroids[c].tolist(),
                      "members": [str(paths[i]) for i in clusters.members[c]],
                      "distances": clusters.distances[c].tolist()} for c in range(k)],
    })
    files["embedding.png"] = save_figure(out / "embedding.png", plot_embedding(clusters, means, f"t-SNE of {layer or 'output'} codes, k-means clusters and their mean images"))
    return MeansResult(paths, clusters, means, files)


# Many classes at once (`mfv means --classes-root`) -------------------------------------

MARKER = "means.json"       # written last in a class's folder: what its outputs were made from


def _warn(text: str) -> None:
    """One line on stderr (names from strangers' files escaped), beside a progress bar."""
    tqdm.write(f"mfv: warning: {escaped(text)}", file=sys.stderr)


@dataclass(frozen=True)
class ClassFolder:
    name: str          # the folder's name, also its output folder's name
    folder: Path
    label: str = ""    # its description from --synsets


def list_classes(root, synsets=None, exclude=(), warn=_warn) -> list[ClassFolder]:
    """The class folders of ``root`` (sub-folders not starting with "."), sorted by name,
    or with ``synsets`` (a synset_words.txt, read by ``mfv.sweep.read_synset_list``: line
    u is unit u) those it lists, in its order, labelled with their class names. Folders in
    ``exclude`` (e.g. the output folder) are left out."""
    root = Path(root)
    if not root.exists():
        raise PortingError("no such folder", root)
    if not root.is_dir():
        raise PortingError("not a folder (--classes-root holds one folder of images per class)", root)
    skip = {Path(p).resolve() for p in exclude}
    try:
        folders = sorted((p for p in root.iterdir() if not p.name.startswith(".") and p.is_dir()
                          and p.resolve() not in skip), key=lambda p: p.name)
    except OSError as err:
        raise PortingError(f"cannot list it: {err.strerror or err}", root) from None
    if synsets is None:
        classes = [ClassFolder(p.name, p) for p in folders]
    else:
        from mfv.sweep import read_synset_list

        entries = read_synset_list(synsets)
        present = {p.name: p for p in folders}
        listed = {name for name, _ in entries}
        classes = [ClassFolder(name, present.pop(name), label) for name, label in entries if name in present]
    if not classes:
        raise PortingError("no class folders in it (one folder of images per class)" if synsets is None
                           else f"none of its folders is listed in {shown(synsets)}", root)
    if synsets is not None:
        unlisted = [p.name for p in folders if p.name not in listed]
        if unlisted:
            warn(f"{root}: {len(unlisted)} folders not in {synsets} left out (first: {shown(unlisted[0])})")
        if len(classes) < len(entries):
            warn(f"{synsets}: {len(entries) - len(classes)} of its {len(entries)} synsets have no folder "
                 f"in {root}")
    return classes


def net_key(net: FacetNet, layer: str) -> str:
    """sha256 (hex) of what a code depends on besides the image: every parameter and
    buffer (name, dtype, shape, bytes), the net's structure (a porting CaffeNet's layer
    parameters without their weight blobs; a torch module's repr), the preprocessing and
    the layer. Not the device: codes from another device are reused."""
    digest = hashlib.sha256()
    graph = getattr(net.module, "graph", None)
    if graph is not None:
        for spec in graph.layers:
            param = type(spec.param)()
            param.CopyFrom(spec.param)
            param.ClearField("blobs")
            digest.update(param.SerializeToString(deterministic=True))
    else:
        digest.update(repr(net.module).encode())
    digest.update(repr(net.preprocessing).encode() + b"\0" + layer.encode() + b"\0")
    for name, tensor in sorted(net.module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def codes_file(out_dir, layer: str) -> Path:
    """Where a class's codes are cached: OUT/<class>/codes_<layer>.npz ("output" for "")."""
    return Path(out_dir) / f"codes_{re.sub(r'[^A-Za-z0-9._-]', '_', layer) or 'output'}.npz"


def _stats(paths) -> list[list]:
    """[name, size in bytes, mtime in ns] of each image (-1, -1 when it cannot be stat'ed)."""
    rows = []
    for p in paths:
        try:
            st = p.stat()
            rows.append([p.name, st.st_size, st.st_mtime_ns])
        except OSError:
            rows.append([p.name, -1, -1])
    return rows


def _read_cache(path: Path, key: str, layer: str, warn) -> dict | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            cache = {name: npz[name] for name in ("key", "layer", "names", "sizes", "mtimes", "digests",
                                                   "readable", "codes")}
        n = len(cache["names"])
        if not (cache["codes"].ndim == 2 and cache["codes"].dtype == np.float32 and len(cache["codes"]) == n
                and all(len(cache[a]) == n for a in ("sizes", "mtimes", "digests", "readable"))):
            raise ValueError("arrays of different lengths")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        warn(f"{path}: cached codes unreadable ({err}): computed again")
        return None
    if str(cache["key"]) != key or str(cache["layer"]) != layer:
        return None  # another net or layer: its codes say nothing about this one's
    return cache


def cached_codes(net: FacetNet, paths, cache_path, key: str, layer: str = "fc7", batch_size: int = 16,
                 warn=_warn) -> tuple[np.ndarray, np.ndarray, int]:
    """Codes of ``paths`` at ``layer``, reusing the cache file's (``codes_file``) codes of
    images with the same name and size and either the same mtime or the same sha256, and
    computing the rest in batches of ``batch_size`` on the net's device; the cache is
    rewritten (atomically) when anything changed. An image that cannot be read is left
    out with a warning naming it (and tried again on the next run).

    Returns (codes of the readable images, (R, D) float32; readable, (N,) bool; how many
    images went through the net). The cache holds, per image: name, size, mtime (ns),
    sha256, readable, code (NaN when unreadable); and the net's ``net_key`` and the layer."""
    paths = [Path(p) for p in paths]
    cache_path = Path(cache_path)
    cache = _read_cache(cache_path, key, layer, warn)
    old = {} if cache is None else {str(name): i for i, name in enumerate(cache["names"])}
    stats = _stats(paths)
    n = len(paths)
    digests = [""] * n
    readable = np.ones(n, bool)
    rows: dict[int, np.ndarray] = {}
    todo, changed = [], cache is None or len(old) != n
    for j, (p, (name, size, mtime)) in enumerate(zip(paths, stats)):
        i = old.get(name)
        if i is not None and int(cache["sizes"][i]) == size >= 0 and cache["readable"][i]:
            same_mtime = int(cache["mtimes"][i]) == mtime
            digests[j] = str(cache["digests"][i]) if same_mtime else _digest(p)
            if digests[j] == str(cache["digests"][i]):
                rows[j] = cache["codes"][i]
                changed = changed or not same_mtime
                continue
        else:
            digests[j] = _digest(p)
        changed = True
        todo.append(j)
    prep = net.preprocessing
    encoded = 0
    for start in range(0, len(todo), batch_size):
        batch, where = [], []
        for j in todo[start:start + batch_size]:
            try:
                batch.append(prep.to_net(load_rgb(paths[j], prep.input_size)))
                where.append(j)
            except PortingError as err:
                warn(f"{err}: left out of its class")
                readable[j] = False
        if batch:
            encoded += len(batch)
            with torch.no_grad():
                out = net.blob_output(torch.from_numpy(np.stack(batch)).to(net.device), layer)
            for j, code in zip(where, out.reshape(len(batch), -1).cpu().numpy().astype(np.float32)):
                rows[j] = code
    width = next((len(r) for j, r in rows.items() if readable[j]), 0)
    codes = np.full((n, width), np.nan, np.float32)
    for j, row in rows.items():
        if readable[j]:
            codes[j] = row
    if changed:
        save_npz(cache_path, key=np.array(key), layer=np.array(layer),
                 names=np.array([s[0] for s in stats], dtype=str).reshape(n),
                 sizes=np.array([s[1] for s in stats], np.int64), mtimes=np.array([s[2] for s in stats], np.int64),
                 digests=np.array(digests, dtype=str).reshape(n), readable=readable, codes=codes)
    return codes[readable], readable, encoded


def _digest(path: Path) -> str:
    try:
        return file_digest(path)
    except OSError:
        return ""  # unreadable: load_rgb names it


def _parameters(key: str, layer: str, k: int, m: int, seed: int, tsne_iterations: int) -> dict:
    return {"net": key, "layer": layer, "k": k, "m": m, "seed": seed, "tsne_iterations": tsne_iterations}


def up_to_date(out_dir, parameters: dict, images: list[list]) -> bool:
    """A class's outputs are there, made with these parameters from these images (name,
    size, mtime): its marker file says so and every file it lists exists."""
    try:
        record = json.loads((Path(out_dir) / MARKER).read_text())
        return (record["parameters"] == parameters and record["images"] == images
                and all((Path(out_dir) / f).is_file() for f in record["files"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def cluster_class(out_dir: str, paths: list[str], codes: np.ndarray, record: dict, size, layer: str, k: int,
                  m: int, seed: int, tsne_iterations: int) -> dict:
    """One class's clusters, means and files (a Ray task, or called in-process): its marker
    removed first, then ``write_means`` in one thread (threads change t-SNE's and k-means'
    sums, so one thread gives the same result everywhere), mean_<c> files of an earlier
    larger k removed, the marker ``record`` (plus files and cluster sizes) written last."""
    from threadpoolctl import threadpool_limits

    out = Path(out_dir)
    (out / MARKER).unlink(missing_ok=True)
    with threadpool_limits(1):
        result = write_means([Path(p) for p in paths], codes, out, size, layer=layer, k=k, m=m, seed=seed,
                             tsne_iterations=tsne_iterations)
    for stale in out.glob("mean_*.*"):
        if stale.name not in result.files and re.fullmatch(r"mean_\d+\.(png|npy)", stale.name):
            stale.unlink()
    sizes = [int((result.clusters.labels == c).sum()) for c in range(k)]
    save_json(out / MARKER, dict(record, files=sorted(result.files), sizes=sizes))
    return {"sizes": sizes, "files": len(result.files) + 1}


@dataclass
class ClassesResult:
    clustered: list     # classes whose outputs were made in this run
    up_to_date: list    # classes left as they were: outputs with the same parameters and images exist
    failed: dict        # class -> its one-line problem (the other classes were finished)
    encoded: int        # images that went through the net
    left_out: dict      # class -> unreadable images left out of it


def class_images(classes: list[ClassFolder], k: int = 10) -> list[tuple[ClassFolder, list[Path]]]:
    """Each class with its images (absolute paths: Ray workers have another working
    folder); a class with no images, or too few for ``k`` clusters, is an error before
    any work is done."""
    if k < 1:
        raise PortingError(f"-k must be at least 1, not {k}")
    listed = []
    for cls in classes:
        paths = [p.absolute() for p in list_images([cls.folder])]
        if len(paths) < max(k, 4):
            raise PortingError(f"{len(paths)} images, too few for {k} clusters (at least {max(k, 4)})", cls.folder)
        listed.append((cls, paths))
    return listed


def class_means(net: FacetNet, classes: list[tuple[ClassFolder, list[Path]]], out_root, layer: str = "fc7", k: int = 10,
                m: int = 15, seed: int = 0, batch_size: int = 16, ray=None, progress: bool = True,
                tsne_iterations: int = 1000, warn=_warn) -> ClassesResult:
    """``facet_means`` for each class of ``classes`` (from ``class_images``), in
    OUT/<class>/ (the same files, plus the cached
    codes ``codes_file`` and the marker ``MARKER``). Codes are computed here, in batches
    on the net's device, and cached; each class's clustering runs as a Ray task when
    ``ray`` (an initialised ``ray`` module, see ``mfv.distributed``) is given, else here,
    one class after another, with the same results. A class whose outputs were made with
    the same parameters from the same images is left alone; a class that cannot be
    clustered (too few readable images) is reported in ``failed``, the others finished."""
    if m < 1:
        raise PortingError(f"-m must be at least 1, not {m}")
    out_root = Path(out_root).absolute()
    key = net_key(net, layer)
    parameters = _parameters(key, layer, k, m, seed, tsne_iterations)
    size = net.preprocessing.input_size
    result = ClassesResult([], [], {}, 0, {})
    remote = None if ray is None else ray.remote(num_cpus=1, max_retries=2)(cluster_class)
    limit = 2 * max(1, int(ray.cluster_resources().get("CPU", 1))) if ray is not None else 0
    pending: dict = {}
    bar = tqdm(total=len(classes), disable=not progress, desc="classes", unit="class")

    def finished(name: str, outcome=None, error: BaseException | None = None) -> None:
        if error is None:
            result.clustered.append(name)
        elif isinstance(error, (PortingError, ValueError)):
            result.failed[name] = str(error)
            warn(f"{name}: {error}")
        else:
            raise error
        bar.update()

    def collect(wait_for_one: bool) -> None:
        if not pending:
            return
        ready, _ = ray.wait(list(pending), num_returns=1 if wait_for_one else len(pending),
                            timeout=None if wait_for_one else 0)
        for ref in ready:
            name = pending.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayTaskError as err:  # the task raised: judged by what it raised
                from mfv.distributed import cause

                finished(name, error=cause(err))
            except ray.exceptions.RayError as err:  # Ray's own failure (e.g. its worker lost, after retries)
                lines = str(err).strip().splitlines()
                finished(name, error=PortingError(f"Ray: {type(err).__name__}: {lines[0] if lines else ''}"))
            else:
                finished(name, outcome)

    try:
        for cls, paths in classes:
            out = out_root / cls.name
            images = _stats(paths)
            if up_to_date(out, parameters, images):
                result.up_to_date.append(cls.name)
                bar.update()
                continue
            codes, readable, encoded = cached_codes(net, paths, codes_file(out, layer), key, layer, batch_size,
                                                    warn=warn)
            result.encoded += encoded
            bar.set_postfix(images=result.encoded)
            kept = [str(p) for p, ok in zip(paths, readable) if ok]
            left_out = [p.name for p, ok in zip(paths, readable) if not ok]
            if left_out:
                result.left_out[cls.name] = left_out
            record = {"class": cls.name, "label": cls.label, "parameters": parameters, "images": images,
                      "left_out": left_out}
            arguments = (str(out), kept, codes, record, size, layer, k, m, seed, tsne_iterations)
            if remote is None:
                try:
                    finished(cls.name, cluster_class(*arguments))
                except (PortingError, ValueError) as err:
                    finished(cls.name, error=err)
                continue
            pending[remote.remote(*arguments)] = cls.name
            collect(wait_for_one=len(pending) >= limit)
        while pending:
            collect(wait_for_one=True)
    finally:
        bar.close()
    return result
