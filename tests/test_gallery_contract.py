"""One suite, every gallery backend (`deploy.gallery.contract`): SQLite + faiss, Milvus Lite on
a local file, and a standalone Milvus server (the `milvus` package's 2.3.5, started once for the
module; skipped with the reason when it cannot start). Adds, replace by id, removes, filters against exact search,
thumbnails, browse, stats, concurrent clients, a resumed seed import."""

import threading
import uuid

import numpy as np
import pytest

from reid_tf import testing
from reid_tf.deploy.gallery import contract
from reid_tf.deploy.gallery import store as gallery_store

DIM = 16


def quiet(line):
    del line


def open_backend(kind, place, dimension=DIM, model=None, ivf=False):
    """A gallery of `kind` at `place` (a folder, or a server's URI and a collection); `ivf`: an
    approximate index probing 1 of 16 lists."""
    if kind == "sqlite":
        return gallery_store.GalleryStore(str(place / "g.sqlite"), dimension, log=quiet,
                                          model=model, **({"index": "IVF16,Flat", "nprobe": 1}
                                                          if ivf else {}))
    pytest.importorskip("pymilvus", reason="pymilvus is not installed (make test installs it)")
    from reid_tf.deploy.gallery import milvus

    options = {"index": "IVF_FLAT", "nlist": 16, "nprobe": 1} if ivf else {}
    if kind == "milvus":
        return milvus.MilvusGallery(str(place / "g_milvus.db"), dimension, log=quiet,
                                    model=model, **options)
    uri, collection = place
    return milvus.MilvusGallery(uri, dimension, collection=collection, log=quiet, model=model,
                                **options)


@pytest.fixture(scope="module")
def server_uri(tmp_path_factory):
    """A Milvus server for the module, or the test skipped with why it could not start."""
    try:
        with testing.milvus_server(tmp_path_factory.mktemp("milvus_server")) as uri:
            yield uri
    except (ImportError, RuntimeError) as problem:
        pytest.skip(f"no Milvus server: {problem}")


@pytest.fixture(params=["sqlite", "milvus", pytest.param("milvus_server", marks=pytest.mark.slow)])
def backend(request, tmp_path):
    opened = []
    place = tmp_path
    if request.param == "milvus_server":  # a collection of its own on the module's server
        place = (request.getfixturevalue("server_uri"), f"t{uuid.uuid4().hex}")

    def make(**options):
        gallery = open_backend(request.param, place, **options)
        opened.append(gallery)
        return gallery

    yield request.param, make
    for gallery in opened:
        try:
            gallery.close()
        except Exception:  # noqa: BLE001 - closed by the test already
            pass


