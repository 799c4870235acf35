"""reid-serve's decisions (match / in_gallery / :verify at calibrated thresholds) and the
gallery's reads (stats, entries, thumbnails), on the tiny run of `trained` (tests/conftest.py)."""

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from reid_tf import testing
from reid_tf.deploy import runtime
from reid_tf.evaluate import calibration

pytestmark = pytest.mark.slow  # every test here trains, serves or runs a tool


def decoded(split, count):
    return testing.decoded(split.images[:count])


@pytest.fixture(scope="module")
def served_calibration(trained, tmp_path_factory):
    """The export's calibration with a p_same of the right sign: the tiny model's own fit may
    be refused as inverted (its genuine pairs no nearer than impostors), and these tests check
    how a fitted p_same is applied."""
    with open(os.path.join(trained["export"], "assets", "calibration.json")) as f:
        fitted = json.load(f)
    assert ("p_same" in fitted) != ("p_same_refused" in fitted)
    fitted["p_same"] = {"kind": "logistic", "intercept": 3.0, "coef": -6.0, "prior": 0.5}
    path = tmp_path_factory.mktemp("calibration") / "calibration.json"
    path.write_text(json.dumps(fitted))
    return str(path)


@pytest.fixture(scope="module")
def served(trained, served_calibration, tmp_path_factory):
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w+")
    try:
        with testing.serve(trained["export"], f"--gallery={trained['gallery_npz']}",
                           f"--calibration={served_calibration}", log=log) as client:
            yield client
    except RuntimeError as error:
        log.seek(0)
        pytest.fail(f"{error}: {log.read()[-3000:]}")


def test_search_decides_each_hit_and_query_at_the_calibrated_threshold(trained, served,
                                                                       served_calibration):
    fitted = calibration.load(served_calibration)
    queries = decoded(trained["splits"]["query"], 6)
    status, answer = served.request("POST", "/v1/models/reid:search", {
        "k": 20, "instances": [{"b64": testing.b64_png(q)} for q in queries]})
    assert status == 200, answer
    point = answer["operating_point"]
    # 19 validation queries cannot measure an open-set FAR of 0.01 (issue 39): the server
    # decides at the finest rate the calibration supports, 0.1.
    assert fitted["measured_on"]["stranger_queries"] < 100
    assert calibration.supported_fars(fitted) == [0.1]
    fitted_point = next(p for p in fitted["open_set"] if p["far"] == 0.1)
    assert point == {"kind": "open_set", "far": 0.1,
                     "threshold": calibration.threshold(fitted, "open_set", 0.1),
                     "measured_far": fitted_point["measured_far"],
                     "far_interval": fitted_point["far_interval"]}
    low, high = point["far_interval"]  # how sure the calibration is, from its query count
    assert 0 <= low <= point["measured_far"] <= high <= 1 and high - low > 0.01
    for hits, in_gallery in zip(answer["results"], answer["in_gallery"]):
        assert [hit["match"] for hit in hits] == [hit["distance"] < point["threshold"]
                                                  for hit in hits]
        assert in_gallery == hits[0]["match"]
        expected = calibration.p_same(fitted, [hit["distance"] for hit in hits])
        assert [hit["p_same"] for hit in hits] == pytest.approx(expected.tolist())
        assert all(hit["thumbnail"] is False for hit in hits)  # seeded from a features.npz
    # A fitted rate the validation set cannot measure is refused, and so is an unfitted one.
    status, refused = served.request("POST", "/v1/models/reid:search", {
        "far": 0.01, "instances": [{"b64": testing.b64_png(queries[0])}]})
    assert status == 400 and refused["field"] == "far"
    assert "validation queries cannot measure it" in refused["error"]
    assert "supported FARs: 0.1." in refused["error"]
    status, refused = served.request("POST", "/v1/models/reid:search", {
        "far": 0.05, "instances": [{"b64": testing.b64_png(queries[0])}]})
    assert status == 400 and refused["field"] == "far"
    assert "not fitted; the calibration has 0.1, 0.01, 0.001" in refused["error"]
    # The query's part masks, for the page's overlay.
    status, masked = served.request("POST", "/v1/models/reid:search", {
        "k": 1, "return_masks": True, "instances": [{"b64": testing.b64_png(queries[0])}]})
    masks = np.array(masked["part_masks"])
    assert masks.shape[0] == 1 and masks.shape[-1] == 3
    np.testing.assert_allclose(masks.sum(-1), 1)  # every cell in exactly one part


