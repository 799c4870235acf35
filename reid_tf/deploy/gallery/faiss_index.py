"""The gallery's faiss side: which index an `index_factory` spec makes and how it is searched,
and its files `<db>.index-<seq>.faiss`, `seq` being the last change the file holds. Plain
functions; `store.GalleryStore` decides when an index is built, applied to, written and read.

IVF indexes take the entries' row ids natively (an `IndexIDMap` around one would shift ids on
removal); Flat, HNSW and refined indexes are wrapped in an `IndexIDMap2`. HNSW and refined
indexes cannot remove entries (the store marks them deleted).

A refined index (`IVF1024,PQ320x4fs,Refine(SQ8)`) scans 4-bit fast-scan PQ codes (160 bytes a
1,280-d entry, searched with SIMD lookup tables) for `REFINE_K_FACTOR` x k candidates, then
re-scores those from 8-bit codes: at a million 1,280-d entries it answered in a tenth of the
time of `IVF1024,SQ8` at the same recall (benchmarks/README.md, `gallery_scale.py`)."""

import glob
import os
import re

INDEX_FILE = re.compile(r"\.index-(\d+)\.faiss$")
REFINE_K_FACTOR = 4  # candidates a refined index re-scores, per result asked


def faiss_module():
    import faiss  # a dependency of the gallery only, imported when a store opens

    return faiss


def empty(dimension, spec):
    """An empty, untrained index of `spec` over inner products."""
    faiss = faiss_module()
    return faiss.index_factory(dimension, spec, faiss.METRIC_INNER_PRODUCT)


def training_size(inner):
    """Entries an untrained index needs to train: 39 per IVF list (faiss's own minimum)."""
    ivf = faiss_module().try_extract_index_ivf(inner)
    return 39 * ivf.nlist if ivf is not None else 256 * 39


def set_search_parameters(inner, nprobe, ef_search):
    faiss = faiss_module()
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        ivf.nprobe = nprobe
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = ef_search
    if is_refined(inner):
        faiss.downcast_index(inner).k_factor = REFINE_K_FACTOR


def is_refined(inner):
    """An index that re-scores its candidates from a second one (`...,Refine(...)`)."""
    faiss = faiss_module()
    return isinstance(faiss.downcast_index(inner), faiss.IndexRefine)


def with_ids(inner):
    """The index that takes the entries' row ids: IVF lists hold ids themselves, the others
    are wrapped in an `IndexIDMap2`."""
    faiss = faiss_module()
    if faiss.try_extract_index_ivf(inner) is not None and not is_refined(inner):
        return inner
    return faiss.IndexIDMap2(inner)


def inner_of(index):
    """The index under the id map (the index itself for IVF)."""
    faiss = faiss_module()
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.downcast_index(index.index)
    return index


def holds_spec(index, dimension, spec):
    """Whether a read index is of the kind `spec` makes, or the exact Flat index that stands in
    while a gallery is too small to train it (a file of another spec is rebuilt)."""
    faiss = faiss_module()
    loaded = faiss.downcast_index(inner_of(index))
    expected = faiss.downcast_index(empty(dimension, spec))
    return isinstance(loaded, (faiss.IndexFlat, type(expected)))


def can_remove(index):
    inner = inner_of(index)
    return not (hasattr(inner, "hnsw") or is_refined(inner))


def ids(index):
    """The row ids an id-mapped index holds."""
    faiss = faiss_module()
    return set(faiss.vector_to_array(faiss.downcast_index(index).id_map).tolist())


def files(db_path):
    """`[(seq, path)]` of the index files of this database, oldest first."""
    if db_path == ":memory:":
        return []
    found = [(int(INDEX_FILE.search(p).group(1)), p)
             for p in glob.glob(glob.escape(db_path) + ".index-*.faiss")
             if INDEX_FILE.search(p)]
    return sorted(found)


def read(path):
    return faiss_module().read_index(path)


def load(path, dimension, spec, nprobe, ef_search):
    """The index of a file, ready to search; RuntimeError when it is unreadable or holds
    another kind of index than `spec` makes (the store then rebuilds)."""
    index = read(path)
    if not holds_spec(index, dimension, spec):
        raise RuntimeError(f"it holds another kind of index than {spec}")
    set_search_parameters(inner_of(index), nprobe, ef_search)
    return index


def remove_files(db_path):
    """Removes every index file of this database (they hold another spec's index)."""
    for _, path in files(db_path):
        os.remove(path)


def write(index, db_path, seq):
    """Writes `index` as the file of change `seq`, whole or not at all (written aside, synced,
    renamed), and removes the older files; returns its path."""
    final = f"{db_path}.index-{seq}.faiss"
    temporary = final + ".tmp"
    try:
        faiss_module().write_index(index, temporary)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, final)  # a file under its seq is always complete
    except BaseException:  # a full disk: no half file left behind
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    for _, older in files(db_path)[:-1]:
        os.remove(older)
    return final


def search(index, queries, k):
    """faiss search; a few queries on one OpenMP thread. faiss would split a single query's
    lists over every core, and next to a model call busy on those cores its threads wait on
    each other: 4.1 ms p50 and 13 ms p99 against 1.5 and 2.0 on one thread (100,000 x 1,280
    entries, IVF256,SQ8, nprobe 16, 2 cores with a training job running)."""
    if len(queries) >= 8:
        return index.search(queries, k)
    faiss = faiss_module()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(queries, k)
    finally:
        faiss.omp_set_num_threads(threads)
