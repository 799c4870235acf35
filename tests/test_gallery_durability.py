"""The live gallery never hides what it acknowledged: failed index updates, restored database
backups, interrupted imports, every --index kind's removals, a bounded change log, and a
randomised check against a plain dictionary."""

import os
import shutil
import sqlite3
import threading

import numpy as np
import pytest

from reid_tf.deploy.gallery import faiss_index
from reid_tf.deploy.gallery import seed as seed_lib
from reid_tf.deploy.gallery import store as gallery_store

DIM = 8
# Every --index kind the README offers, each with the smallest size that trains it here.
KINDS = ["Flat", "HNSW16", "IVF2,Flat", "IVF2,SQ8", "IVF2,PQ2x4", "IVF2,PQ4x4fs,Refine(SQ8)"]


def quiet(line):
    pass


def vectors(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def entries(ids, data, **extra):
    return [{"id": i, "embedding": v, **extra} for i, v in zip(ids, data)]


def open_store(path, index="Flat", **kwargs):
    # ef_search past the gallery's size: HNSW's search is then exhaustive on these small sets,
    # so that a missing entry is the store's doing, not the approximation's.
    return gallery_store.GalleryStore(str(path), DIM, index=index, nprobe=2, ef_search=1024,
                                      log=quiet, **kwargs)


def found_ids(store, data):
    """For each vector, the ids of every entry a search returns (k = the whole gallery)."""
    k = max(store.count(), 1)
    return [{m["id"] for m in matches} for matches in store.search(data, k=k)]


def nearest(store, vector):
    matches = store.search(vector[None], k=1)[0]
    return (matches[0]["id"], matches[0]["distance"]) if matches else (None, None)


@pytest.mark.parametrize("index", KINDS)
def test_every_index_kind_adds_replaces_and_removes_without_shifting_ids(tmp_path, index):
    store = open_store(tmp_path / "g.sqlite", index)
    data = vectors(200, seed=1)
    store.add(entries([f"n{i}" for i in range(200)], data))  # enough to train IVF2 (78)
    assert store.remove([f"n{i}" for i in range(10)]) == 10
    assert store.count() == 190
    exact = "PQ" not in index  # PQ2x4 codes 8 numbers in 8 bits: its nearest is approximate
    for i in (20, 30, 199):
        entry_id, distance = nearest(store, data[i])
        if exact:
            assert entry_id == f"n{i}", (index, i, entry_id)
            assert abs(distance) < 1e-2
    # Replace by id: the new embedding is found under the same id, the old one is gone.
    store.add(entries(["n20"], data[150:151] * -1))
    assert nearest(store, -data[150])[0] == "n20"
    if exact:
        assert nearest(store, data[20])[0] != "n20"
    assert found_ids(store, data[:1])[0] == {f"n{i}" for i in range(10, 200)}


def test_a_failed_index_update_is_acknowledged_rebuilt_and_never_hidden(tmp_path):
    path = tmp_path / "g.sqlite"
    lines = []
    store = gallery_store.GalleryStore(str(path), DIM, persist_every=4, log=lines.append)
    data = vectors(12, seed=2)
    store.add(entries(["a0", "a1", "a2"], data[:3]))
    calls = []
    original = store._index_add

    def failing(vectors_, rows):  # the faiss update fails once, partway through the batch
        calls.append(len(rows))
        original(vectors_[:1], rows[:1])
        raise RuntimeError("injected index failure")

    store._index_add = failing
    assert store.add(entries(["b0", "b1", "b2"], data[3:6])) == 3  # committed: said so
    store._index_add = original
    assert calls and any("injected index failure" in line and "rebuil" in line
                         for line in lines), lines
    assert found_ids(store, data[:1])[0] == {"a0", "a1", "a2", "b0", "b1", "b2"}
    store.add(entries(["c0"], data[6:7]))  # past persist_every: the file is written
    store._db.close()  # crash
    reopened = open_store(path)
    assert found_ids(reopened, data[:1])[0] == {"a0", "a1", "a2", "b0", "b1", "b2", "c0"}


def test_an_index_file_newer_than_a_restored_database_is_ignored_and_rebuilt(tmp_path):
    path = tmp_path / "g.sqlite"
    store = open_store(path, persist_every=10)
    data = vectors(200, seed=3)
    store.add(entries([f"e{i}" for i in range(100)], data[:100]))
    store.persist()
    backup = sqlite3.connect(str(tmp_path / "backup.sqlite"))
    store._db.backup(backup)  # a backup taken now ...
    backup.close()
    for i in range(100, 150):  # ... then 50 adds and 20 removes
        store.add(entries([f"e{i}"], data[i:i + 1]))
    store.remove([f"e{i}" for i in range(20)])
    store.close()
    for suffix in ("-wal", "-shm"):  # restore the backup, keep the newer index files
        (tmp_path / ("g.sqlite" + suffix)).unlink(missing_ok=True)
    shutil.copy(tmp_path / "backup.sqlite", path)
    lines = []
    restored = gallery_store.GalleryStore(str(path), DIM, log=lines.append)
    assert restored.count() == 100
    assert found_ids(restored, data[:1])[0] == {f"e{i}" for i in range(100)}
    assert any("newer than" in line for line in lines), lines


@pytest.mark.slow  # trains, or runs a tool in a process
def test_the_change_log_stays_bounded_over_ten_thousand_adds_and_removes(tmp_path):
    path = tmp_path / "g.sqlite"
    store = open_store(path, persist_every=500)
    data = vectors(5, seed=4)
    for i in range(10_000):
        if i % 3 == 2:
            store.remove([f"p{i % 5}"])
        else:
            store.add(entries([f"p{i % 5}"], data[i % 5:i % 5 + 1]))
    rows = sqlite3.connect(str(path)).execute("SELECT COUNT(*) FROM changes").fetchone()[0]
    assert rows <= 1_000, rows
    live = store.count()
    store._db.close()  # crash after all that: the trimmed log still restarts right
    reopened = open_store(path)
    assert reopened.count() == live == len(found_ids(reopened, data[:1])[0])


def test_hnsw_removals_do_not_rebuild_the_index_each_time(tmp_path):
    lines = []
    store = gallery_store.GalleryStore(str(tmp_path / "g.sqlite"), DIM, index="HNSW16",
                                       ef_search=1024, log=lines.append)
    data = vectors(400, seed=5)
    store.add(entries([f"h{i}" for i in range(400)], data))
    rebuilds = []
    original = store._rebuild
    store._rebuild = lambda *a, **k: (rebuilds.append(1), original(*a, **k))[1]
    for i in range(20):  # 5 % of the gallery, one at a time
        assert store.remove([f"h{i}"]) == 1
        assert nearest(store, data[i])[0] != f"h{i}"
    assert len(rebuilds) <= 1, len(rebuilds)
    assert found_ids(store, data[:1])[0] == {f"h{i}" for i in range(20, 400)}
    store.close()
    reopened = open_store(tmp_path / "g.sqlite", "HNSW16")
    assert found_ids(reopened, data[:1])[0] == {f"h{i}" for i in range(20, 400)}


def test_size_and_staleness_never_wait_for_the_store_lock():
    store = open_store(":memory:")
    store.add(entries(["x0", "x1"], vectors(2)))
    with store._lock:  # as a retrain or rebuild holds it
        answered = []
        thread = threading.Thread(target=lambda: answered.append((len(store), store.staleness())))
        thread.start()
        thread.join(timeout=2)
    assert answered == [(2, store.applied_seq - store.persisted_seq)]


class FakeExport:
    embedding_width = DIM


@pytest.mark.slow  # trains, or runs a tool in a process
def test_an_interrupted_seed_import_resumes_and_says_so(tmp_path, monkeypatch):
    from reid_tf.evaluate import features_npz

    data = vectors(25_000, seed=6)
    names = np.array([f"img{i:05d}.jpg" for i in range(25_000)])
    npz = str(tmp_path / "big.npz")
    features_npz.save_features(npz, data, names, np.arange(25_000) % 50, np.ones(25_000, int))
    db = str(tmp_path / "g.sqlite")
    original = gallery_store.GalleryStore._commit
    calls = []

    def dying_commit(self, write):  # killed after the first chunk of 10,000 committed
        if len(calls) == 1:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return original(self, write)

    monkeypatch.setattr(gallery_store.GalleryStore, "_commit", dying_commit)
    seeded = seed_lib.GalleryOptions(gallery_db=db, gallery=npz)
    with pytest.raises(KeyboardInterrupt):
        seed_lib.open_gallery(FakeExport(), seeded, log=quiet)
    monkeypatch.setattr(gallery_store.GalleryStore, "_commit", original)
    lines = []
    store = seed_lib.open_gallery(FakeExport(), seeded, log=lines.append)
    assert store.count() == 25_000
    assert any("resum" in line and "10000 of 25000" in line for line in lines), lines
    store.close()
    lines.clear()
    again = seed_lib.open_gallery(FakeExport(), seeded, log=lines.append)
    assert again.count() == 25_000 and any("not imported again" in line for line in lines)


def killed_seed_import_then_restart(tmp_path, path, index, ids, data, monkeypatch):
    """reid-serve --gallery=seed.npz killed after two of its transactions, then started again
    with the same flags: the store it opens (the import resumed)."""
    from reid_tf.evaluate import features_npz

    npz = str(tmp_path / "seed.npz")
    features_npz.save_features(npz, data, np.array(ids))
    monkeypatch.setattr(seed_lib, "IMPORT_CHUNK", 10)
    original = gallery_store.GalleryStore.add
    calls = []

    def dying_add(self, entries, meta=None):
        calls.append(self)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return original(self, entries, meta)

    options = seed_lib.GalleryOptions(gallery_db=str(path), gallery=npz, index=index, nprobe=2,
                                      ef_search=1024)
    monkeypatch.setattr(gallery_store.GalleryStore, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        seed_lib.open_gallery(FakeExport(), options, log=quiet)
    calls[-1]._db.close()  # the killed process's connection goes with it
    monkeypatch.setattr(gallery_store.GalleryStore, "add", original)
    lines = []
    store = seed_lib.open_gallery(FakeExport(), options, log=lines.append)
    assert any(f"resuming the interrupted import of {npz}: 20 of {len(ids)}" in line
               for line in lines), lines
    assert store.import_progress()["done"] == len(ids)
    return store


@pytest.mark.slow  # trains, or runs a tool in a process
@pytest.mark.parametrize("index", ["Flat", "HNSW16", "IVF2,Flat", "IVF2,PQ4x4fs,Refine(SQ8)"])
def test_randomised_operations_with_failures_and_crashes_match_a_dictionary(tmp_path, index,
                                                                              monkeypatch):
    """A killed --gallery import resumed, then a few hundred adds, replaces, removes, persists,
    injected index failures, crashes, restarts and database restores: search returns exactly
    the committed entries."""
    rng = np.random.default_rng(7)
    path = tmp_path / "g.sqlite"
    pool = [f"r{i}" for i in range(120)]
    seeded = rng.normal(size=(35, DIM)).astype(np.float32)
    store = killed_seed_import_then_restart(tmp_path, path, index, pool[:35], seeded,
                                            monkeypatch)
    model, snapshot = dict(zip(pool[:35], seeded)), None
    assert store.count() == 35 and found_ids(store, vectors(1, 99))[0] == set(model)
    store._db.close()
    store = open_store(path, index, persist_every=int(rng.integers(5, 30)))
    for step in range(300):
        action = rng.choice(["add", "add", "add", "remove", "persist", "fail", "crash",
                             "backup", "restore"], p=[.25, .2, .15, .2, .05, .06, .04, .03, .02])
        if action in ("add", "fail"):
            ids = list(rng.choice(pool, int(rng.integers(1, 6)), replace=False))
            vecs = rng.normal(size=(len(ids), DIM)).astype(np.float32)
            if action == "fail":
                original = store._index_add

                def failing(v, rows, original=original):
                    raise RuntimeError("injected")
                store._index_add = failing
            try:
                store.add(entries(ids, vecs))
            finally:
                if action == "fail":
                    store._index_add = original
            model.update(zip(ids, vecs))
        elif action == "remove":
            ids = list(rng.choice(pool, int(rng.integers(1, 4)), replace=False))
            assert store.remove(ids) == sum(i in model for i in ids)
            for i in ids:
                model.pop(i, None)
        elif action == "persist":
            store.persist()
        elif action == "crash":
            store._db.close()
            store = open_store(path, index, persist_every=int(rng.integers(5, 30)))
        elif action == "backup":
            target = sqlite3.connect(str(tmp_path / "backup.sqlite"))
            store._db.backup(target)
            target.close()
            snapshot = dict(model)
        elif action == "restore" and snapshot is not None:
            store._db.close()
            for suffix in ("-wal", "-shm"):
                (tmp_path / ("g.sqlite" + suffix)).unlink(missing_ok=True)
            shutil.copy(tmp_path / "backup.sqlite", path)
            store = open_store(path, index)
            model = dict(snapshot)
        if step % 10 == 0 or action in ("crash", "restore", "fail"):
            assert store.count() == len(model), (step, action)
            if model:
                assert found_ids(store, vectors(1, step))[0] == set(model), (step, action)
                probe = list(model)[int(rng.integers(len(model)))]
                assert nearest(store, model[probe])[0] == probe, (step, action, probe)


def test_a_gallery_that_cannot_rebuild_refuses_searches_and_writes_no_index_file(tmp_path):
    path = tmp_path / "g.sqlite"
    store = open_store(path, persist_every=1)
    data = vectors(4, seed=8)
    store.add(entries(["a", "b"], data[:2]))
    store._index_add = lambda v, rows: (_ for _ in ()).throw(RuntimeError("index broken"))
    store._new_index = lambda: (_ for _ in ()).throw(MemoryError("no memory to rebuild"))
    files = faiss_index.files(str(path))
    assert store.add(entries(["c"], data[2:3])) == 1  # committed, and said so
    assert store.stale and faiss_index.files(str(path)) == files  # nothing persisted while stale
    with pytest.raises(gallery_store.GalleryUnavailable, match="being rebuilt"):
        store.search(data[:1], k=3)
    del store._index_add, store._new_index  # the fault goes away: the next search rebuilds
    assert found_ids(store, data[:1])[0] == {"a", "b", "c"} and not store.stale


def brute_force(model, query, k, keep):
    """The exact top-k ids among the model's entries passing `keep`."""
    ids = [i for i, e in model.items() if keep(e)]
    embeddings = np.stack([model[i]["embedding"] for i in ids])
    embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = embeddings @ (query / np.linalg.norm(query))
    return [ids[j] for j in np.argsort(-similarity, kind="stable")[:k]]


@pytest.mark.parametrize("index", ["Flat", "HNSW16", "IVF8,Flat", "IVF8,PQ4x4fs,Refine(SQ8)"])
def test_a_selective_filter_is_searched_exactly_without_searching_the_index(tmp_path, index):
    store = gallery_store.GalleryStore(str(tmp_path / "g.sqlite"), DIM, index=index, nprobe=1,
                                       log=quiet)
    data = vectors(2000, seed=9)
    model = {f"t{i}": {"embedding": data[i], "camera_id": i % 4, "timestamp": float(i)}
             for i in range(2000)}
    store.add([{"id": i, **e} for i, e in model.items()])
    searched = []
    original = store._index_search
    store._index_search = lambda q, k: (searched.append(k), original(q, k))[1]
    query = vectors(1, seed=10)[0]
    matches = store.search(query, k=5, exclude_camera=1, time_range=(100, 140))[0]
    assert [m["id"] for m in matches] == brute_force(
        model, query, 5, lambda e: e["camera_id"] != 1 and 100 <= e["timestamp"] <= 140)
    assert store.search(query, k=5, time_range=(1e9, None))[0] == []  # matches nothing
    assert searched == []  # neither touched the index: no k = N search


def test_an_unselective_filter_fetches_a_bounded_number_of_candidates(tmp_path, monkeypatch):
    monkeypatch.setattr(gallery_store, "EXACT_FILTER_LIMIT", 10)
    store = open_store(tmp_path / "g.sqlite")
    data = vectors(3000, seed=11)
    # Camera 0 holds the 1,500 entries nearest the query: excluding it, the answer lies far
    # down the ranking, where a bounded fetch may not reach.
    query = data[0] * 10
    order = np.argsort(-(data @ query) / np.linalg.norm(data, axis=1))
    camera = np.empty(3000, int)
    camera[order[:1500]], camera[order[1500:]] = 0, 1
    model = {f"u{i}": {"embedding": data[i], "camera_id": int(camera[i])} for i in range(3000)}
    store.add([{"id": i, **e} for i, e in model.items()])
    fetched = []
    original = store._index_search
    store._index_search = lambda q, k: (fetched.append(k), original(q, k))[1]
    results, incomplete = store.search(query, k=3, exclude_camera=0, report=True)
    limit = max(1024, -(-16 * 3 * 3000 // 1500))
    assert max(fetched) <= limit  # bounded, not a k = N search
    assert incomplete == [True] and results[0] == []  # and it says the result is incomplete
    results, incomplete = store.search(query, k=3, exclude_camera=1, report=True)
    assert incomplete == [False]
    assert [m["id"] for m in results[0]] == brute_force(model, query, 3,
                                                        lambda e: e["camera_id"] != 1)


def test_a_gallery_built_with_one_model_refuses_another_of_the_same_width(tmp_path):
    path = str(tmp_path / "g.sqlite")
    store = gallery_store.GalleryStore(path, DIM, log=quiet, model="aaaa")
    store.add(entries(["x"], vectors(1)))
    store.close()
    assert gallery_store.GalleryStore(path, DIM, log=quiet, model="aaaa").count() == 1
    with pytest.raises(ValueError, match=r"holds embeddings of model aaaa, not of this "
                                         r"export's bbbb"):
        gallery_store.GalleryStore(path, DIM, log=quiet, model="bbbb")
    # A database from before models were recorded learns the one it is served with.
    old = str(tmp_path / "old.sqlite")
    gallery_store.GalleryStore(old, DIM, log=quiet).add(entries(["y"], vectors(1)))
    lines = []
    gallery_store.GalleryStore(old, DIM, log=lines.append, model="cccc")
    assert any("records no model" in line and "cccc" in line for line in lines)
    with pytest.raises(ValueError, match="model cccc"):
        gallery_store.GalleryStore(old, DIM, log=quiet, model="dddd")


def test_a_full_disk_refuses_the_change_whole_and_closing_leaves_no_half_file(tmp_path):
    """SQLite's max_page_count makes the database file full, as a full disk does: the add is
    refused whole (GalleryFull, which reid-serve answers with 507), earlier entries stay, and
    an index file that cannot be written at close leaves no `.tmp` and no traceback."""
    from reid_tf.deploy.gallery import contract
    from reid_tf.deploy.gallery import faiss_index

    lines = []
    store = gallery_store.GalleryStore(str(tmp_path / "g.sqlite"), 8, log=lines.append)
    data = np.random.default_rng(0).normal(size=(400, 8)).astype(np.float32)
    store.add([{"id": "first", "embedding": data[0]}])
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages + 1}")
    with pytest.raises(contract.GalleryFull, match="disk is full"):
        store.add([{"id": f"e{i}", "embedding": data[i], "metadata": {"pad": "x" * 2000}}
                   for i in range(1, 400)])
    assert store.count() == 1 and store.get("e1") is None and store.get("first") is not None

    def full_disk(index, path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise RuntimeError("Error: 'ret == (size_t)1' failed: write error")

    original = faiss_index.faiss_module().write_index
    faiss_index.faiss_module().write_index = full_disk
    try:
        store.close()  # persists at close: fails, says so, closes anyway
    finally:
        faiss_index.faiss_module().write_index = original
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert any("index file was not written" in line for line in lines)
    reopened = gallery_store.GalleryStore(str(tmp_path / "g.sqlite"), 8, log=lines.append)
    assert reopened.count() == 1 and reopened.search(data[0], k=1)[0][0]["id"] == "first"
    reopened.close()


def test_an_index_file_of_another_spec_is_never_loaded(tmp_path):
    """Reopened with another --index, the store rebuilds; if it stops before writing the new
    index's file, the next start must not load the older spec's file as the new one's."""
    path = tmp_path / "g.sqlite"
    data = vectors(200, seed=11)
    store = open_store(path, "IVF2,Flat")
    store.add(entries([f"n{i}" for i in range(200)], data))
    store.close()  # writes the IVF file
    open_store(path, "HNSW16", persist_every=0)  # rebuilt in memory; killed before any write
    again = open_store(path, "HNSW16")
    assert hasattr(gallery_store.faiss_index.inner_of(again.index), "hnsw")
    assert nearest(again, data[5])[0] == "n5" and again.count() == 200
    again.close()
    # What earlier versions left behind: the new spec recorded beside the older spec's file.
    open_store(path, "IVF2,Flat").close()
    db = sqlite3.connect(str(path))
    db.execute("UPDATE meta SET value = 'HNSW16' WHERE key = 'index'")
    db.commit()
    db.close()
    reopened = open_store(path, "HNSW16")
    assert hasattr(gallery_store.faiss_index.inner_of(reopened.index), "hnsw")
    assert nearest(reopened, data[7])[0] == "n7"
