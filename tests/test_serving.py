"""reid-export, reid-extract and reid-serve on a tiny synthetic training run (subprocesses)."""

import base64
import os
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from reid_tf import testing
from reid_tf.data import preprocessing
from reid_tf.deploy import runtime
from reid_tf.deploy.gallery import faiss_index
from reid_tf.deploy.gallery import seed
from reid_tf.deploy.gallery import store as gallery_store
from reid_tf.evaluate import extract as extract_lib
from reid_tf.evaluate import features_npz
from reid_tf.evaluate import metrics as metrics_lib
from reid_tf.train import workdir as workdir_lib

pytestmark = pytest.mark.slow  # every test here trains, serves or runs a tool

def run(*command, check=True):
    result = subprocess.run([*command], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


python = testing.run_module


def decoded(split):
    """The split's images as uint8 arrays (lossless PNGs in synthetic_persons)."""
    return testing.decoded(split.images)


@pytest.fixture(scope="module")
def server(trained):
    with open(os.path.join(trained["workdir"], "serve.log"), "w+") as log:
        try:
            with testing.serve(trained["export"], f"--gallery={trained['gallery_npz']}",
                               "--max_batch=8", "--max_body_mb=1", log=log) as client:
                status, body = client.request("GET", "/v1/models/reid")
                assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"
                yield client
        except RuntimeError as error:
            log.seek(0)
            pytest.fail(f"{error}: {log.read()[-3000:]}")


def test_export_cli_refuses_to_overwrite_a_version_and_saved_model_cli_lists_signatures(
        trained):
    again = python("reid_tf.cli.export", f"--workdir={trained['workdir']}", check=False)
    assert again.returncode == 1
    assert "reid-export: error:" in again.stderr and "already exists" in again.stderr
    assert sorted(os.listdir(os.path.dirname(trained["export"]))) == ["20"]
    shown = run(os.path.join(os.path.dirname(sys.executable), "saved_model_cli"), "show",
                "--all", "--dir", trained["export"]).stdout
    assert "signature_def['serving_default']" in shown
    assert "signature_def['serve_encoded']" in shown
    assert "dtype: DT_UINT8\n        shape: (-1, -1, -1, 3)" in shown
    assert "outputs['embedding'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, 64)" \
        in shown  # (K+1)·D = 4·16
    assert "shape: (-1, 3, 16)" in shown  # part_embeddings


def test_keras_savedmodel_subprocess_and_http_embeddings_agree(trained, server):
    images = decoded(trained["splits"]["query"])[:6]
    model, _ = workdir_lib.load_trained_model(trained["workdir"])
    keras_embedding = model(preprocessing.preprocess(images, (64, 32)),
                            training=False)["embedding"].numpy()

    # A process that never imports reid_tf: plain TensorFlow on both signatures.
    np.save(os.path.join(trained["workdir"], "images.npy"), images)
    script = textwrap.dedent(f"""
        import sys, numpy as np, tensorflow as tf
        images = np.load({os.path.join(trained['workdir'], 'images.npy')!r})
        loaded = tf.saved_model.load({trained['export']!r})
        arrays = loaded.signatures["serving_default"](images=tf.constant(images))["embedding"]
        encoded = [tf.io.encode_png(image).numpy() for image in images]
        strings = loaded.signatures["serve_encoded"](images=tf.constant(encoded))["embedding"]
        np.save({os.path.join(trained['workdir'], 'plain.npy')!r},
                np.stack([arrays.numpy(), strings.numpy()]))
        assert not any(name.startswith("reid_tf") for name in sys.modules), "imported reid_tf"
    """)
    run(sys.executable, "-c", script)
    plain = np.load(os.path.join(trained["workdir"], "plain.npy"))

    status, from_arrays = server.request("POST", "/v1/models/reid:predict",
                                         {"instances": images.tolist()})
    assert status == 200, from_arrays
    status, from_b64 = server.request("POST", "/v1/models/reid/versions/20:predict", {
        "signature_name": "serve_encoded",
        "instances": [{"b64": testing.b64_png(image)} for image in images]})
    assert status == 200, from_b64
    status, columnar = server.request("POST", "/v1/models/reid:predict",
                                      {"inputs": {"images": images[:2].tolist()}})
    assert status == 200 and len(columnar["outputs"]["embedding"]) == 2

    for other in (plain[0], plain[1], [p["embedding"] for p in from_arrays["predictions"]],
                  [p["embedding"] for p in from_b64["predictions"]],
                  columnar["outputs"]["embedding"]):
        np.testing.assert_allclose(np.asarray(other), keras_embedding[:len(other)], atol=1e-5)
    assert np.abs(keras_embedding).max() > 0.01  # not a vacuous comparison
    masks = np.asarray(from_arrays["predictions"][0]["part_masks"])
    np.testing.assert_array_equal(masks.sum(-1), 1)  # one part per cell


def test_search_top1_equals_the_evaluation_distance_matrix(trained, server):
    query = trained["splits"]["query"]
    gallery = features_npz.load_features(trained["gallery_npz"])
    assert len(gallery["embeddings"]) == len(trained["splits"]["gallery"])
    np.testing.assert_array_equal(gallery["person_ids"], trained["splits"]["gallery"].person_ids)
    export = runtime.SavedModelRuntime(trained["export"])
    query_embeddings = extract_lib.extract(export, query, encoded=True)["embedding"]
    expected = metrics_lib.pairwise_distances(query_embeddings, gallery["embeddings"]).argmin(1)

    found = []
    for start in range(0, len(query), 8):
        status, body = server.request("POST", "/v1/models/reid:search", {
            "k": 3, "instances": [{"b64": base64.b64encode(data).decode()}
                                  for data in query.images[start:start + 8]]})
        assert status == 200, body
        found += body["results"]
    assert [r[0]["file_name"] for r in found] == list(gallery["file_names"][expected])
    assert all(len(r) == 3 and r[0]["distance"] <= r[1]["distance"] <= r[2]["distance"]
               for r in found)
    assert found[0][0]["person_id"] == int(gallery["person_ids"][expected[0]])


@pytest.mark.parametrize("body, field", [
    (b"{not json", "body"),
    ({"instances": [{"b64": "@@@"}]}, "instances[0].b64"),
    ({"instances": [{"b64": base64.b64encode(b"not an image").decode()}]}, "instances[0].b64"),
    ({"instances": [[[1, 2], [3, 4]]]}, "instances[0]"),
    ({"instances": [[[[0.5, 0.5, 0.5]]]]}, "instances[0]"),
    ({"instances": [[[[300, 0, 0]]]]}, "instances[0]"),
    ({"instances": [[[[1, 2, 3]]], [[[1, 2, 3], [4, 5, 6]]]]}, "instances[1]"),
    ({"instances": [[[[1, 2, 3]]]] * 9}, "instances"),
    ({"instances": []}, "instances"),
    ({"images": []}, "instances"),
    ({"k": 0, "instances": [[[[1, 2, 3]]]]}, "k"),
    ({"signature_name": "train", "instances": [[[[1, 2, 3]]]]}, "signature_name"),
])
def test_bad_requests_get_400_naming_the_field(server, body, field):
    path = "/v1/models/reid:search" if isinstance(body, dict) and "k" in body else \
        "/v1/models/reid:predict"
    status, answer = server.request("POST", path, body)
    assert status == 400, answer
    assert answer["field"] == field and answer["error"]


def test_body_cap_unknown_model_and_metadata(server):
    status, answer = server.request("POST", "/v1/models/reid:predict", b"x" * (2 << 20))
    assert status == 413 and answer["field"] == "body"
    status, answer = server.request("GET", "/v1/models/other")
    assert status == 404
    status, answer = server.request("GET", "/v1/models/reid/metadata")
    assert status == 200 and answer["model_spec"]["version"] == "20"
    inputs = answer["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    assert inputs["images"]["dtype"] == "DT_UINT8"
    assert [d["size"] for d in inputs["images"]["tensor_shape"]["dim"]] == ["-1", "-1", "-1", "3"]


def test_load_8_clients_x_200_requests_mixed_valid_and_malformed(trained, server):
    images = decoded(trained["splits"]["gallery"])[:16]
    model, _ = workdir_lib.load_trained_model(trained["workdir"])
    expected = model(preprocessing.preprocess(images, (64, 32)),
                     training=False)["embedding"].numpy()
    report = testing.load_test(server.host, server.port, images, clients=8, requests=200)
    assert report["total"] == 1600
    assert report["server_errors"] == 0 and report["unexpected"] == [], report["unexpected"][:5]
    assert report["valid"] > 500 and report["malformed"] > 500
    # Every valid answer is the embedding of the image that request sent (no mix-ups).
    for index, embedding in report["embeddings"]:
        np.testing.assert_allclose(embedding, expected[index], atol=1e-5)
    status, _ = server.request("GET", "/v1/models/reid")
    assert status == 200  # still up


def test_gallery_index_ivf_finds_the_exact_neighbours_when_probing_every_list(tmp_path):
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(500, 32)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    names = np.array([f"{i:04d}_c1s1_000000_00.jpg" for i in range(500)])
    arrays = {"embeddings": embeddings, "file_names": names}
    flat = gallery_store.GalleryStore(":memory:", 32, log=lambda line: None)
    flat.import_features(arrays)
    ivf = gallery_store.GalleryStore(":memory:", 32, index=seed.index_spec("ivf", 8),
                                     nprobe=8, log=lambda line: None)
    ivf.import_features(arrays)
    assert "IVF" in type(faiss_index.inner_of(ivf.index)).__name__
    queries = embeddings[:20] + 0.01 * rng.normal(size=(20, 32)).astype(np.float32)
    for exact, approximate in zip(flat.search(queries, 5), ivf.search(queries, 5)):
        assert [m["id"] for m in exact] == [m["id"] for m in approximate]
    assert [m["id"] for m in flat.search(embeddings[7:8], 1)[0]] == [names[7]]
    assert flat.search(embeddings[7:8], 1)[0][0]["distance"] == pytest.approx(0, abs=1e-5)
    with pytest.raises(RuntimeError):
        gallery_store.GalleryStore(":memory:", 32, index="IVF8,Nonsense")


def test_extract_folder_names_an_undecodable_file_and_reads_any_folder(trained, tmp_path):
    images = decoded(trained["splits"]["gallery"])[:3]
    folder = tmp_path / "photos" / "sub"
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:04d}_c{i + 1}s1_000000_00.png")
    output = tmp_path / "features.npz"
    python("reid_tf.cli.extract", f"--export={trained['export']}",
           f"--images={tmp_path / 'photos'}", f"--output={output}")
    arrays = features_npz.load_features(str(output))
    assert list(arrays["file_names"]) == [f"sub/{i:04d}_c{i + 1}s1_000000_00.png"
                                          for i in range(3)]
    np.testing.assert_array_equal(arrays["camera_ids"], [1, 2, 3])
    (folder / "holiday.jpg").write_bytes(b"not a jpeg")
    result = python("reid_tf.cli.extract", f"--export={trained['export']}",
                    f"--images={tmp_path / 'photos'}", f"--output={output}", check=False)
    assert result.returncode == 1
    assert "reid-extract: error: sub/holiday.jpg: not a decodable" in result.stderr
    assert features_npz.load_features(str(output))["embeddings"].shape == (3, 64)  # kept


def test_live_gallery_add_search_remove_restart(trained, tmp_path):
    """The README's flow: start with a database, add images and embeddings, search with
    filters, remove, restart, search again."""
    database = str(tmp_path / "gallery.sqlite")
    images = decoded(trained["splits"]["gallery"])[:6]
    expected = runtime.SavedModelRuntime(trained["export"]).predict_images(images)["embedding"]
    log = open(tmp_path / "serve.log", "w")
    with testing.serve(trained["export"], f"--gallery_db={database}", log=log) as client:
        entries = [{"id": f"img{i}", "b64": testing.b64_png(image), "camera_id": i % 2,
                    "timestamp": 100.0 + i, "metadata": {"frame": i}}
                   for i, image in enumerate(images[:4])]
        entries.append({"id": "arr4", "image": images[4].tolist(), "camera_id": 0})
        entries.append({"id": "vec5", "embedding": expected[5].tolist(), "person_id": 7})
        status, answer = client.request("POST", "/v1/models/reid:add", {"entries": entries})
        assert (status, answer) == (200, {"added": 6})
        status, answer = client.request("POST", "/v1/models/reid:search", {
            "k": 6, "instances": [{"b64": testing.b64_png(images[2])}]})
        assert status == 200
        top = answer["results"][0]
        assert top[0]["id"] == "img2" and top[0]["metadata"] == {"frame": 2}
        assert top[0]["distance"] == pytest.approx(0, abs=1e-4)
        assert sorted(m["id"] for m in top) == ["arr4", "img0", "img1", "img2", "img3", "vec5"]
        status, answer = client.request("POST", "/v1/models/reid:search", {
            "k": 6, "embeddings": [expected[2].tolist()], "exclude_camera": 0,
            "time_range": [101, None]})
        assert [m["id"] for m in answer["results"][0]] in (["img3", "img1"], ["img1", "img3"])
        status, answer = client.request("POST", "/v1/models/reid:remove",
                                        {"ids": ["img2", "missing"]})
        assert (status, answer) == (200, {"removed": 1})
        status, answer = client.request("POST", "/v1/models/reid:add", {"entries": [
            {"id": "bad", "embedding": [0.0] * 3}]})
        assert status == 400 and answer["field"] == "entries[0].embedding"
    with testing.serve(trained["export"], f"--gallery_db={database}", log=log) as client:
        status, answer = client.request("POST", "/v1/models/reid:search",
                                        {"k": 10, "embeddings": [expected[2].tolist()]})
        ids = [m["id"] for m in answer["results"][0]]
        assert sorted(ids) == ["arr4", "img0", "img1", "img3", "vec5"]
        vec = [m for m in answer["results"][0] if m["id"] == "vec5"][0]
        assert vec["person_id"] == 7
    log.close()
    assert "loaded " in open(tmp_path / "serve.log").read()  # the index file, not a rebuild


def test_sigkill_during_a_stream_of_adds_loses_no_acknowledged_entry(trained, tmp_path):
    import random

    database = str(tmp_path / "gallery.sqlite")
    # Every third add is an image: its entry and thumbnail are one transaction.
    embeddings, pictures, entry = testing.gallery_adds(1000)
    log = open(tmp_path / "serve.log", "w")
    with testing.serve(trained["export"], f"--gallery_db={database}", "--persist_every=100",
                       log=log) as client:
        # Killed at a random moment after a random number of acknowledgements.
        added, sent = testing.add_until_killed(client, entry, 1000, random.randint(100, 900))
    acknowledged = [f"id{i}" for i in added]
    attempted = [f"id{i}" for i in range(sent)]
    assert 0 < len(acknowledged) < 1000, len(acknowledged)  # killed mid-stream
    with testing.serve(trained["export"], f"--gallery_db={database}", log=log) as client:
        found = {}
        by_vector = [i for i in range(len(acknowledged)) if i not in pictures]
        for start in range(0, len(by_vector), 64):
            chunk = by_vector[start:start + 64]
            status, answer = client.request("POST", "/v1/models/reid:search", {
                "k": 1, "embeddings": embeddings[chunk].tolist()})
            assert status == 200
            found.update({f"id{i}": matches[0]["id"] for i, matches in
                          zip(chunk, answer["results"])})
        assert all(found[name] == name for name in found)  # every ack is searchable
        by_image = [f"id{i}" for i in range(len(acknowledged)) if i in pictures]
        for start in range(0, len(by_image), 64):
            status, answer = client.request("POST", "/v1/models/reid:search", {
                "k": 1, "entry_ids": by_image[start:start + 64]})
            assert status == 200 and all(m[0]["distance"] < 1e-4 for m in answer["results"])
        metrics = client.raw("/metrics")
    log.close()
    db = sqlite3.connect(database)
    rows = db.execute("SELECT e.id, length(e.embedding), e.camera_id, t.row IS NOT NULL FROM "
                      "entries e LEFT JOIN thumbnails t ON t.row = e.row").fetchall()
    ids = {row[0] for row in rows}
    assert set(acknowledged) <= ids <= set(attempted)  # at most the one in flight beyond
    assert all(length == 64 * 4 and camera is not None for _, length, camera, _ in rows)
    # No entry added from an image is left without its thumbnail, and no thumbnail without
    # its entry.
    assert all(has == (int(name[2:]) in pictures) for name, _, _, has in rows)
    assert db.execute("SELECT COUNT(*) FROM thumbnails t LEFT JOIN entries e ON e.row = t.row "
                      "WHERE e.row IS NULL").fetchone()[0] == 0
    gallery_size = [line for line in metrics.splitlines() if line.startswith(
        "reid_gallery_size ")]
    assert float(gallery_size[0].split()[1]) == len(rows)  # the index agrees with the database


def test_metrics_are_prometheus_text(trained, server):
    from prometheus_client.parser import text_string_to_metric_families

    before = scrape(server)
    image = decoded(trained["splits"]["query"])[:1]
    for _ in range(3):
        status, _ = server.request("POST", "/v1/models/reid:predict",
                                   {"instances": image.tolist()})
        assert status == 200
    status, _ = server.request("POST", "/v1/models/reid:predict", b"{not json")
    assert status == 400
    after = scrape(server)

    def value(samples, name, **labels):
        return sum(v for n, l, v in samples if n == name and labels.items() <= l.items())

    assert value(after, "reid_requests_total", route="predict", status="200") - value(
        before, "reid_requests_total", route="predict", status="200") == 3
    assert value(after, "reid_requests_total", route="predict", status="400") - value(
        before, "reid_requests_total", route="predict", status="400") == 1
    assert value(after, "reid_batch_size_count") - value(before, "reid_batch_size_count") == 3
    assert value(after, "reid_request_seconds_count", route="predict") >= 4
    assert value(after, "reid_gallery_size") == len(trained["splits"]["gallery"])
    assert ("reid_queue_depth", {}, 0.0) in after
    families = {f.name for f in text_string_to_metric_families(server.raw("/metrics"))}
    assert {"reid_requests", "reid_request_seconds", "reid_batch_size", "reid_queue_depth",
            "reid_gallery_size", "reid_index_staleness_changes"} <= families


def scrape(client):
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for family in
            text_string_to_metric_families(client.raw("/metrics")) for s in family.samples]


