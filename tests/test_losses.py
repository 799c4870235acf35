import numpy as np
import pytest
import tensorflow as tf

from reid_tf.model import losses


def numpy_cross_entropy(labels, logits, eps=0.0):
    logits = logits - logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    n = logits.shape[-1]
    targets = np.eye(n)[labels] * (1 - eps) + eps / n
    return -(targets * log_probs).sum(-1)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_identity_loss_matches_numpy(eps):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 6)).astype(np.float32)
    labels = np.array([0, 5, 2, 2])
    got = losses.identity_loss(tf.constant(labels), tf.constant(logits), eps)
    np.testing.assert_allclose(got, numpy_cross_entropy(labels, logits, eps), rtol=1e-5)


def test_plnet_loss_is_global_plus_weighted_mean_of_parts():
    rng = np.random.default_rng(1)
    outputs = {"global_logits": tf.constant(rng.normal(size=(3, 4)), tf.float32),
               "part_logits": tf.constant(rng.normal(size=(3, 2, 4)), tf.float32)}
    labels = np.array([1, 0, 3])
    terms = losses.plnet_loss(tf.constant(labels), outputs, part_loss_weight=0.5,
                              label_smoothing=0.1)
    per_part = np.stack([numpy_cross_entropy(labels, outputs["part_logits"].numpy()[:, k], 0.1)
                         for k in range(2)], axis=1)
    global_loss = numpy_cross_entropy(labels, outputs["global_logits"].numpy(), 0.1)
    np.testing.assert_allclose(terms["part_losses"], per_part, rtol=1e-5)
    np.testing.assert_allclose(terms["part_loss"], per_part.mean(1), rtol=1e-5)
    np.testing.assert_allclose(terms["loss"], global_loss + 0.5 * per_part.mean(1), rtol=1e-5)
    assert terms["loss"].shape == (3,)  # per example, for compute_average_loss


def test_part_loss_is_zero_without_parts():
    got = losses.part_loss(tf.constant([0, 1]), tf.zeros([2, 0, 3]))
    np.testing.assert_array_equal(got, [0.0, 0.0])