def test_verify_compares_two_images_or_embeddings(trained, served, served_calibration):
    fitted = calibration.load(served_calibration)
    images = decoded(trained["splits"]["gallery"], 3)
    embeddings = runtime.SavedModelRuntime(trained["export"]).predict_images(images)["embedding"]
    status, answer = served.request("POST", "/v1/models/reid:verify", {
        "instances": [{"b64": testing.b64_png(images[0])}, {"b64": testing.b64_png(images[1])}]})
    assert status == 200, answer
    distance = 1 - embeddings[0] @ embeddings[1]
    assert answer["distance"] == pytest.approx(distance, abs=1e-5)
    threshold = calibration.threshold(fitted, "verification", 0.1)
    fitted_point = next(p for p in fitted["verification"] if p["far"] == 0.1)
    assert answer["operating_point"] == {"kind": "verification", "far": 0.1,
                                         "threshold": threshold,
                                         "measured_far": fitted_point["measured_far"],
                                         "far_interval": fitted_point["far_interval"]}
    assert answer["match"] == (answer["distance"] < threshold)
    # p_same is fitted for a ranked hit's question (issue 39), so a pair gets none.
    assert "p_same" not in answer
    status, same = served.request("POST", "/v1/models/reid:verify", {
        "embeddings": [embeddings[2].tolist(), embeddings[2].tolist()], "far": 0.01})
    assert status == 200 and same["distance"] == pytest.approx(0, abs=1e-5) and same["match"]
    # Verification rests on ~500 impostor pairs: 0.01 is measured there, 0.001 is not.
    assert same["operating_point"]["threshold"] == calibration.threshold(fitted, "verification",
                                                                          0.01)
    status, refused = served.request("POST", "/v1/models/reid:verify", {
        "embeddings": [embeddings[2].tolist(), embeddings[2].tolist()], "far": 0.001})
    assert status == 400 and "impostor pairs cannot measure it" in refused["error"]
    status, refused = served.request("POST", "/v1/models/reid:verify", {
        "embeddings": [embeddings[2].tolist()]})
    assert status == 400 and refused["field"] == "embeddings" and "exactly 2" in refused["error"]


def test_an_export_without_calibration_answers_without_decisions(trained, tmp_path):
    export = str(tmp_path / "20")
    shutil.copytree(trained["export"], export)
    os.remove(os.path.join(export, "assets", "calibration.json"))
    embedding = np.load(trained["gallery_npz"])["embeddings"][0].tolist()
    log = open(tmp_path / "serve.log", "w")
    with testing.serve(export, f"--gallery={trained['gallery_npz']}", log=log) as client:
        status, answer = client.request("POST", "/v1/models/reid:search", {
            "k": 3, "embeddings": [embedding]})
        assert status == 200 and "in_gallery" not in answer
        assert "match" not in answer["results"][0][0]
        status, refused = client.request("POST", "/v1/models/reid:search", {
            "far": 0.01, "embeddings": [embedding]})
        assert status == 400 and "no calibration" in refused["error"]
        status, verified = client.request("POST", "/v1/models/reid:verify", {
            "embeddings": [embedding, embedding]})
        assert set(verified) == {"distance"}
    assert "no calibration:" in open(tmp_path / "serve.log").read()
    # A --far the calibration lacks is refused at start, in one line.
    refused = testing.run_module("reid_tf.cli.serve", f"--export={trained['export']}",
                                 "--far=0.05", check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        "reid-serve: error: FAR 0.05: not fitted; the calibration has 0.1, 0.01, 0.001.")
    # So is one its validation set cannot measure (issue 39).
    refused = testing.run_module("reid_tf.cli.serve", f"--export={trained['export']}",
                                 "--far=0.01", check=False)
    assert refused.returncode == 1
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("reid-serve: error: FAR 0.01: the calibration's ")
    assert "validation queries cannot measure it" in last


