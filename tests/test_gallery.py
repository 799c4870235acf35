"""The live gallery (SQLite + derived faiss index) and the dynamic batcher, in process."""

import asyncio
import sqlite3
import threading

import numpy as np
import pytest

from reid_tf.deploy.gallery import store as gallery_store
from reid_tf.deploy.serving import batching


def quiet(line):
    del line


def vectors(n, dim=16, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def entries(embeddings, start=0, **extra):
    return [{"id": f"e{start + i}", "embedding": e, "camera_id": (start + i) % 3,
             "timestamp": float(start + i), **extra} for i, e in enumerate(embeddings)]


def test_add_search_filters_remove_and_replace(tmp_path):
    store = gallery_store.GalleryStore(str(tmp_path / "g.sqlite"), 16, log=quiet)
    data = vectors(30)
    store.add(entries(data, metadata={"site": "north"}))
    assert len(store) == store.count() == 30
    top = store.search(data[4:5], k=3)[0]
    assert top[0]["id"] == "e4" and top[0]["distance"] == pytest.approx(0, abs=1e-5)
    assert top[0]["metadata"] == {"site": "north"} and top[0]["camera_id"] == 1
    exact = 1 - data @ data[4]
    np.testing.assert_allclose([m["distance"] for m in top], np.sort(exact)[:3], atol=1e-5)
    filtered = store.search(data[4:5], k=5, exclude_camera=1)[0]
    assert len(filtered) == 5 and all(m["camera_id"] != 1 for m in filtered)
    window = store.search(data[4:5], k=30, time_range=[10, 19.5])[0]
    assert sorted(m["id"] for m in window) == sorted(f"e{i}" for i in range(10, 20))
    assert store.remove(["e4", "nope"]) == 1
    assert "e4" not in [m["id"] for m in store.search(data[4:5], k=30)[0]]
    store.add([{"id": "e5", "embedding": data[4]}])  # the same id again replaces the entry
    assert store.count() == 29 and store.search(data[4:5], k=1)[0][0]["id"] == "e5"
    assert store.get("e5")["camera_id"] is None


@pytest.mark.parametrize("bad, field", [
    ({"id": "", "embedding": [0.0] * 16}, "entries[1].id"),
    ({"id": "x", "embedding": [0.0] * 15}, "entries[1].embedding"),
    ({"id": "x", "embedding": [float("nan")] * 16}, "entries[1].embedding"),
    ({"id": "x", "embedding": [1.0] * 16, "camera_id": "3"}, "entries[1].camera_id"),
    ({"id": "x", "embedding": [1.0] * 16, "metadata": [1]}, "entries[1].metadata"),
    ({"id": "e0", "embedding": [1.0] * 16}, "entries[1].id"),  # twice in one request
    # What a JSON body can carry that numpy or SQLite cannot hold: 400s, never 500s.
    ({"id": "x", "embedding": [10 ** 400] + [1.0] * 15}, "entries[1].embedding"),
    ({"id": "x", "embedding": [1.0] * 16, "camera_id": 2 ** 70}, "entries[1].camera_id"),
    ({"id": "x", "embedding": [1.0] * 16, "person_id": 2 ** 63}, "entries[1].person_id"),
    ({"id": "x", "embedding": [1.0] * 16, "timestamp": 10 ** 400}, "entries[1].timestamp"),
    ({"id": "x", "embedding": [1.0] * 16, "timestamp": float("nan")}, "entries[1].timestamp"),
    ({"id": "x", "embedding": [1.0] * 16, "timestamp": float("inf")}, "entries[1].timestamp"),
    ({"id": "x", "embedding": [1.0] * 16, "timestamp": "12"}, "entries[1].timestamp"),
    ({"id": "x\ud800", "embedding": [1.0] * 16}, "entries[1].id"),
    ({"id": "x", "embedding": [0.0] * 16}, "entries[1].embedding"),  # no direction
])
def test_a_bad_entry_writes_nothing_and_names_its_field(bad, field):
    store = gallery_store.GalleryStore(":memory:", 16, log=quiet)
    with pytest.raises(gallery_store.GalleryError) as error:
        store.add([{"id": "e0", "embedding": vectors(1)[0]}, bad])
    assert error.value.field == field
    assert store.count() == 0 and len(store) == 0


def test_restart_loads_the_index_file_and_replays_what_it_lacks(tmp_path):
    path = str(tmp_path / "g.sqlite")
    lines = []
    store = gallery_store.GalleryStore(path, 16, persist_every=10, log=lines.append)
    data = vectors(25)
    for i in range(25):  # 25 changes: the file holds the first 20
        store.add(entries(data[i:i + 1], start=i))
    assert store.persisted_seq == 20 and store.staleness() == 5
    store._db.close()  # a crash: no close(), the last 5 changes only in SQLite
    lines.clear()
    reopened = gallery_store.GalleryStore(path, log=lines.append)
    assert any("index-20.faiss" in line and "replayed 5" in line for line in lines), lines
    assert len(reopened) == reopened.count() == 25
    assert reopened.search(data[24:25], k=1)[0][0]["id"] == "e24"
    reopened.close()
    assert reopened.persisted_seq == 25


def test_ivf_index_is_trained_once_the_gallery_can_train_it_and_retrained_as_it_grows():
    lines = []
    store = gallery_store.GalleryStore(":memory:", 16, index="IVF4,Flat", nprobe=4,
                                       log=lines.append)
    store.add(entries(vectors(100)))  # fewer than 39 x 4: exact search meanwhile
    assert any("fewer than the 156" in line for line in lines)
    store.add(entries(vectors(100, seed=1), start=100))
    assert any("trained IVF4,Flat on 200" in line for line in lines)
    store.add(entries(vectors(250, seed=2), start=200))
    assert any("retraining" in line for line in lines) and len(store) == 450
    data = vectors(100, seed=1)
    assert store.search(data[:1], k=1)[0][0]["id"] == "e100"


def test_an_index_trained_on_a_capped_sample_retrains_when_the_gallery_doubles_not_each_add():
    lines = []
    store = gallery_store.GalleryStore(":memory:", 16, index="IVF4,Flat", nprobe=4,
                                       log=lines.append, training_sample=160)
    store.add(entries(vectors(200)))
    assert [line for line in lines if "trained" in line] == [
        next(line for line in lines if "trained IVF4,Flat on 160 of 200 entries" in line)]
    for start in range(200, 1000, 50):  # 200 -> 1000 entries: retrained past 400 and 800 only
        store.add(entries(vectors(50, seed=start), start=start))
    retrained = [line for line in lines if "retraining" in line]
    assert len(retrained) == 2, retrained
    assert "450 entries, over twice the 200" in retrained[0]
    assert "950 entries, over twice the 450" in retrained[1]
    assert store.search(vectors(50, seed=900)[:1], k=1)[0][0]["id"] == "e900"


class CommitRefusing:
    """The store's connection, with the COMMIT of chosen transactions failing (as a full disk or
    an I/O error would): their entries must never be searchable."""

    def __init__(self, connection):
        self.connection, self.refuse_next = connection, False

    def execute(self, sql, *args):
        if sql == "COMMIT" and self.refuse_next:
            self.refuse_next = False
            raise sqlite3.OperationalError("injected: disk I/O error at COMMIT")
        return self.connection.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.connection, name)


