import collections

import numpy as np
import pytest

from reid_tf.evaluate import metrics as metrics_lib


def reference_evaluate(distances, q_ids, g_ids, q_cams, g_cams, max_rank):
    """torchreid's eval_market1501 logic, written plainly, one query at a time."""
    cmc_all, aps, inps = [], [], []
    for q in range(len(q_ids)):
        order = np.argsort(distances[q], kind="stable")
        remove = (g_ids[order] == q_ids[q]) & (g_cams[order] == q_cams[q])
        matches = (g_ids[order] == q_ids[q])[~remove].astype(int)
        if not matches.any():
            continue
        cmc = matches.cumsum()
        cmc[cmc > 1] = 1
        cmc = np.pad(cmc, (0, max(0, max_rank - len(cmc))), mode="edge")
        cmc_all.append(cmc[:max_rank])
        positions = np.flatnonzero(matches)
        inps.append(matches.sum() / (positions.max() + 1))
        precisions = [(i + 1) / (p + 1) for i, p in enumerate(positions)]
        aps.append(np.mean(precisions))
    return np.mean(cmc_all, axis=0), np.mean(aps), np.mean(inps), len(aps)


def test_hand_worked_case_same_camera_removal_distractor_and_skipped_query():
    # Gallery: 0 (id 1 cam 1), 1 (id 1 cam 2), 2 (id 2 cam 2), 3 (distractor id 0 cam 3)
    g_ids, g_cams = np.array([1, 1, 2, 0]), np.array([1, 2, 2, 3])
    q_ids, q_cams = np.array([1, 2, 3]), np.array([1, 2, 1])
    distances = np.array([
        [0.1, 0.5, 0.3, 0.2],  # query id1 cam1: gallery 0 removed (same id+cam); ranks 3,2,1
        [0.9, 0.1, 0.2, 0.3],  # query id2 cam2: gallery 2 removed -> no true match: skipped
        [0.5, 0.4, 0.3, 0.2],  # query id3: no such id in gallery: skipped
    ])
    result = metrics_lib.evaluate(distances, q_ids, g_ids, q_cams, g_cams, max_rank=5)
    # Query 1 after removal: order 3 (0.2, id 0), 2 (0.3, id 2), 1 (0.5, id 1): match at rank 3.
    np.testing.assert_allclose(result["cmc"], [0, 0, 1, 1, 1])  # gallery smaller than max_rank
    assert result["mAP"] == pytest.approx(1 / 3)
    assert result["mINP"] == pytest.approx(1 / 3)
    assert (result["num_valid"], result["num_skipped"]) == (1, 2)