def test_gallery_stats_entries_thumbnails_and_search_by_entry(trained, tmp_path):
    images = decoded(trained["splits"]["gallery"], 4)
    log = open(tmp_path / "serve.log", "w")
    database = str(tmp_path / "gallery.sqlite")
    with testing.serve(trained["export"], f"--gallery_db={database}", "--thumbnail_size=40",
                       log=log) as client:
        entries = [{"id": f"cam{i % 2}/img{i}", "b64": testing.b64_png(image), "camera_id": i % 2,
                    "timestamp": 100.0 + i} for i, image in enumerate(images[:3])]
        entries.append({"id": "vector", "embedding": [1.0] + [0.0] * 63, "camera_id": 5})
        status, _ = client.request("POST", "/v1/models/reid:add", {"entries": entries})
        assert status == 200
        status, stats = client.request("GET", "/v1/models/reid/gallery")
        assert stats["size"] == 4 and stats["thumbnails"] == 3
        assert stats["cameras"] == [{"camera_id": 0, "entries": 2},
                                    {"camera_id": 1, "entries": 1},
                                    {"camera_id": 5, "entries": 1}]
        assert stats["time_span"] == [100.0, 102.0] and stats["index"]["stale"] is False
        # Only the rates its validation set can measure are offered (issue 39).
        assert stats["decisions"]["far"] == 0.1 and stats["decisions"]["fars"] == [0.1]
        status, page = client.request("GET", "/v1/models/reid/gallery/entries?limit=2&offset=1")
        assert page["total"] == 4 and [e["id"] for e in page["entries"]] == ["cam0/img2",
                                                                            "cam1/img1"]
        assert page["entries"][0]["thumbnail"] is True
        status, data = client.request("GET", "/v1/models/reid/gallery/thumbnails/cam1%2Fimg1",
                                      parse=False)
        thumbnail = Image.open(io.BytesIO(data))
        assert status == 200 and thumbnail.format == "JPEG"
        assert thumbnail.size == (20, 40)  # 64x32 scaled to 40 high
        # The thumbnail is the image's, not another's.
        expected = np.asarray(Image.fromarray(images[1]).resize((20, 40), Image.BILINEAR), float)
        assert np.abs(np.asarray(thumbnail.convert("RGB"), float) - expected).mean() < 12
        status, missing = client.request("GET", "/v1/models/reid/gallery/thumbnails/vector")
        assert status == 404 and missing["field"] == "entry_id"
        status, answer = client.request("POST", "/v1/models/reid:search", {
            "k": 2, "entry_ids": ["cam0/img2"]})
        top = answer["results"][0][0]
        assert top["id"] == "cam0/img2" and top["distance"] == pytest.approx(0, abs=1e-5)
        assert top["thumbnail"] is True and top["match"] is True
        status, refused = client.request("POST", "/v1/models/reid:search", {
            "entry_ids": ["nobody"]})
        assert status == 400 and refused["field"] == "entry_ids[0]"
        status, refused = client.request("POST", "/v1/models/reid:add", {"entries": [
            {"id": "x", "b64": testing.b64_png(images[0]), "thumbnail": "abc"}]})
        assert status == 400 and refused["field"] == "entries[0].thumbnail"
        status, refused = client.request("GET", "/v1/models/reid/gallery/entries?limit=-1")
        assert status == 400 and refused["field"] == "limit"
        # Removing an entry removes its thumbnail.
        client.request("POST", "/v1/models/reid:remove", {"ids": ["cam1/img1"]})
        status, _ = client.request("GET", "/v1/models/reid/gallery/thumbnails/cam1%2Fimg1")
        assert status == 404
    import sqlite3

    with sqlite3.connect(database) as db:
        assert db.execute("SELECT COUNT(*) FROM thumbnails").fetchone()[0] == 2
        orphans = db.execute("SELECT COUNT(*) FROM thumbnails t LEFT JOIN entries e "
                             "ON e.row = t.row WHERE e.row IS NULL").fetchone()[0]
        assert orphans == 0


def test_the_model_card_summarises_the_calibration(trained):
    card = json.load(open(os.path.join(trained["export"], "model_card.json")))
    fitted = calibration.load(os.path.join(trained["export"], "assets", "calibration.json"))
    assert card["calibration"]["file"] == os.path.join("assets", "calibration.json")
    assert card["calibration"]["open_set"] == fitted["open_set"]
    assert card["calibration"]["measured_on"]["split"] == "validation identities"
