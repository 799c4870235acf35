"""reid-serve with its gallery on Milvus Lite (--gallery_uri=milvus:PATH): the same answers as
the SQLite gallery, and no acknowledged add lost when the server is killed mid-stream."""

import random

import numpy as np
import pytest

from reid_tf import testing

pytestmark = pytest.mark.slow  # every test here trains, serves or runs a tool

pytest.importorskip("pymilvus", reason="pymilvus is not installed (make test installs it)")


def test_milvus_gallery_answers_as_the_sqlite_one(trained, tmp_path):
    queries = np.load(trained["gallery_npz"])["embeddings"][[0, 7, 30]]
    answers = {}
    for backend, flag in (("sqlite", f"--gallery_db={tmp_path / 'g.sqlite'}"),
                          ("milvus", f"--gallery_uri=milvus:{tmp_path / 'g_milvus.db'}")):
        with open(tmp_path / f"{backend}.log", "w") as log, \
                testing.serve(trained["export"], flag, f"--gallery={trained['gallery_npz']}",
                              log=log) as client:
            status, answer = client.request("POST", "/v1/models/reid:search", {
                "k": 8, "embeddings": queries.tolist(), "exclude_camera": 1})
            assert status == 200, answer
            answers[backend] = answer
            status, stats = client.request("GET", "/v1/models/reid/gallery")
            assert stats["size"] == len(np.load(trained["gallery_npz"])["embeddings"])
    for sqlite_hits, milvus_hits in zip(answers["sqlite"]["results"],
                                        answers["milvus"]["results"]):
        assert [h["id"] for h in milvus_hits] == [h["id"] for h in sqlite_hits]
        assert all(h["camera_id"] != 1 for h in milvus_hits)
        np.testing.assert_allclose([h["distance"] for h in milvus_hits],
                                   [h["distance"] for h in sqlite_hits], atol=1e-5)
        assert [h["match"] for h in milvus_hits] == [h["match"] for h in sqlite_hits]
    assert answers["milvus"]["in_gallery"] == answers["sqlite"]["in_gallery"]


def test_sigkill_during_adds_to_milvus_lite_loses_no_acknowledged_entry(trained, tmp_path):
    uri = f"--gallery_uri=milvus:{tmp_path / 'g_milvus.db'}"
    embeddings, pictures, entry = testing.gallery_adds(600)
    log = open(tmp_path / "serve.log", "w")
    with testing.serve(trained["export"], uri, log=log) as client:
        acknowledged, _ = testing.add_until_killed(client, entry, 600, random.randint(50, 500))
    assert 0 < len(acknowledged) < 600
    with testing.serve(trained["export"], uri, log=log) as client:
        status, stats = client.request("GET", "/v1/models/reid/gallery")
        assert len(acknowledged) <= stats["size"] <= len(acknowledged) + 1
        by_vector = [i for i in acknowledged if i not in pictures]
        for start in range(0, len(by_vector), 64):
            chunk = by_vector[start:start + 64]
            status, answer = client.request("POST", "/v1/models/reid:search", {
                "k": 1, "embeddings": embeddings[chunk].tolist()})
            assert [m[0]["id"] for m in answer["results"]] == [f"id{i}" for i in chunk]
        for i in [i for i in acknowledged if i in pictures]:
            status, data = client.request("GET", f"/v1/models/reid/gallery/thumbnails/id{i}",
                                          parse=False)
            assert status == 200 and data[:2] == b"\xff\xd8"  # its thumbnail came with it
    log.close()
