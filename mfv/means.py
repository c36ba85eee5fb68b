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
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from porting.errors import PortingError

from mfv.files import save_figure, save_json, save_npy, save_png, truncating_uint8
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
    except (OSError, UnidentifiedImageError) as err:
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
    clusters = cluster_codes(codes, k=k, m=m, seed=seed, tsne_iterations=tsne_iterations)
    size = net.preprocessing.input_size
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
