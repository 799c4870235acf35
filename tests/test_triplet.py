"""The batch-hard triplet loss: against numpy, its zero, its gradient, and global-batch mining
under MirroredStrategy."""

import numpy as np
import pytest
import tensorflow as tf

from reid_tf import model as model_lib
from reid_tf import testing
from reid_tf.model import losses
from reid_tf.train import distribute

TINY = dict(num_classes=5, backbone="tiny", image_size=(64, 32), embedding_dim=16)
LABELS = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])


def numpy_batch_hard(labels, embeddings, margin, reference_labels=None, references=None):
    """Hermans et al.'s batch-hard loss, one anchor at a time, in float64."""
    if reference_labels is None:
        reference_labels, references = labels, embeddings
    values = []
    for label, anchor in zip(labels, embeddings.astype(np.float64)):
        distances = np.sqrt(((references.astype(np.float64) - anchor) ** 2).sum(-1))
        positive = distances[reference_labels == label].max()
        negative = distances[reference_labels != label].min()
        gap = positive - negative
        values.append(np.log1p(np.exp(gap)) if margin == 0 else max(0.0, gap + margin))
    return np.array(values)


@pytest.mark.parametrize("margin", [0.3, 1.0, 0.0])
def test_batch_hard_equals_a_direct_numpy_computation(margin):
    embeddings = np.random.default_rng(1).normal(size=(12, 6)).astype(np.float32)
    got = losses.batch_hard_triplet_loss(tf.constant(LABELS), tf.constant(embeddings), margin)
    expected = numpy_batch_hard(LABELS, embeddings, margin)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected > 0).sum() >= 6  # the hinge is active on these random points


