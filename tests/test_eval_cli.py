"""reid-eval on a tiny trained workdir (subprocesses)."""

import json
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from reid_tf import testing
from reid_tf.data import pipeline
from reid_tf.data import splits as splits_lib
from reid_tf.evaluate import calibration
from reid_tf.evaluate import metrics as metrics_lib
from reid_tf.evaluate import visualize
from reid_tf.evaluate import reranking
from reid_tf.train import workdir as workdir_lib

pytestmark = pytest.mark.slow  # every test here trains, serves or runs a tool

TRAIN_FLAGS = ["--dataset=synthetic_persons/small", "--backbone=tiny", "--image_height=64",
               "--image_width=32", "--embedding_dim=16", "--num_parts=3", "--identities_per_batch=4", "--images_per_identity=4",
               "--optimizer=adam", "--learning_rate=0.001", "--train_steps=20",
               "--log_every=10", "--checkpoint_every=10", "--image_summary_every=0"]


run = testing.run_module  # python -m <module> <flags>, checked


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    splits_lib.load_splits("synthetic_persons/small", data_dir=data_dir)
    workdir = str(tmp_path_factory.mktemp("run"))
    run("reid_tf.cli.train", f"--workdir={workdir}", f"--data_dir={data_dir}", *TRAIN_FLAGS)
    return workdir, data_dir


def test_reid_eval_reproduces_the_training_evaluation(trained):
    workdir, data_dir = trained
    logged = json.load(open(os.path.join(workdir, "results.json")))
    result = run("reid_tf.cli.eval", f"--workdir={workdir}", f"--data_dir={data_dir}",
                 "--plot_ranked=3")
    assert "| rank-1 | rank-5 | rank-10 | rank-20 | mAP | mINP |" in result.stdout
    evaluated = json.load(open(os.path.join(workdir, "eval", "results.json")))
    assert evaluated["rank1"] == pytest.approx(logged["rank1"], abs=1e-9)
    assert evaluated["mAP"] == pytest.approx(logged["mAP"], abs=1e-6)
    pictures = sorted(os.listdir(os.path.join(workdir, "eval", "ranked")))
    assert len(pictures) == 3
    picture = np.asarray(Image.open(os.path.join(workdir, "eval", "ranked", pictures[0])))
    corner = picture[1, 76 + 6 + 1]  # border of the first gallery image (after the query cell)
    assert tuple(corner) in set(visualize.MATCH_COLOURS.values())
    assert os.listdir(os.path.join(workdir, "eval", "tensorboard"))


def test_reid_eval_calibrates_scores_the_open_set_and_colours_the_decisions(trained, tmp_path):
    workdir, data_dir = trained
    # Thresholds from a labelled dataset (here the test split itself: the mechanics only).
    result = run("reid_tf.cli.eval", f"--workdir={workdir}", f"--data_dir={data_dir}",
                 "--calibrate", "--calibration_data=synthetic_persons/small", "--open_set",
                 "--fars=0.2,0.05", "--plot_ranked=4", f"--output_dir={tmp_path}")
    assert "| FAR | pair threshold | TAR | search threshold | DIR |" in result.stdout
    assert "| FAR asked | DIR | FAR measured |" in result.stdout
    fitted = calibration.load(os.path.join(tmp_path, "calibration.json"))
    model, _ = workdir_lib.load_trained_model(workdir, log=lambda line: None)
    splits = splits_lib.load_splits("synthetic_persons/small", data_dir=data_dir)
    query, gallery = by_hand(lambda x: model(x, training=False)["embedding"], splits, False)
    expected = calibration.fit(query, splits["query"], gallery, splits["gallery"], (0.2, 0.05))
    for kind in ("verification", "open_set"):
        for got, want in zip(fitted[kind], expected[kind]):
            assert got["far"] == want["far"]
            assert got["threshold"] == pytest.approx(want["threshold"], abs=1e-5)
    report = json.load(open(os.path.join(tmp_path, "results.json")))["open_set"]
    want = calibration.evaluate_open_set(query, splits["query"], gallery, splits["gallery"],
                                         fitted)
    assert report["unknown_identities"] == want["unknown_identities"] > 0
    assert [p["dir"] for p in report["points"]] == pytest.approx(
        [p["dir"] for p in want["points"]], abs=0.02)  # a near-tie may move with float noise
    # Ranked lists: FAR 0.01 (the decisions' colours) is not fitted here, so the borders are
    # the truth, in the same two colours.
    picture = np.asarray(Image.open(sorted(
        os.path.join(tmp_path, "ranked", n) for n in os.listdir(os.path.join(tmp_path, "ranked")))[0]))
    assert tuple(picture[1, 76 + 6 + 1]) in set(visualize.MATCH_COLOURS.values())
    # Without thresholds, --open_set is refused with one line.
    refused = run("reid_tf.cli.eval", f"--workdir={workdir}", f"--data_dir={data_dir}",
                  "--open_set", f"--output_dir={tmp_path}", check=False)
    assert refused.returncode == 1 and "--open_set needs thresholds" in refused.stderr
    refused = run("reid_tf.cli.eval", f"--workdir={workdir}", f"--data_dir={data_dir}",
                  "--calibrate", f"--output_dir={tmp_path}", check=False)
    assert refused.returncode == 1 and "held none out" in refused.stderr