def test_unknown_routes_and_signature_mismatches_answer_json(trained, server):
    status, answer = server.request("GET", "/nowhere")
    assert status == 404 and "error" in answer
    image = decoded(trained["splits"]["query"])[:1]
    status, answer = server.request("POST", "/v1/models/reid:predict", {
        "signature_name": "serving_default", "instances": [{"b64": testing.b64_png(image[0])}]})
    assert status == 400 and answer["field"] == "signature_name"
    status, answer = server.request("POST", "/v1/models/reid:predict", {
        "signature_name": "serve_encoded", "instances": image.tolist()})
    assert status == 400 and answer["field"] == "signature_name"
    status, answer = server.request("POST", "/v1/models/reid:predict", {
        "inputs": [{"b64": base64.b64encode(b"not an image").decode()}]})
    assert status == 400 and answer["field"] == "inputs[0].b64"


def test_a_full_queue_answers_503_with_retry_after(trained, tmp_path):
    import concurrent.futures
    import http.client
    import json

    images = decoded(trained["splits"]["query"])[:8]
    body = json.dumps({"instances": images.tolist()}).encode()
    log = open(tmp_path / "serve.log", "w")
    with testing.serve(trained["export"], "--max_batch_size=8", "--max_enqueued_batches=1",
                       "--batch_timeout_ms=200", log=log) as client:
        def post(_):
            connection = http.client.HTTPConnection("127.0.0.1", client.port, timeout=120)
            connection.request("POST", "/v1/models/reid:predict", body)
            response = connection.getresponse()
            response.read()
            return response.status, response.getheader("Retry-After")

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(post, range(12)))
    log.close()
    assert {status for status, _ in answers} <= {200, 503}
    assert any(status == 200 for status, _ in answers)
    assert any(status == 503 and retry == "1" for status, retry in answers), answers