def test_normalised_mining_equals_numpy_on_unit_vectors_and_differs_from_raw():
    # Rows of very different lengths: raw mining is dominated by the norms, cosine is not.
    rng = np.random.default_rng(2)
    embeddings = (rng.normal(size=(12, 6)) * rng.uniform(0.2, 5.0, size=(12, 1))).astype(
        np.float32)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    got = losses.batch_hard_triplet_loss(tf.constant(LABELS), tf.constant(embeddings), 0.3,
                                         normalize=True)
    np.testing.assert_allclose(got, numpy_batch_hard(LABELS, unit, 0.3), rtol=1e-5, atol=1e-5)
    raw = numpy_batch_hard(LABELS, embeddings, 0.3)
    assert np.abs(raw - got.numpy()).max() > 0.5
    # Through plnet_loss: the option reaches the loss (scale-free: x10 changes nothing).
    outputs = {"global_logits": tf.zeros((12, 4)), "part_logits": tf.zeros((12, 0, 4)),
               "global_features": tf.constant(embeddings),
               "part_features": tf.zeros((12, 0, 6))}
    scaled = dict(outputs, global_features=tf.constant(10 * embeddings))
    terms = [losses.plnet_loss(tf.constant(LABELS), o, triplet_weight=1.0,
                               triplet_normalize=True)["triplet_loss"] for o in (outputs, scaled)]
    np.testing.assert_allclose(terms[0], got, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(terms[1], got, rtol=1e-4, atol=1e-5)


def test_batch_hard_mines_in_the_references_and_per_part():
    rng = np.random.default_rng(2)
    references = rng.normal(size=(12, 3, 6)).astype(np.float32)
    anchors, anchor_labels = references[3:9], LABELS[3:9]
    got = losses.batch_hard_triplet_loss(tf.constant(anchor_labels), tf.constant(anchors), 0.3,
                                         tf.constant(LABELS), tf.constant(references))
    assert got.shape == (6, 3)
    for k in range(3):  # part k of each anchor is mined against part k of the references
        np.testing.assert_allclose(
            got[:, k], numpy_batch_hard(anchor_labels, anchors[:, k], 0.3, LABELS,
                                        references[:, k]), rtol=1e-5, atol=1e-5)


def test_zero_when_every_negative_is_farther_than_every_positive_by_the_margin():
    # Each identity's points lie within 0.2 of each other (hardest positive <= 0.2); identities
    # sit 1.0 apart, so the nearest negative is >= 0.8 away: d_ap - d_an + 0.3 <= -0.3.
    centres = np.eye(4, 6) / np.sqrt(2.0)
    offsets = np.random.default_rng(3).uniform(-0.04, 0.04, size=(12, 6))
    embeddings = (centres[LABELS] + offsets).astype(np.float32)
    loss = losses.batch_hard_triplet_loss(tf.constant(LABELS), tf.constant(embeddings), 0.3)
    np.testing.assert_array_equal(loss, 0.0)
    # With a margin wider than the gap it is positive for every anchor: the zero is the margin's.
    wide = losses.batch_hard_triplet_loss(tf.constant(LABELS), tf.constant(embeddings), 1.0)
    assert float(tf.reduce_min(wide)) > 0
    # An anchor alone with its own identity has no negative and scores 0, not inf or NaN.
    alone = losses.batch_hard_triplet_loss(tf.constant([1, 1]), tf.constant(embeddings[:2]), 0.3)
    np.testing.assert_array_equal(alone, 0.0)


def test_triplet_gradients_reach_the_backbone_from_the_features_before_batch_norm():
    net = model_lib.PartLossNet(num_parts=3, **TINY)
    x = tf.random.stateless_uniform([8, 64, 32, 3], [0, 1], 0, 255)
    labels = tf.constant([0, 0, 1, 1, 2, 2, 3, 3])
    for part_triplet, name in [(False, "triplet_loss"), (True, "part_triplet_loss")]:
        with tf.GradientTape() as tape:
            outputs = net(x, training=True)
            terms = losses.plnet_loss(labels, outputs, triplet_weight=1.0,
                                      part_triplet=part_triplet)
            loss = tf.reduce_mean(terms[name])
        assert float(loss) > 0
        head = net.part_head if part_triplet else net.global_head
        classifiers = head.classifier.trainable_variables + head.batch_norm.trainable_variables
        backbone, after_neck = tape.gradient(
            loss, [net.backbone.trainable_variables, classifiers])
        assert len(backbone) > 10 and all(g is not None for g in backbone)
        assert max(float(tf.reduce_max(tf.abs(g))) for g in backbone) > 0
        # Before the BNNeck: neither its BatchNorm nor the classifier gets a triplet gradient.
        assert len(after_neck) == 3 and all(g is None for g in after_neck)


def test_triplet_weight_zero_is_todays_loss_exactly():
    net = model_lib.PartLossNet(num_parts=3, **TINY)
    outputs = net(tf.random.stateless_uniform([4, 64, 32, 3], [0, 2], 0, 255), training=True)
    labels = tf.constant([0, 0, 1, 1])
    off = losses.plnet_loss(labels, outputs, 0.7, 0.1, triplet_weight=0.0, part_triplet=True)
    assert set(off) == {"loss", "global_loss", "part_loss", "part_losses"}
    np.testing.assert_array_equal(off["loss"], off["global_loss"] + 0.7 * off["part_loss"])
    on = losses.plnet_loss(labels, outputs, 0.7, 0.1, triplet_weight=2.0, part_triplet=True)
    np.testing.assert_allclose(
        on["loss"], off["loss"] + 2.0 * (on["triplet_loss"] + on["part_triplet_loss"]),
        rtol=1e-6)


def _train_three_steps(strategy, initial_weights, batches):
    weights, history = testing.train_steps(
        strategy, initial_weights, batches, sync_batch_norm=True, triplet_weight=1.0,
        triplet_margin=0.3, part_triplet=True)
    return weights, [{k: float(m[k]) for k in ("loss", "triplet_loss", "part_triplet_loss")}
                     for m in history]


@pytest.mark.slow  # trains, or runs a tool in a process
def test_two_replicas_mine_over_the_global_batch_as_one_device_does():
    """Replica 0 holds identities 0-1, replica 1 identities 2-3: mined per replica, each anchor
    would find its hardest negative among 2 identities, not 3. Mined over the global batch (the
    choice), the losses and the weights after 3 SGD steps equal one device's."""
    reference = model_lib.PartLossNet(num_parts=3, **TINY)
    reference.build()
    initial = reference.get_weights()
    labels = tf.constant([0, 0, 1, 1, 2, 2, 3, 3])
    batches = [{"image": tf.random.stateless_uniform([8, 64, 32, 3], [s, 1], 0, 255),
                "label": labels} for s in range(3)]
    single_weights, single = _train_three_steps(tf.distribute.get_strategy(), initial, batches)
    mirrored = distribute.make_strategy("mirrored")
    assert mirrored.num_replicas_in_sync == 2
    weights, replicated = _train_three_steps(mirrored, initial, batches)
    assert all(m["triplet_loss"] > 0 and m["part_triplet_loss"] > 0 for m in single), single
    for got, expected in zip(replicated, single):
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, err_msg=name)
    for got, expected in zip(weights, single_weights):
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)
    # The check can tell the two choices apart: per-replica mining gives another loss here.
    outputs = reference(batches[0]["image"], training=True)
    features = outputs["global_features"]
    global_batch = losses.batch_hard_triplet_loss(labels, features)
    per_replica = tf.concat([losses.batch_hard_triplet_loss(labels[:4], features[:4]),
                             losses.batch_hard_triplet_loss(labels[4:], features[4:])], 0)
    assert float(tf.reduce_max(tf.abs(global_batch - per_replica))) > 1e-3



@pytest.mark.slow  # trains, or runs a tool in a process
def test_a_new_loss_plugs_into_the_step_and_its_terms_become_metrics():
    """Issue 40: the step no longer hard-codes PL-Net's keys: a loss returns named per-example
    terms, each reported under its name; the default is plnet_loss."""
    rng = np.random.default_rng(0)
    batch = {"image": tf.constant(rng.uniform(0, 255, (8, 64, 32, 3)), tf.float32),
             "label": tf.constant([0, 0, 1, 1, 2, 2, 3, 3])}
    initial = model_lib.PartLossNet(num_parts=3, **TINY)
    initial.build()
    weights = initial.get_weights()
    strategy = tf.distribute.get_strategy()

    def global_only(labels, outputs, gather):
        loss = losses.identity_loss(labels, outputs["global_logits"])
        return {"loss": loss, "loss_twice": 2.0 * loss}

    _, (plugged,) = testing.train_steps(strategy, weights, [batch], loss_fn=global_only)
    assert set(plugged) >= {"loss", "loss_twice", "global_accuracy", "part_accuracies",
                            "part_fallback", "skipped_steps"}
    assert "part_loss" not in plugged
    assert plugged["loss_twice"] == pytest.approx(2 * plugged["loss"], rel=1e-6)
    _, (default,) = testing.train_steps(strategy, weights, [batch])
    assert {"global_loss", "part_loss", "part_losses"} <= set(default)
    assert default["global_loss"] == pytest.approx(plugged["loss"], rel=1e-5)  # same weights