def test_ranked_list_borders_are_the_decisions_at_a_threshold():
    import io
    import types

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 4, 3), np.uint8)).save(buffer, format="PNG")
    split = types.SimpleNamespace(
        person_ids=np.array([0, 1, 0, 2]), camera_ids=np.array([0, 1, 1, 1]),
        images=[buffer.getvalue()] * 4, are_paths=False, file_names=np.array(["a", "b", "c", "d"]))
    query = types.SimpleNamespace(person_ids=np.array([0]), camera_ids=np.array([0]),
                                  images=split.images, are_paths=False, file_names=np.array(["q"]))
    distances = np.array([0.0, 0.3, 0.1, 0.6])  # gallery 0 is the query's camera: left out
    picture = visualize.ranked_list_picture(distances, query, 0, split, top=3, size=(8, 4),
                                            threshold=0.35)
    cell = 4 + 2 * 4
    borders = [tuple(picture[1, slot * cell + 6 + 1]) for slot in (1, 2, 3)]
    # Nearest first: c (0.1, accepted), b (0.3, accepted though another person), d (rejected).
    assert borders == [visualize.MATCH_COLOURS["match"], visualize.MATCH_COLOURS["match"],
                       visualize.MATCH_COLOURS["no_match"]]


@pytest.mark.parametrize("descriptor", ["global_embedding", "part_embeddings"])
def test_reid_eval_descriptor_reproduces_the_training_row(trained, tmp_path, descriptor):
    workdir, data_dir = trained
    logged = json.load(open(os.path.join(workdir, "results.json")))["descriptors"]
    result = run("reid_tf.cli.eval", f"--workdir={workdir}", f"--data_dir={data_dir}",
                 f"--descriptor={descriptor}", f"--output_dir={tmp_path}")
    evaluated = json.load(open(os.path.join(tmp_path, "results.json")))
    assert evaluated["descriptor"] == descriptor and f"descriptor={descriptor}" in result.stdout
    assert evaluated["mAP"] == pytest.approx(logged[descriptor]["mAP"], abs=1e-6)
    assert evaluated["rank1"] == pytest.approx(logged[descriptor]["rank1"], abs=1e-9)
    # A different descriptor ranks differently: the flag is not ignored.
    assert evaluated["mAP"] != pytest.approx(logged["embedding"]["mAP"], abs=1e-9)


def by_hand(embed, splits, flip):
    """Features of query and gallery computed here, with the flip TTA written out again."""
    out = []
    for name in ("query", "gallery"):
        rows = []
        for batch in pipeline.eval_dataset(splits[name], (64, 32), 16):
            features = embed(batch["image"]).numpy()
            if flip:
                mirrored = embed(batch["image"].numpy()[:, :, ::-1, :]).numpy()
                features = features + mirrored
                features /= np.linalg.norm(features, axis=1, keepdims=True)
            rows.append(features)
        out.append(np.concatenate(rows))
    return out