def test_each_route_is_counted_under_its_own_label(server):
    def counts():
        counted = {}
        for name, labels, value in scrape(server):
            if name == "reid_requests_total":
                counted[labels["route"]] = counted.get(labels["route"], 0) + value
        return counted

    before = counts()
    for path in ("/v1/models/reid", "/v1/models/reid/metadata", "/", "/ui/config.json"):
        status, _ = server.request("GET", path, parse=False)
        assert status == 200, path
    after = counts()
    assert {route: after.get(route, 0) - before.get(route, 0)
            for route in ("status", "metadata", "ui", "metrics", "unknown")} == {
        "status": 1, "metadata": 1, "ui": 2, "metrics": 1, "unknown": 0}


def test_made_up_verbs_share_one_metrics_label(server):
    for i in range(30):
        status, answer = server.request("POST", f"/v1/models/reid:x{i}", {})
        assert status == 400 and answer["field"] == "method"
    routes = {labels.get("route") for name, labels, _ in scrape(server)
              if name == "reid_requests_total"}
    assert not any(route and route.startswith("x") for route in routes), routes
    assert "unknown" in routes


def test_search_rough_edges_answer_one_clear_line(trained, server):
    embedding = server.request("POST", "/v1/models/reid:predict", {
        "instances": decoded(trained["splits"]["query"])[:1].tolist()})[1]["predictions"][0]
    vector = embedding["embedding"] if isinstance(embedding, dict) else embedding
    status, answer = server.request("GET", "/v1/models/reid:predict")
    assert status == 405 and "error" in answer
    status, answer = server.request("POST", "/v1/models/reid:search", {
        "embeddings": [vector], "instances": [[[[0, 0, 0]]]]})
    assert status == 400 and answer["field"] == "instances"
    # [null, null] filters nothing: the same hits as no time range at all.
    plain = server.request("POST", "/v1/models/reid:search", {"embeddings": [vector], "k": 5})
    open_range = server.request("POST", "/v1/models/reid:search", {
        "embeddings": [vector], "k": 5, "time_range": [None, None]})
    assert plain[0] == open_range[0] == 200 and plain[1]["results"]
    assert open_range[1]["results"] == plain[1]["results"]