def test_searches_during_adds_and_removes_see_only_committed_entries(tmp_path):
    """Readers search while a writer adds (one add in five fails at COMMIT) and removes. No
    search may return an entry whose add did not commit, nor one removed before it began, in
    any query's results. Updating the index before the commit would show the refused ones."""
    store = gallery_store.GalleryStore(str(tmp_path / "g.sqlite"), 16, persist_every=50,
                                       log=quiet)
    connection = CommitRefusing(store._db)
    store._db = connection
    data = vectors(400, seed=3)
    refused, removed, problems, done = set(), set(), [], threading.Event()

    def writer():
        for number, start in enumerate(range(0, 400, 8)):
            batch = entries(data[start:start + 8], start=start)
            if number % 5 == 2:
                with store._lock:  # the flag belongs to this add's transaction
                    connection.refuse_next = True
                try:
                    store.add(batch)
                    problems.append(f"the add of e{start} did not fail")
                except sqlite3.OperationalError:
                    refused.update(e["id"] for e in batch)
            else:
                store.add(batch)
            if start >= 16:
                gone = [f"e{start - 16}", f"e{start - 15}"]
                store.remove(gone)
                removed.update(gone)
        done.set()

    def reader(seed):
        rng = np.random.default_rng(seed)
        while not done.is_set():
            removed_before = set(removed)
            seen = sorted(int(i[1:]) for i in refused | removed_before)  # where to look
            rows = list(rng.integers(0, 400, 4)) + list(rng.choice(seen, min(4, len(seen))))
            for matches in store.search(data[rows], k=20):
                for match in matches:
                    if match["id"] in refused:
                        problems.append(f"{match['id']} returned though its add failed")
                    if match["id"] in removed_before:
                        problems.append(f"{match['id']} returned after its removal")

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(s,))
                                                     for s in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not problems, problems[:5]
    assert len(refused) == 80
    live = {f"e{i}" for i in range(400)} - refused - removed
    assert store.count() == len(store) == len(live)
    found = {m["id"] for m in store.search(data[:1], k=400)[0]}
    assert found == live
    rows = sqlite3.connect(str(tmp_path / "g.sqlite")).execute(
        "SELECT COUNT(*) FROM entries WHERE length(embedding) != 64").fetchone()[0]
    assert rows == 0