def test_ties_are_broken_by_gallery_order():
    distances = np.array([[0.5, 0.5, 0.5]])
    result = metrics_lib.evaluate(distances, np.array([7]), np.array([3, 7, 7]), np.array([1]),
                                 np.array([2, 2, 2]), max_rank=3)
    np.testing.assert_allclose(result["cmc"], [0, 1, 1])
    assert result["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert result["mINP"] == pytest.approx(2 / 3)


def test_matches_reference_on_random_data():
    rng = np.random.default_rng(0)
    q_ids, g_ids = rng.integers(0, 30, 200), rng.integers(0, 30, 900)
    q_cams, g_cams = rng.integers(1, 4, 200), rng.integers(1, 4, 900)
    distances = rng.random((200, 900)).astype(np.float32)
    distances[:, ::7] = 0.5  # ties
    result = metrics_lib.evaluate(distances, q_ids, g_ids, q_cams, g_cams, max_rank=50,
                                 chunk_size=37)
    cmc, mean_ap, minp, valid = reference_evaluate(distances, q_ids, g_ids, q_cams, g_cams, 50)
    np.testing.assert_allclose(result["cmc"], cmc, rtol=1e-12)
    assert result["mAP"] == pytest.approx(mean_ap, rel=1e-12)
    assert result["mINP"] == pytest.approx(minp, rel=1e-12)
    assert result["num_valid"] == valid and result["num_skipped"] == 200 - valid


@pytest.mark.parametrize("metric", metrics_lib.METRICS)
def test_distances_match_scipy(metric):
    from scipy.spatial import distance

    rng = np.random.default_rng(1)
    query, gallery = rng.normal(size=(13, 8)), rng.normal(size=(29, 8))
    got = metrics_lib.pairwise_distances(query, gallery, metric, chunk_size=5)
    np.testing.assert_allclose(got, distance.cdist(query, gallery, metric), atol=1e-5)


def test_bad_input_names_what_is_wrong():
    good = dict(query_ids=np.array([1]), gallery_ids=np.array([1, 2]),
                query_cameras=np.array([1]), gallery_cameras=np.array([2, 2]))
    with pytest.raises(ValueError, match=r"gallery_ids: expected 2 entries"):
        metrics_lib.evaluate(np.zeros((1, 2)), **{**good, "gallery_ids": np.array([1])})
    with pytest.raises(ValueError, match=r"gallery is empty"):
        metrics_lib.evaluate(np.zeros((1, 0)), **{**good, "gallery_ids": np.array([]),
                                                 "gallery_cameras": np.array([])})
    with pytest.raises(ValueError, match=r"distances hold NaN"):
        metrics_lib.evaluate(np.array([[np.nan, 0.0]]), **good)
    with pytest.raises(ValueError, match=r"metric='manhattan'"):
        metrics_lib.pairwise_distances(np.zeros((1, 2)), np.zeros((1, 2)), "manhattan")
    with pytest.raises(ValueError, match=r"query features: 1 row\(s\) hold NaN"):
        metrics_lib.pairwise_distances(np.array([[np.inf, 0.0]]), np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"dimension 2 but gallery features 3"):
        metrics_lib.pairwise_distances(np.zeros((1, 2)), np.zeros((1, 3)))


def test_trapezoid_average_precision_by_hand():
    # Kept order: match, non-match, match -> precisions 1, 1/2, 2/3 at ranks 1, 2, 3.
    distances = np.array([[0.1, 0.2, 0.3]])
    result = metrics_lib.evaluate(distances, np.array([1]), np.array([1, 2, 1]), np.array([1]),
                                 np.array([2, 2, 2]), max_rank=3, average_precision="trapezoid")
    # Official code: 0.5 * (1 + 1) / 2 + 0.5 * (1/2 + 2/3) / 2
    assert result["mAP"] == pytest.approx(0.5 + 0.5 * (0.5 + 2 / 3) / 2)


def test_features_path_equals_matrix_path_with_bounded_chunks():
    rng = np.random.default_rng(3)
    query, gallery = rng.normal(size=(50, 16)), rng.normal(size=(300, 16))
    ids = dict(query_ids=rng.integers(0, 20, 50), gallery_ids=rng.integers(0, 20, 300),
               query_cameras=rng.integers(1, 3, 50), gallery_cameras=rng.integers(1, 3, 300))
    from_matrix = metrics_lib.evaluate(metrics_lib.pairwise_distances(query, gallery), **ids)
    from_features = metrics_lib.evaluate_features(query, gallery, **ids, chunk_size=7)
    np.testing.assert_allclose(from_features["cmc"], from_matrix["cmc"])
    assert from_features["mAP"] == pytest.approx(from_matrix["mAP"])


def test_single_gallery_shot_cmc():
    # Query id 1 cam 1. Gallery: id 2 (0.1), id 1 cam 2 (0.2), id 1 cam 2 (0.05), id 3 (0.3).
    distances = np.array([[0.1, 0.2, 0.05, 0.3]])
    args = (np.array([1]), np.array([2, 1, 1, 3]), np.array([1]), np.array([2, 2, 2, 2]))
    result = metrics_lib.evaluate_single_gallery_shot(distances, *args, max_rank=3, repeats=200)
    # The sampled id-1 image is 0.05 (rank 1) or 0.2 (rank 2, behind id 2): rank-1 about 1/2.
    assert 0.4 < result["cmc"][0] < 0.6 and result["cmc"][1] == pytest.approx(1.0)
    assert result["mAP"] == metrics_lib.evaluate(distances, *args, max_rank=3)["mAP"]


def test_mean_over_splits():
    results = [{"cmc": np.array([0.5, 1.0]), "mAP": 0.4, "mINP": 0.2, "num_valid": 3,
                "num_skipped": 0},
               {"cmc": np.array([1.0, 1.0]), "mAP": 0.8, "mINP": 0.6, "num_valid": 3,
                "num_skipped": 1}]
    mean = metrics_lib.mean_over_splits(results)
    assert mean["rank1"] == 0.75 and mean["mAP"] == pytest.approx(0.6)
    assert mean["num_splits"] == 2 and mean["num_skipped"] == 1


def classic_case(num_ids=100, closer=None):
    """Queries: identity i on camera 1. Gallery: identity i on camera 2 (the true match, at
    distance 0.5 from query i) and on camera 1 (same camera, distance 0: never a match). Query
    i has `closer[i]` other identities' camera-2 images nearer than its true match."""
    closer = np.zeros(num_ids, int) if closer is None else np.asarray(closer)
    ids = np.arange(num_ids)
    gallery_ids = np.concatenate([ids, ids])
    gallery_cameras = np.concatenate([np.full(num_ids, 2), np.full(num_ids, 1)])
    distances = np.ones((num_ids, 2 * num_ids), np.float32)
    distances[ids, ids] = 0.5
    distances[ids, num_ids + ids] = 0.0  # same camera as the query: left out
    for i in ids:
        distances[i, [(i + 1 + k) % num_ids for k in range(closer[i])]] = 0.25
    return distances, ids, gallery_ids, np.ones(num_ids, int), gallery_cameras


def test_classic_protocol_ranks_each_probe_among_one_image_per_identity():
    # 100 identities, all drawn in every trial: query i's true match is at rank closer[i] + 1.
    closer = np.arange(100) % 4  # ranks 1, 2, 3, 4 in equal shares
    result = metrics_lib.evaluate_classic(*classic_case(100, closer), identities=100, trials=3)
    np.testing.assert_allclose(result["cmc"][:5], [0.25, 0.5, 0.75, 1.0, 1.0])
    assert result["rank1"] == 0.25 and result["classic"] == {"identities": 100, "trials": 3,
                                                              "seed": 0}
    # mAP is the standard protocol's (the same-camera image is left out there too).
    standard = metrics_lib.evaluate(*classic_case(100, closer))
    assert result["mAP"] == standard["mAP"]
    # 100 of 300 identities per trial: a probe keeps only the nearer identities that were drawn.
    one_nearer = metrics_lib.evaluate_classic(*classic_case(300, np.ones(300, int)), trials=20)
    assert 0.6 < one_nearer["rank1"] < 0.73  # each of the 99 others drawn: 99/299 = 0.33
    assert one_nearer["cmc"][1] == 1.0
    again = metrics_lib.evaluate_classic(*classic_case(300, np.ones(300, int)), trials=20)
    np.testing.assert_array_equal(again["cmc"], one_nearer["cmc"])  # seeded
    with pytest.raises(ValueError, match="only 50 have a query and a gallery image"):
        metrics_lib.evaluate_classic(*classic_case(50))


def test_reid_eval_scoring_takes_the_classic_protocol_and_records_it():
    from reid_tf.evaluate import evaluator

    _, q_ids, g_ids, q_cams, g_cams = classic_case(100)
    split = collections.namedtuple("Split", "person_ids camera_ids")
    query, gallery = split(q_ids, q_cams), split(g_ids, g_cams)
    rng = np.random.default_rng(0)
    query_features = rng.normal(size=(100, 8)).astype(np.float32)
    gallery_features = np.concatenate([  # camera 2: each query's identity, noisy; camera 1: any
        query_features + rng.normal(scale=0.6, size=(100, 8)),
        rng.normal(size=(100, 8))]).astype(np.float32)
    scoring = evaluator.Scoring(metric="euclidean", classic_identities=100, classic_trials=2)
    metrics, _ = evaluator.score(query_features, gallery_features, query, gallery, scoring)
    expected = metrics_lib.evaluate_classic(
        metrics_lib.pairwise_distances(query_features, gallery_features, "euclidean"),
        q_ids, g_ids, q_cams, g_cams, trials=2)
    np.testing.assert_array_equal(metrics["cmc"], expected["cmc"])
    assert 0 < metrics["rank1"] < 1 and metrics["cmc"][-1] > metrics["rank1"]
    record = evaluator.results_record(metrics, dataset="made up")
    assert record["classic_protocol"] == {"identities": 100, "trials": 2, "seed": 0}
    both = evaluator.Scoring(single_gallery_shot=True, classic_identities=100)
    with pytest.raises(ValueError, match="two protocols"):
        evaluator.score(query_features, gallery_features, query, gallery, both)