def test_a_timed_out_add_says_it_may_have_committed_and_its_retry_is_safe(trained, tmp_path):
    import time

    images = decoded(trained["splits"]["gallery"])[:48]
    body = {"entries": [{"id": f"slow{i}", "b64": testing.b64_png(image)}
                        for i, image in enumerate(images)]}
    database = f"--gallery_db={tmp_path / 'g.sqlite'}"

    def gallery_size(client):
        return float([line for line in client.raw("/metrics").splitlines()
                      if line.startswith("reid_gallery_size ")][0].split()[1])

    with testing.serve(trained["export"], database, "--timeout_s=0.05",
                       "--max_batch=64") as client:
        status, answer = client.request("POST", "/v1/models/reid:add", body)
        assert status == 504, (status, answer)
        assert "may still have been committed: retrying it is safe" in answer["error"]
        time.sleep(2)  # a commit already running finishes in its thread: all of it or none
        assert gallery_size(client) in (0, 48)
    # The retry (on a server with time for it) replaces by id: each entry is held once.
    with testing.serve(trained["export"], database, "--max_batch=64") as client:
        status, answer = client.request("POST", "/v1/models/reid:add", body)
        assert (status, answer) == (200, {"added": 48}) and gallery_size(client) == 48


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "notes.txt", "file is not a database"),
    (lambda tmp: tmp / "missing" / "g.sqlite", "unable to open database file"),
    (lambda tmp: tmp, "unable to open database file"),
])
def test_a_bad_gallery_db_is_one_line_naming_the_flag(tmp_path, make, message):
    from reid_tf.deploy.gallery import store as gallery_store

    (tmp_path / "notes.txt").write_text("not a database\n")
    path = str(make(tmp_path))
    with pytest.raises(sqlite3.Error) as problem:
        gallery_store.GalleryStore(path, 8, log=lambda line: None)
    line = seed.start_error(problem.value, path)
    assert line.startswith(f"--gallery_db={path}: ") and message in line and "\n" not in line