def run_async(coroutine):
    return asyncio.run(coroutine)


def test_batcher_merges_concurrent_requests_and_splits_the_outputs():
    calls = []

    def model(kind, items):
        calls.append((kind, len(items)))
        return {"embedding": np.asarray(items, np.float32)[:, :1, 0, 0] * 2}

    async def scenario():
        batcher = batching.Batcher(model, max_batch_size=16, batch_timeout_ms=50)
        batcher.start()
        requests = [np.full((n, 2, 2, 3), i, np.uint8) for i, n in enumerate([1, 3, 2, 1])]
        results = await asyncio.gather(*(batcher.submit("images", r) for r in requests))
        odd = await batcher.submit("images", np.zeros((2, 4, 4, 3), np.uint8))
        await batcher.stop()
        return results, odd

    results, odd = run_async(scenario())
    assert calls == [("images", 7), ("images", 2)]  # one call for the four; another shape alone
    for i, (n, result) in enumerate(zip([1, 3, 2, 1], results)):
        np.testing.assert_array_equal(result["embedding"], np.full((n, 1), 2 * i))
    assert odd["embedding"].shape == (2, 1)


def test_batcher_drops_requests_given_up_on_and_refuses_a_full_queue():
    calls, release = [], threading.Event()

    def model(kind, items):
        calls.append(list(items))
        release.wait(5)
        return {"embedding": np.zeros((len(items), 1), np.float32)}

    async def scenario():
        batcher = batching.Batcher(model, max_batch_size=2, batch_timeout_ms=1,
                                   max_enqueued_batches=2)
        batcher.start()
        busy = asyncio.ensure_future(batcher.submit("encoded", [b"first"]))
        await asyncio.sleep(0.2)  # the model is now busy with "first"
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.submit("encoded", [b"gave up"]), 0.05)
        kept = asyncio.ensure_future(batcher.submit("encoded", [b"kept"]))
        await asyncio.sleep(0.05)
        with pytest.raises(batching.QueueFull):  # capacity 2 x 2 images
            await batcher.submit("encoded", [b"a", b"b", b"c", b"d"])
        release.set()
        await busy
        await kept
        await batcher.stop()

    run_async(scenario())
    assert calls == [[b"first"], [b"kept"]]  # "gave up" never reached the model


def test_batcher_waits_for_company_after_a_long_call_not_only_after_arrival():
    # Under load, requests that queued behind a long call must still wait up to the timeout for
    # the clients answered by that call to come back, or closed-loop clients split into
    # half-full batches for good.
    calls, release = [], threading.Event()

    def model(kind, items):
        calls.append(list(items))
        if items[0] == b"first":
            release.wait(5)
        return {"embedding": np.zeros((len(items), 1), np.float32)}

    async def scenario():
        batcher = batching.Batcher(model, max_batch_size=4, batch_timeout_ms=300)
        batcher.start()
        busy = asyncio.ensure_future(batcher.submit("encoded", [b"first"] * 4))  # full: runs now
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit("encoded", [b"queued"]))
        await asyncio.sleep(0.5)  # longer than the timeout: "queued" has waited that long
        release.set()
        await busy  # the answered client comes back right away
        back = asyncio.ensure_future(batcher.submit("encoded", [b"back"]))
        await asyncio.gather(queued, back)
        await batcher.stop()

    run_async(scenario())
    assert calls == [[b"first"] * 4, [b"queued", b"back"]]


