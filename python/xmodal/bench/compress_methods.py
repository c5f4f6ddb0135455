"""The methods ``xmodal bench compress`` compares and their names: xmodal's FlatIndexes (float32, int8,
binary searched at each rescore, PCA + int8) and faiss-cpu's counterparts (flat, SQ8, IndexBinaryFlat
rescored against the SQ8 index's decoded rows, PCA + SQ8), each built on the same rows into a
:class:`Method` (search call, index bytes, build time); and recall@k of what a method found.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

import xmodal

RESCORES = (1, 2, 4, 10)
CHUNK = 65536                          # rows per faiss add
BASELINE = "xmodal[float32]"  # exact float32 FlatIndex: the ground truth and the speed baseline


def reduced_dim(d: int) -> int:
    """The PCA target dimension: 128 for D = 512 (D / 4 in general)."""
    return max(1, d // 4)


def method_names(d: int, use_faiss: bool = True) -> List[str]:
    """Every method timed, xmodal's first; "[binary r=R]" rows share one index searched with rescore R."""
    r = reduced_dim(d)
    names = ["xmodal[float32]", "xmodal[int8]"] + [f"xmodal[binary r={s}]" for s in RESCORES] + [f"xmodal[pca{r}+int8]"]
    if use_faiss:
        names += ["faiss[flat]", "faiss[sq8]"] + [f"faiss[binary r={s}]" for s in RESCORES] + [f"faiss[pca{r}+sq8]"]
    return names


def counterpart(name: str) -> Optional[str]:
    """The faiss method an xmodal one is compared with (None for faiss methods)."""
    if not name.startswith("xmodal["):
        return None
    inner = name[len("xmodal["):-1]
    if inner == "float32":
        return "faiss[flat]"
    if inner == "int8":
        return "faiss[sq8]"
    if inner.startswith("binary"):
        return f"faiss[{inner}]"
    return f"faiss[{inner.replace('+int8', '+sq8')}]"


# --- the methods ------------------------------------------------------------------------------------------

@dataclass
class Method:
    """One way to search: ``search(queries [Q, d] float32 tensor) -> ids [Q, k]`` (tensor or array)."""
    search: Callable[[object], object]
    nbytes: int
    build_seconds: float


def _timed(build: Callable[[], object]) -> Tuple[object, float]:
    start = time.perf_counter()
    out = build()
    return out, time.perf_counter() - start


def xmodal_methods(x: torch.Tensor, k: int) -> Dict[str, Method]:
    """The xmodal FlatIndexes (cosine): float32, int8, binary (one index, four rescore settings), PCA + int8;
    each built by one ``add`` (which trains the codec / PCA on the rows added)."""
    d = x.shape[1]
    r = reduced_dim(d)
    out: Dict[str, Method] = {}

    def build(**options):
        index = xmodal.FlatIndex(d, "cosine", **options)
        index.add(x)
        return index

    for name, options in (("float32", {}), ("int8", {"codec": "int8"}), ("binary", {"codec": "binary"}),
                          (f"pca{r}+int8", {"codec": "int8", "reduce_to": r})):
        index, seconds = _timed(lambda: build(**options))
        if name == "binary":
            for s in RESCORES:
                out[f"xmodal[binary r={s}]"] = Method(
                    lambda q, index=index, s=s: index.search(q, k, rescore=s)[1], index.nbytes, seconds)
        else:
            out[f"xmodal[{name}]"] = Method(lambda q, index=index: index.search(q, k)[1], index.nbytes, seconds)
    return out