def test_a_wrong_or_unreadable_gallery_npz_names_the_file_and_both_sizes(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an npz\n")
    narrow = tmp_path / "narrow.npz"
    features_npz.save_features(str(narrow), np.ones((2, 5), np.float32), np.array(["a", "b"]))

    class Export:
        embedding_width = 64

    with pytest.raises(ValueError, match=f"{narrow}: embeddings of 5, but the model and the "
                                         "gallery hold 64"):
        seed.open_gallery(Export(), seed.GalleryOptions(gallery=str(narrow)), log=lambda line: None)
    with pytest.raises(ValueError, match=f"{text}: not a features .npz"):
        seed.open_gallery(Export(), seed.GalleryOptions(gallery=str(text)), log=lambda line: None)


def test_serve_start_up_errors_are_one_line(trained, tmp_path):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    # (The --gallery_db cases go through the same seed.start_error: tested in-process above.)
    cases = [([f"--port={port}", "--host=127.0.0.1"], "address already in use")]
    try:
        for flags, message in cases:
            result = python("reid_tf.cli.serve", f"--export={trained['export']}", *flags,
                            check=False)
            assert result.returncode == 1, (flags, result.stderr[-1500:])
            assert "Traceback" not in result.stderr, (flags, result.stderr[-1500:])
            errors = [line for line in result.stderr.splitlines()
                      if line.startswith("reid-serve: error:")]
            assert len(errors) == 1 and message in errors[0].lower(), (
                flags, result.stderr[-800:])
    finally:
        taken.close()


def test_extracted_features_follow_the_umask(trained, tmp_path):
    output = tmp_path / "f.npz"
    features_npz.save_features(str(output), np.ones((2, 4), np.float32), np.array(["a", "b"]))
    old = os.umask(0o022)
    os.umask(old)
    assert (os.stat(output).st_mode & 0o777) == 0o666 & ~old


def test_an_export_names_its_weights_the_same_on_every_export_of_one_checkpoint(trained,
                                                                               tmp_path):
    from reid_tf.deploy import runtime

    first = runtime.model_id(trained["export"])
    assert first is not None and len(first) == 16
    python("reid_tf.cli.export", f"--workdir={trained['workdir']}", f"--export_dir={tmp_path / 'again'}")
    (again,) = os.listdir(tmp_path / "again")
    assert runtime.model_id(str(tmp_path / "again" / again)) == first


def test_the_http_parsers_own_errors_answer_json(server):
    import json
    import socket

    for head in (b"POST /v1/models/reid:predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                 b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n"):
        with socket.create_connection((server.host, server.port), timeout=30) as connection:
            connection.sendall(head)
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        status_line, _, rest = answer.partition(b"\r\n")
        headers, _, body = rest.partition(b"\r\n\r\n")
        assert b" 400 " in status_line or b" 413 " in status_line or b" 431 " in status_line, \
            answer[:300]
        assert b"application/json" in headers.lower(), answer[:300]
        assert set(json.loads(body)) == {"error", "field"}
