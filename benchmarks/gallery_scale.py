"""A million-entry live gallery: recall@10 against exact search, search latency, RSS, start-up.

--size synthetic embeddings of --dim (1280 = PL-Net K=4 x 256, the export's width), clustered as
ReID galleries are (--identities centres, each entry a centre plus noise), are added to a
gallery (`--backend`: the SQLite + faiss store with `--index`, Milvus Lite with
`--milvus_index`, a standalone Milvus server (the `milvus` package's, started here with its data
in the work folder), or several, one after the other on the same data) in batches; each trains
its index itself. Then
--queries held-out queries (new views of gallery identities) and their exact top 10
(inner product over the same vectors, in blocks) are written next to the database, and a fresh
process, as a restarted server would, opens the store from its persisted index file (start-up
time), searches (recall@10 against exact, per-query latency of single-query searches p50/p99)
and reports its own peak RSS: what a serving process holds, not the generator's arrays.
`--nprobes` searches again at each of several nprobe values (the recall/latency curve), and
`--json` appends one line per backend and setting, with the CPU's model and units.

    python benchmarks/gallery_scale.py [--size=1000000] [--index=IVF1024,SQ8] [--nprobe=16]
    python benchmarks/gallery_scale.py --backend=both --milvus_index=IVF_SQ8   # side by side
    python benchmarks/gallery_scale.py --backend=sqlite,milvus_server --nprobes=16,32,48

Reported per backend: ingest rate, build time, recall@10, p50/p99 per query, filtered search,
peak RSS of the searching process.
"""

import contextlib
import json
import os
import shutil
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from reid_tf import testing
from reid_tf.deploy.gallery import store as gallery_store

FLAGS = flags.FLAGS
flags.DEFINE_integer("size", 1_000_000, "Gallery entries.")
flags.DEFINE_integer("dim", 1280, "Embedding width.")
flags.DEFINE_integer("identities", 50_000, "Cluster centres (people).")
flags.DEFINE_float("noise", 0.6, "Per-entry noise, relative to the centre's norm.")
flags.DEFINE_string("index", "IVF1024,SQ8", "faiss index_factory string.")
flags.DEFINE_integer("nprobe", 16, "IVF lists searched.")
flags.DEFINE_integer("queries", 1000, "Queries for recall; 200 of them timed one by one.")
flags.DEFINE_string("workdir", None, "Where the database goes (default: a temporary folder).")
flags.DEFINE_bool("search_only", False, "Internal: open the store in --workdir and search.")
BACKENDS = ("sqlite", "milvus", "milvus_server")
flags.DEFINE_list("backend", ["sqlite"], f"Gallery backends, of {', '.join(BACKENDS)} ('both': "
                  "sqlite,milvus).")
flags.DEFINE_string("milvus_index", "IVF_SQ8", "Milvus's vector index (with --nlist, "
                    "--nprobe).")
flags.DEFINE_list("nprobes", [], "Search again at each of these nprobe values (the curve).")
flags.DEFINE_string("milvus_uri", None, "Internal: the running Milvus server's URI.")
flags.DEFINE_string("json", None, "Append one JSON line per backend and nprobe to this file.")
flags.DEFINE_integer("nlist", 1024, "IVF lists of the Milvus index.")


def open_gallery(backend, folder, dim=None, log=print):
    """The benchmark's gallery of `backend` in `folder` (created with `dim`, or reopened)."""
    if backend == "sqlite":
        return gallery_store.GalleryStore(os.path.join(folder, "gallery.sqlite"), dim,
                                          index=FLAGS.index, nprobe=FLAGS.nprobe,
                                          persist_every=0, log=log)
    from reid_tf.deploy.gallery import milvus

    uri = FLAGS.milvus_uri if backend == "milvus_server" else os.path.join(
        folder, "gallery_milvus.db")
    return milvus.MilvusGallery(uri, dim, index=FLAGS.milvus_index, nlist=FLAGS.nlist,
                                nprobe=FLAGS.nprobe, log=log)


def set_nprobe(store, nprobe):
    """Searches of `store` from now on probe `nprobe` lists."""
    if hasattr(store, "search_params"):  # Milvus
        store.search_params["params"]["nprobe"] = nprobe
    else:
        from reid_tf.deploy.gallery import faiss_index

        faiss_index.set_search_parameters(faiss_index.inner_of(store.index), nprobe,
                                          store.ef_search)


def record(**figures):
    """One JSON line of `figures`, with the machine, to --json."""
    if FLAGS.json:
        with open(FLAGS.json, "a") as f:
            f.write(json.dumps({"cpu": testing.cpu_facts(), "date": time.strftime("%Y-%m-%d"),
                                "size": FLAGS.size, "dim": FLAGS.dim, "index": FLAGS.index,
                                "milvus_index": FLAGS.milvus_index, **figures}) + "\n")