def test_batcher_does_not_hold_a_lone_request_for_the_timeout():
    calls = []

    def model(kind, items):
        calls.append(len(items))
        return {"embedding": np.zeros((len(items), 1), np.float32)}

    async def scenario():
        batcher = batching.Batcher(model, max_batch_size=16, batch_timeout_ms=600_000)
        batcher.start()
        for _ in range(3):  # one client, one request after another: none waits ten minutes
            await asyncio.wait_for(batcher.submit("encoded", [b"alone"]), 30)
        await batcher.stop()

    run_async(scenario())
    assert calls == [1, 1, 1]


def test_a_failed_merged_call_fails_only_the_request_at_fault():
    calls = []

    def model(kind, items):  # refuses any batch holding the poisoned image (value 13)
        calls.append(len(items))
        if (np.asarray(items)[:, 0, 0, 0] == 13).any():
            raise RuntimeError("model refused image 13")
        return {"embedding": np.asarray(items, np.float32)[:, :1, 0, 0]}

    async def scenario():
        batcher = batching.Batcher(model, max_batch_size=8, batch_timeout_ms=200)
        batcher.start()
        requests = [np.full((1, 2, 2, 3), 13 if i == 5 else i, np.uint8) for i in range(8)]
        results = await asyncio.gather(*(batcher.submit("images", r) for r in requests),
                                       return_exceptions=True)
        await batcher.stop()
        return results

    results = run_async(scenario())
    assert calls[0] == 8  # they did share one call, which failed
    assert isinstance(results[5], RuntimeError) and "image 13" in str(results[5])
    for i, result in enumerate(results):
        if i != 5:
            np.testing.assert_array_equal(result["embedding"], [[i]])


def test_a_request_larger_than_the_whole_queue_is_refused_for_good_not_told_to_retry():
    async def scenario():
        batcher = batching.Batcher(lambda kind, items: {}, max_batch_size=4,
                                   max_enqueued_batches=2)
        batcher.start()
        try:
            await batcher.submit("images", np.zeros((9, 2, 2, 3), np.uint8))
        finally:
            await batcher.stop()

    with pytest.raises(batching.TooLarge, match=r"9 images; .* at most 8 "
                                                r"\(--max_enqueued_batches x --max_batch_size\)"):
        run_async(scenario())


def test_a_huge_body_and_stuck_gallery_calls_do_not_hold_up_a_small_predict():
    """Two searches stuck in the gallery (as a slow filter or a rebuild would be) and a 30 MB
    body being parsed: a small :predict is still answered, before the searches are let go."""
    from aiohttp import test_utils

    from reid_tf.deploy.serving.app import make_app
    from reid_tf.deploy.serving.server import Server
    from reid_tf.deploy.serving.server import ServingOptions

    class Export:
        version, path, model_id, embedding_width, num_parts = 1, "fake", None, 4, 0
        image_size = (8, 4)

        def predict_images(self, images):
            return {"embedding": np.ones((len(images), 4), np.float32)}

    release = threading.Event()
    store = gallery_store.GalleryStore(":memory:", 4, log=quiet)
    store.add([{"id": "a", "embedding": np.ones(4, np.float32)}])
    original = store.search

    def stuck_search(*args, **kwargs):
        release.wait(30)
        return original(*args, **kwargs)

    store.search = stuck_search
    server = Server(Export(), store, ServingOptions(max_batch=8, threads=2))
    image = np.zeros((1, 8, 4, 3), np.uint8).tolist()
    huge = {"instances": image, "padding": "x" * (30 << 20)}

    async def scenario():
        client = test_utils.TestClient(test_utils.TestServer(make_app(server, 64 << 20)))
        await client.start_server()
        try:
            searches = [asyncio.ensure_future(client.post(
                "/v1/models/reid:search", json={"embeddings": [[1, 0, 0, 0]]}))
                for _ in range(2)]
            big = asyncio.ensure_future(client.post("/v1/models/reid:predict", json=huge))
            await asyncio.sleep(0.2)  # the searches are stuck in the gallery by now
            small = await asyncio.wait_for(
                client.post("/v1/models/reid:predict", json={"instances": image}), 20)
            answered_first = not any(s.done() for s in searches)
            release.set()
            statuses = [small.status] + [(await s).status for s in searches]
            statuses.append((await big).status)
            return answered_first, statuses
        finally:
            release.set()
            await client.close()

    answered_first, statuses = run_async(scenario())
    assert answered_first and statuses == [200, 200, 200, 200], statuses