def import_faiss():
    """The faiss module, or None when it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _float_vector_bytes(faiss, vec) -> int:
    return int(faiss.vector_to_array(vec).nbytes)


def faiss_methods(x: torch.Tensor, k: int) -> Dict[str, Method]:
    """faiss-cpu's counterparts (inner product on the unit rows = cosine), added in chunks of 65,536 rows:
    IndexFlatIP, IndexScalarQuantizer QT_8bit, IndexBinaryFlat on the signs of (row - mean) with the best
    rescore * k Hamming matches rescored against the SQ8 index's decoded rows (reconstruct_batch), and
    PCAMatrix + L2 normalisation + SQ8 in an IndexPreTransform. Empty when faiss is not installed."""
    faiss = import_faiss()
    if faiss is None:
        return {}
    faiss.omp_set_num_threads(torch.get_num_threads())
    n, d = x.shape
    r = reduced_dim(d)
    xn = x.numpy()
    out: Dict[str, Method] = {}

    def add_chunks(index, encode=lambda rows: rows):
        for start in range(0, n, CHUNK):
            index.add(encode(xn[start:start + CHUNK]))
        return index

    def as_numpy(q):
        return np.ascontiguousarray(q.numpy() if torch.is_tensor(q) else q, dtype=np.float32)

    flat, seconds = _timed(lambda: add_chunks(faiss.IndexFlatIP(d)))
    out["faiss[flat]"] = Method(lambda q: flat.search(as_numpy(q), k)[1], flat.ntotal * flat.code_size, seconds)

    def build_sq8():
        index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        index.train(xn)
        return add_chunks(index)

    sq8, sq8_seconds = _timed(build_sq8)
    sq8_bytes = sq8.ntotal * sq8.code_size + _float_vector_bytes(faiss, sq8.sq.trained)
    out["faiss[sq8]"] = Method(lambda q: sq8.search(as_numpy(q), k)[1], sq8_bytes, sq8_seconds)

    def build_binary():
        total = torch.zeros(d, dtype=torch.float64)
        for start in range(0, n, CHUNK):
            total += x[start:start + CHUNK].sum(0, dtype=torch.float64)
        mean = (total / n).float().numpy()
        index = faiss.IndexBinaryFlat(d)
        add_chunks(index, lambda rows: np.packbits(rows > mean, axis=1, bitorder="little"))
        return index, mean

    (binary, mean), binary_seconds = _timed(build_binary)
    binary_bytes = binary.ntotal * binary.code_size + mean.nbytes + sq8_bytes

    def binary_search(q, rescore):
        q = as_numpy(q)
        wide = min(rescore * k, n)
        _, candidates = binary.search(np.packbits(q > mean, axis=1, bitorder="little"), wide)
        rows = sq8.reconstruct_batch(candidates.ravel()).reshape(q.shape[0], wide, d)
        keys = np.einsum("qd,qwd->qw", q, rows) / np.maximum(np.linalg.norm(rows, axis=2), 1e-12)
        best = np.argpartition(-keys, k - 1, axis=1)[:, :k] if wide > k else np.arange(wide)[None].repeat(q.shape[0], 0)
        order = np.argsort(-np.take_along_axis(keys, best, 1), axis=1, kind="stable")
        return np.take_along_axis(candidates, np.take_along_axis(best, order, 1), 1)

    for s in RESCORES:
        out[f"faiss[binary r={s}]"] = Method(lambda q, s=s: binary_search(q, s), binary_bytes,
                                             binary_seconds + sq8_seconds)

    def build_pca():
        pca = faiss.PCAMatrix(d, r)
        norm = faiss.NormalizationTransform(r, 2.0)
        sq = faiss.IndexScalarQuantizer(r, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexPreTransform(norm, sq)
        index.prepend_transform(pca)  # chain: PCA, then L2 normalisation (cosine in the reduced space, as xmodal)
        index.train(xn)
        add_chunks(index)
        return index, (pca, norm, sq)

    (pca_index, parts), pca_seconds = _timed(build_pca)
    pca, _, pca_sq = parts
    pca_bytes = (pca_sq.ntotal * pca_sq.code_size + _float_vector_bytes(faiss, pca_sq.sq.trained)
                 + _float_vector_bytes(faiss, pca.A) + _float_vector_bytes(faiss, pca.b))
    # parts=parts: the IndexPreTransform points at these objects; they must outlive the search call
    out[f"faiss[pca{r}+sq8]"] = Method(lambda q, parts=parts: pca_index.search(as_numpy(q), k)[1], pca_bytes,
                                       pca_seconds)
    return out


# --- what a method found ------------------------------------------------------------------------------------

def found_ids(found) -> torch.Tensor:
    """A method's ids (tensor or array) as an int64 tensor."""
    return found.to(torch.int64) if torch.is_tensor(found) else torch.from_numpy(np.asarray(found, dtype=np.int64))