def expected_metrics(distances, splits):
    q, g = splits["query"], splits["gallery"]
    return metrics_lib.evaluate(distances, q.person_ids, g.person_ids, q.camera_ids, g.camera_ids)


def assert_same_metrics(evaluated, expected):
    assert evaluated["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert evaluated["mINP"] == pytest.approx(expected["mINP"], abs=1e-6)
    np.testing.assert_allclose(evaluated["cmc"][:20], expected["cmc"][:20], atol=1e-9)


def test_reid_eval_flip_equals_a_hand_computed_flipped_forward(trained, tmp_path):
    workdir, data_dir = trained
    run("reid_tf.cli.eval", f"--workdir={workdir}", f"--data_dir={data_dir}", "--flip",
        f"--output_dir={tmp_path}")
    evaluated = json.load(open(os.path.join(tmp_path, "results.json")))
    model, _ = workdir_lib.load_trained_model(workdir, log=lambda line: None)
    splits = splits_lib.load_splits("synthetic_persons/small", data_dir=data_dir)
    query, gallery = by_hand(lambda x: model(x, training=False)["embedding"], splits, True)
    expected = expected_metrics(metrics_lib.pairwise_distances(query, gallery), splits)
    assert_same_metrics(evaluated, expected)
    plain = expected_metrics(metrics_lib.pairwise_distances(
        *by_hand(lambda x: model(x, training=False)["embedding"], splits, False)), splits)
    assert plain["mAP"] != pytest.approx(expected["mAP"], abs=1e-9)  # flip changed something


@pytest.mark.parametrize("streamed", [False, True])
def test_reid_eval_on_the_export_with_flip_and_rerank(trained, tmp_path, streamed):
    workdir, data_dir = trained
    export = os.path.join(workdir, "export", "20")
    extra = ["--rerank_dense_max_gallery=0"] if streamed else []  # from the features
    result = run("reid_tf.cli.eval", f"--export={export}", "--dataset=synthetic_persons/small",
                 f"--data_dir={data_dir}", "--flip", "--rerank", f"--output_dir={tmp_path}",
                 *extra)
    evaluated = json.load(open(os.path.join(tmp_path, "results.json")))
    assert evaluated["flip"] and evaluated["rerank"] and "rerank=True" in result.stdout
    assert ("from the features, chunk by chunk" in result.stdout) == streamed
    # The same figures from the export's signature, the flip and re-ranking done here.
    serving = tf.saved_model.load(export).signatures["serving_default"]
    splits = splits_lib.load_splits("synthetic_persons/small", data_dir=data_dir)
    query, gallery = by_hand(
        lambda x: serving(images=tf.cast(tf.round(x), tf.uint8))["embedding"], splits, True)
    distances = reranking.re_rank(metrics_lib.pairwise_distances(query, gallery),
                                  metrics_lib.pairwise_distances(query, query),
                                  metrics_lib.pairwise_distances(gallery, gallery), 20, 6, 0.3)
    assert_same_metrics(evaluated, expected_metrics(distances, splits))


def test_reid_eval_bad_input_is_one_line(tmp_path):
    result = run("reid_tf.cli.eval", f"--workdir={tmp_path}", check=False)
    assert result.returncode == 1
    assert "reid-eval: error:" in result.stderr and "model.json: not found" in result.stderr
    result = run("reid_tf.cli.eval", f"--workdir={tmp_path}", f"--export={tmp_path}", check=False)
    assert "give exactly one of --workdir or --export" in result.stderr


def test_reid_eval_refuses_a_rerank_k2_beyond_k1_in_one_line_before_extracting(tmp_path):
    result = run("reid_tf.cli.eval", f"--export={tmp_path}", "--dataset=x", "--rerank",
                 "--k1=3", "--k2=8", check=False)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "reid-eval: error:" in line]
    assert len(errors) == 1 and "k2=8 with k1=3" in errors[0] and "--k2" in errors[0]