def embeddings(rng, centres, count):
    owners = rng.integers(0, len(centres), count)
    vectors = centres[owners] + FLAGS.noise * rng.normal(
        size=(count, FLAGS.dim)).astype(np.float32) / np.sqrt(FLAGS.dim)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def exact_top(gallery_chunks, queries, k=10):
    """Exact top-k ids (inner product) over the gallery, streamed in chunks."""
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), k), np.int64)
    for offset, chunk in gallery_chunks:
        scores = queries @ chunk.T
        ids = np.broadcast_to(np.arange(offset, offset + len(chunk)), scores.shape)
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_ids, ids], axis=1)
        order = np.argpartition(-scores, k, axis=1)[:, :k]
        best_scores = np.take_along_axis(scores, order, 1)
        best_ids = np.take_along_axis(ids, order, 1)
    return best_ids


def search_phase(folder):
    """In a fresh process: open the persisted store, search, report."""
    begin = time.perf_counter()
    backend = FLAGS.backend[0]
    store = open_gallery(backend, folder, log=lambda line: print(line, flush=True))
    startup = time.perf_counter() - begin
    assert len(store) == FLAGS.size, len(store)
    data = np.load(os.path.join(folder, "queries.npz"))
    queries, truth = data["queries"], data["truth"]
    for nprobe in [int(n) for n in FLAGS.nprobes] or [FLAGS.nprobe]:
        set_nprobe(store, nprobe)
        found = store.search(queries, k=10)
        recall = np.mean([len({int(m["id"]) for m in matches} & set(row.tolist())) / 10
                          for matches, row in zip(found, truth)])
        latencies = []
        for query in queries[:200]:
            begin = time.perf_counter()
            store.search(query[None], k=10)
            latencies.append(time.perf_counter() - begin)
        p50, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 99])
        print(f"[{backend}] nprobe {nprobe}: recall@10 vs exact: {recall:.4f}; search p50 "
              f"{p50:.2f} ms, p99 {p99:.2f} ms per query (1 query per call, k=10); start-up "
              f"from the index file {startup:.1f} s; peak RSS of this process "
              f"{testing.peak_rss_gib():.2f} GiB", flush=True)
        record(backend=backend, nprobe=nprobe, recall_at_10=float(recall), p50_ms=float(p50),
               p99_ms=float(p99), startup_s=startup, peak_rss_gib=testing.peak_rss_gib())
    set_nprobe(store, FLAGS.nprobe)
    filtered_phase(store, queries, backend)
    store.close()  # the SQLite store writes its index file: the next start loads it