def vectors(n, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def entries(data, start=0):
    return [{"id": f"e{start + i}", "embedding": e, "camera_id": (start + i) % 3,
             "person_id": (start + i) // 2, "timestamp": float(start + i),
             "metadata": {"n": start + i}} for i, e in enumerate(data)]


def exact(data, ids, query, k, keep=None):
    """The k nearest ids by brute force among `keep` (a boolean mask)."""
    distances = 1 - data @ query
    order = [i for i in np.argsort(distances, kind="stable") if keep is None or keep[i]]
    return [ids[i] for i in order[:k]], [float(distances[i]) for i in order[:k]]


def test_search_with_and_without_filters_equals_exact_search(backend):
    kind, make = backend
    gallery = make()
    data = vectors(60)
    ids = [f"e{i}" for i in range(60)]
    assert gallery.add(entries(data)) == 60
    assert len(gallery) == gallery.count() == 60
    cameras = np.arange(60) % 3
    times = np.arange(60, dtype=float)
    queries = vectors(5, seed=1)
    for options, keep in [({}, None), ({"exclude_camera": 1}, cameras != 1),
                          ({"time_range": [10, 30.5]}, (times >= 10) & (times <= 30.5)),
                          ({"time_range": [None, 20]}, times <= 20),
                          ({"exclude_camera": 0, "time_range": [40, None]},
                           (cameras != 0) & (times >= 40))]:
        results, incomplete = gallery.search(queries, k=7, report=True, **options)
        assert not any(incomplete)
        for query, matches in zip(queries, results):
            want_ids, want_distances = exact(data, ids, query, 7, keep)
            assert [m["id"] for m in matches] == want_ids, (kind, options)
            np.testing.assert_allclose([m["distance"] for m in matches], want_distances,
                                       atol=1e-5)
    top = gallery.search(data[8], k=1)[0][0]
    assert {key: top[key] for key in contract.FIELDS} == {
        "id": "e8", "person_id": 4, "camera_id": 2, "timestamp": 8.0, "metadata": {"n": 8},
        "thumbnail": False}


def test_replace_remove_get_thumbnails_browse_and_stats(backend):
    kind, make = backend
    gallery = make()
    data = vectors(6)
    gallery.add(entries(data[:4]))
    jpeg = b"\xff\xd8 not really a jpeg \xff\xd9"
    gallery.add([{"id": "e1", "embedding": data[5], "thumbnail": jpeg}])  # replaces e1
    assert gallery.count() == 4
    replaced = gallery.get("e1")
    assert replaced["camera_id"] is None and replaced["thumbnail"] is True
    np.testing.assert_allclose(replaced["embedding"], data[5], atol=1e-6)
    assert gallery.thumbnail("e1") == jpeg and gallery.thumbnail("e0") is None
    assert gallery.search(data[5], k=1)[0][0]["id"] == "e1"
    assert gallery.remove(["e2", "missing", "e2"]) == 1
    assert gallery.get("e2") is None and gallery.count() == 3
    assert gallery.remove([]) == 0
    page, total = gallery.browse(0, 2)
    assert total == 3 and [e["id"] for e in page] == ["e1", "e3"]  # newest first
    page, _ = gallery.browse(2, 10)
    assert [e["id"] for e in page] == ["e0"]
    stats = gallery.stats()
    assert stats["size"] == 3 and stats["thumbnails"] == 1
    # e1 lost its camera when replaced; e0 and e3 are camera 0. Unknown cameras first.
    assert stats["cameras"] == [{"camera_id": None, "entries": 1},
                                {"camera_id": 0, "entries": 2}]
    assert stats["time_span"] == [0.0, 3.0]


@pytest.mark.parametrize("bad, field", [
    ({"id": "", "embedding": [1.0] * DIM}, "entries[1].id"),
    ({"id": "x" * 600, "embedding": [1.0] * DIM}, "entries[1].id"),
    ({"id": "x", "embedding": [0.0] * DIM}, "entries[1].embedding"),
    ({"id": "x", "embedding": [1.0] * (DIM - 1)}, "entries[1].embedding"),
    ({"id": "x", "embedding": [1.0] * DIM, "camera_id": 2 ** 70}, "entries[1].camera_id"),
    ({"id": "x", "embedding": [1.0] * DIM, "metadata": [1]}, "entries[1].metadata"),
    ({"id": "x", "embedding": [1.0] * DIM, "thumbnail": "text"}, "entries[1].thumbnail"),
])
def test_a_bad_entry_names_its_field_and_nothing_is_written(backend, bad, field):
    _, make = backend
    gallery = make()
    with pytest.raises(contract.GalleryError) as error:
        gallery.add([{"id": "ok", "embedding": [1.0] * DIM}, bad])
    assert error.value.field == field
    assert gallery.count() == 0


def test_concurrent_clients_lose_nothing(backend):
    _, make = backend
    gallery = make()
    data = vectors(200, seed=2)
    failures = []

    def client(worker):
        try:
            for i in range(worker, 200, 4):
                gallery.add(entries(data[i:i + 1], start=i))
                assert gallery.search(data[i], k=1)[0][0]["id"] == f"e{i}"
        except Exception as problem:  # noqa: BLE001 - reported below
            failures.append(problem)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures and gallery.count() == 200


def test_a_resumed_seed_import_and_the_model_check(backend, tmp_path):
    kind, make = backend
    gallery = make(model="model-a")
    data = vectors(25, seed=3)
    arrays = {"file_names": np.array([f"f{i}.jpg" for i in range(25)]), "embeddings": data,
              "person_ids": np.arange(25), "camera_ids": np.arange(25) % 2}
    assert gallery.import_features(arrays, source="seed.npz", chunk=10) == 25
    assert gallery.import_progress() == {"source": "seed.npz", "total": 25, "done": 25}
    assert gallery.import_features(arrays, source="seed.npz", start=20, chunk=10) == 5
    assert gallery.count() == 25 and gallery.get("f7.jpg")["person_id"] == 7
    gallery.close()
    with pytest.raises(ValueError, match="model-a"):
        make(model="model-b")
    reopened = make(model="model-a")  # what a restart finds
    assert reopened.count() == 25 and reopened.dimension == DIM


def test_a_narrow_filter_on_an_approximate_index_still_finds_every_passing_entry(backend):
    """IVF probes a few lists: a filter passing 20 of 5,000 entries must not end short of k."""
    kind, make = backend
    gallery = make(ivf=True)
    data = vectors(5000, seed=4)
    gallery.add(entries(data))
    queries = data[:2]  # their own lists hold few of the entries the filter passes
    if kind != "sqlite":  # sealed segments are searched through the index: the hard case
        gallery.client.flush(gallery.collection)
    results, incomplete = gallery.search(queries, k=10, time_range=[500, 519], report=True)
    assert not any(incomplete)
    keep = (np.arange(5000) >= 500) & (np.arange(5000) <= 519)
    for query, matches in zip(queries, results):
        assert [m["id"] for m in matches] == exact(data, [f"e{i}" for i in range(5000)], query,
                                                   10, keep)[0]
    gallery.close()


# Ids a client may send: quotes, backslashes, brackets, wildcards, filter syntax, unicode, and
# an id built to widen a pasted `id in ['...']` filter to every entry.
HOSTILE_IDS = ["o'brien", "a\\b", "a\\", 'q"q', "x] y", "[", "%", "_", "*", "'", '"', "\\'",
               "ü/dätä.jpg", "😀", "a\nb", "t\tb", "id in ['e0']", "e0' or id like '%",
               "x'] or id like '%' or id in ['y", 'x"] or id like "%" or id in ["y',
               "e0\") or (id != \"", "e0 || true", "id > ''", "a\x00b", "\x7f"]
INJECTION = "x'] or id like '%' or id in ['y"


def test_hostile_ids_are_plain_ids_on_every_backend(backend):
    _, make = backend
    gallery = make()
    data = vectors(len(HOSTILE_IDS) + 2, seed=5)
    plain = entries(data[:2])  # e0, e1
    gallery.add(plain + [{"id": entry_id, "embedding": data[2 + i], "thumbnail": b"\xff\xd8" +
                          entry_id.encode() + b"\xff\xd9"} for i, entry_id in
                         enumerate(HOSTILE_IDS)])
    count = gallery.count()
    assert count == len(HOSTILE_IDS) + 2
    # Removing ids that are not there (a filter-injection attempt among them) removes nothing.
    missing = [INJECTION + "!", "nope' or '1'='1", "\\", "%%"]
    assert gallery.remove(missing) == 0 and gallery.count() == count
    assert gallery.get(INJECTION + "!") is None and gallery.thumbnail("nope' or '1'='1") is None
    for i, entry_id in enumerate(HOSTILE_IDS):
        found = gallery.get(entry_id)
        assert found is not None and found["id"] == entry_id, entry_id
        np.testing.assert_allclose(found["embedding"], data[2 + i], atol=1e-6)
        assert gallery.thumbnail(entry_id) == b"\xff\xd8" + entry_id.encode() + b"\xff\xd9"
        assert gallery.search(data[2 + i], k=1)[0][0]["id"] == entry_id
    # Each removal removes exactly its own entry.
    for removed, entry_id in enumerate(HOSTILE_IDS, start=1):
        assert gallery.remove([entry_id]) == 1, entry_id
        assert gallery.get(entry_id) is None and gallery.count() == count - removed
    assert gallery.get("e0") is not None and gallery.get("e1") is not None
    page, total = gallery.browse(0, 10)
    assert total == 2 and sorted(e["id"] for e in page) == ["e0", "e1"]


def test_a_collection_of_nullable_fields_written_before_still_reads(tmp_path, monkeypatch):
    """Milvus Lite galleries written before the flagged schema (nullable fields) open as they
    are: absent values, filters, stats and new adds."""
    pytest.importorskip("pymilvus", reason="pymilvus is not installed (make test installs it)")
    from reid_tf.deploy.gallery import milvus

    data = vectors(6, seed=6)
    with monkeypatch.context() as patch:  # the schema reid-tf wrote before
        patch.setattr(milvus, "FlaggedColumns", milvus.NullableColumns)
        old = open_backend("milvus", tmp_path)
        old.add(entries(data[:3]) + [{"id": "bare", "embedding": data[3]}])
        old.close()
    gallery = open_backend("milvus", tmp_path)
    assert isinstance(gallery.columns, milvus.NullableColumns)
    gallery.add([{"id": "new", "embedding": data[4], "camera_id": 1, "thumbnail": b"jpg"}])
    bare = gallery.get("bare")
    assert (bare["camera_id"], bare["timestamp"], bare["metadata"]) == (None, None, None)
    assert gallery.get("e1")["metadata"] == {"n": 1} and gallery.thumbnail("new") == b"jpg"
    kept = gallery.search(data[4], k=10, exclude_camera=1)[0]
    assert sorted(m["id"] for m in kept) == ["bare", "e0", "e2"]  # cameras None, 0, 2
    assert [m["id"] for m in gallery.search(data[0], k=10, time_range=[0, 1])[0]] == ["e0", "e1"]
    stats = gallery.stats()
    assert stats["size"] == 5 and stats["thumbnails"] == 1 and stats["time_span"] == [0.0, 2.0]
    gallery.close()