def filtered_phase(store, queries, backend):
    """Filtered searches, one query per call, k=10: a time range passing 0.1 % of the entries
    (searched exactly from the database), the same plus a camera excluded, and a range passing
    half (post-filtered from bounded index candidates); p50/p99 and the peak RSS after."""
    rng = np.random.default_rng(3)
    window = max(1, FLAGS.size // 1000)
    cases = [("time range, 0.1 %", lambda t: {"time_range": (t, t + window - 1)}),
             ("time range 0.1 % + exclude_camera", lambda t: {"time_range": (t, t + window - 1),
                                                              "exclude_camera": 3}),
             ("time range, 50 %", lambda t: {"time_range": (t, t + FLAGS.size // 2 - 1)})]
    for name, options in cases:
        latencies, short, incomplete = [], 0, 0
        for query in queries[:200]:
            start = float(rng.integers(0, FLAGS.size // 2))
            begin = time.perf_counter()
            results, flags_ = store.search(query[None], k=10, report=True, **options(start))
            latencies.append(time.perf_counter() - begin)
            short += len(results[0]) < 10
            incomplete += flags_[0]
        p50, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 99])
        record(backend=backend, nprobe=FLAGS.nprobe, filter=name, p50_ms=float(p50),
               p99_ms=float(p99), short=int(short), incomplete=int(incomplete))
        print(f"[{backend}] filtered search ({name}): p50 {p50:.2f} ms, p99 {p99:.2f} ms per query; "
              f"{short} of 200 with fewer than 10 matches, {incomplete} flagged incomplete; "
              f"peak RSS {testing.peak_rss_gib():.2f} GiB", flush=True)


def main(argv):
    del argv
    print(testing.cpu_line(), flush=True)  # every figure below depends on it
    if FLAGS.search_only:
        search_phase(FLAGS.workdir)
        return
    folder = FLAGS.workdir or tempfile.mkdtemp(prefix="gallery_scale_")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(FLAGS.identities, FLAGS.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    chunk_size = 50_000
    offsets = range(0, FLAGS.size, chunk_size)

    def gallery_chunks():
        for offset in offsets:
            yield offset, embeddings(np.random.default_rng([1, offset]), centres,
                                     min(chunk_size, FLAGS.size - offset))

    print(f"machine: {os.cpu_count()} CPU cores; {FLAGS.size} x {FLAGS.dim} embeddings, "
          f"{FLAGS.identities} clusters; faiss index {FLAGS.index}, Milvus index "
          f"{FLAGS.milvus_index} (nlist {FLAGS.nlist}); nprobe {FLAGS.nprobe}")
    queries = embeddings(np.random.default_rng(2), centres, FLAGS.queries)
    np.savez(os.path.join(folder, "queries.npz"), queries=queries,
             truth=exact_top(gallery_chunks(), queries))
    backends = ["sqlite", "milvus"] if FLAGS.backend == ["both"] else FLAGS.backend
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise app.UsageError(f"--backend: {', '.join(sorted(unknown))}; expected some of "
                             f"{', '.join(BACKENDS)}")
    for backend in backends:
        with server(backend, folder):
            build(backend, folder, gallery_chunks)
    if not FLAGS.workdir:
        shutil.rmtree(folder)  # the database alone is size x dim x 4 bytes


@contextlib.contextmanager
def server(backend, folder):
    """A Milvus server for the `milvus_server` backend (its data in `folder`), for as long as
    the backend is built and searched."""
    if backend != "milvus_server":
        yield
        return
    with testing.milvus_server(os.path.join(folder, "milvus_server")) as uri:
        FLAGS.milvus_uri = uri
        print(f"[milvus_server] started at {uri} (milvus {version('milvus')}, pymilvus "
              f"{version('pymilvus')})", flush=True)
        yield


def version(package):
    from importlib import metadata

    return metadata.version(package)


def seal(store):
    """Flushes a Milvus collection and waits until its index covers every entry, as on a server
    that has run a while (a growing segment is searched without the index)."""
    store.client.flush(store.collection)
    while True:
        state = store.client.describe_index(store.collection, "embedding")
        print(f"  index: {state.get('indexed_rows')} of {state.get('total_rows')} rows indexed "
              f"({state.get('state')})", flush=True)
        # Milvus 2.3.5 still reports pending rows once every row is indexed (880,000 of a
        # million, for good): the indexed count is what says it is done.
        if state.get("indexed_rows", 0) >= state.get("total_rows", 1):
            return
        time.sleep(10)


def build(backend, folder, gallery_chunks):
    """Adds every entry to a new gallery of `backend`, then searches it from a fresh process."""
    import subprocess
    import sys

    store = open_gallery(backend, folder, FLAGS.dim, log=lambda line: print(line, flush=True))
    start = time.perf_counter()
    for offset, chunk in gallery_chunks():
        for start_row in range(0, len(chunk), 10_000):
            store.add([{"id": str(row), "embedding": e, "timestamp": float(row),
                        "camera_id": row % 8}  # timestamps 0..size-1, 8 cameras, for filters
                       for row, e in enumerate(chunk[start_row:start_row + 10_000],
                                               offset + start_row)])
        print(f"[{backend}] added {offset + len(chunk)} in {time.perf_counter() - start:.0f} s "
              f"(RSS peak {testing.peak_rss_gib():.2f} GiB)", flush=True)
    if backend != "sqlite":
        seal(store)
    store.close()  # the SQLite store writes its index file
    build_seconds = time.perf_counter() - start
    files = [os.path.join(folder, name) for name in os.listdir(folder)
             if name.startswith({"milvus": "gallery_milvus", "sqlite": "gallery.sqlite"}.get(
                 backend, "milvus_server"))]
    size = sum(os.path.getsize(f) if os.path.isfile(f) else sum(
        os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(f) for n in names)
        for f in files)
    print(f"[{backend}] ingest {FLAGS.size / build_seconds:.0f} entries/s; build (index "
          f"training included, written): {build_seconds:.0f} s; on disk {size / 2**30:.2f} GiB",
          flush=True)
    subprocess.run([sys.executable, __file__, f"--workdir={folder}", "--search_only",
                    f"--backend={backend}", f"--size={FLAGS.size}", f"--index={FLAGS.index}",
                    f"--milvus_index={FLAGS.milvus_index}", f"--nlist={FLAGS.nlist}",
                    f"--nprobe={FLAGS.nprobe}", f"--dim={FLAGS.dim}",
                    f"--nprobes={','.join(FLAGS.nprobes)}", f"--milvus_uri={FLAGS.milvus_uri or ''}",
                    f"--json={FLAGS.json or ''}"], check=True)


if __name__ == "__main__":
    app.run(main)
