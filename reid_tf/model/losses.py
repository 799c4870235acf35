"""PL-Net's training objective, per example: global identity loss + lambda * part loss, plus
optionally w * the batch-hard triplet loss (Hermans et al. 2017) on the embeddings before the
BNNeck BatchNorm, globally and optionally per part (Bag of Tricks, Luo et al. 2019).

Every function returns per-example values, so a distribution strategy reduces them with
`tf.nn.compute_average_loss(..., global_batch_size=...)`.
"""

import tensorflow as tf

from reid_tf.model import learned_parts


def identity_loss(labels, logits, label_smoothing=0.0):
    """Softmax cross-entropy with optional label smoothing.

    Args:
        labels: int `[...]`, identities in 0..N-1.
        logits: `[..., N]`.
        label_smoothing: epsilon; the target is (1 - eps) one-hot + eps / N.

    Returns:
        float32 `[...]`.
    """
    logits = tf.cast(logits, tf.float32)
    num_classes = tf.shape(logits)[-1]
    targets = tf.one_hot(labels, num_classes, dtype=tf.float32)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / tf.cast(num_classes,
                                                                               tf.float32)
    return -tf.reduce_sum(targets * tf.nn.log_softmax(logits, axis=-1), axis=-1)


def part_losses(labels, part_logits, label_smoothing=0.0):
    """Each part's identity loss: labels `[B]`, part_logits `[B,K,N]` -> `[B,K]`."""
    num_parts = tf.shape(part_logits)[1]
    part_labels = tf.tile(labels[:, None], [1, num_parts])
    return identity_loss(part_labels, part_logits, label_smoothing)


def part_loss(labels, part_logits, label_smoothing=0.0):
    """PL-Net's part loss: the mean over parts of each part's identity loss, `[B]`.

    Zero when there are no parts (the global-loss baseline).
    """
    if part_logits.shape[1] == 0:
        return tf.zeros(tf.shape(labels), tf.float32)
    return tf.reduce_mean(part_losses(labels, part_logits, label_smoothing), axis=1)


def euclidean_distances(a, b):
    """`[..., B, D]` x `[..., M, D]` -> `[..., B, M]` Euclidean distances, float32.

    From the squared norms and one matmul (as fast-reid's `euclidean_dist`); the squared distance
    is clamped at 1e-12 before the square root, so a zero distance has a zero gradient, not NaN.
    """
    a, b = tf.cast(a, tf.float32), tf.cast(b, tf.float32)
    squared = (tf.reduce_sum(tf.square(a), -1)[..., :, None]
               + tf.reduce_sum(tf.square(b), -1)[..., None, :]
               - 2.0 * tf.matmul(a, b, transpose_b=True))
    return tf.sqrt(tf.maximum(squared, 1e-12))


def batch_hard_triplet_loss(labels, embeddings, margin=0.3, reference_labels=None,
                            reference_embeddings=None, normalize=False):
    """Batch-hard triplet loss (Hermans et al. 2017), one value per anchor.

    For each anchor, its hardest positive (the farthest reference of its identity, itself
    included, as fast-reid does) and its hardest negative (the nearest reference of another
    identity): `max(0, d(a, p) - d(a, n) + margin)`, or with `margin=0` the soft margin
    `log(1 + exp(d(a, p) - d(a, n)))`. An anchor with no negative among the references scores 0.

    Args:
        labels: int `[B]`, the anchors' identities.
        embeddings: `[B, D]`, or `[B, K, D]` for K parts mined separately (part k of an anchor
            against part k of the references).
        margin: the hinge margin; 0 selects the soft margin.
        reference_labels, reference_embeddings: the batch the hardest examples are mined in
            (`[M]`, `[M, D]` or `[M, K, D]`); default the anchors themselves. Under a
            distribution strategy these are the all-gathered global batch.
        normalize: mine and score on L2-normalised embeddings (distances in [0, 2], the
            cosine geometry the test descriptor is ranked in) instead of the raw ones.

    Returns:
        float32 `[B]`, or `[B, K]` for parts.
    """
    embeddings = tf.convert_to_tensor(embeddings)
    if reference_labels is None:
        reference_labels, reference_embeddings = labels, embeddings
    parts = embeddings.shape.rank == 3
    if normalize:
        embeddings = tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=-1)
        reference_embeddings = tf.math.l2_normalize(
            tf.cast(reference_embeddings, tf.float32), axis=-1)
    if parts:  # [K, B, D] x [K, M, D] -> [K, B, M]
        embeddings = tf.transpose(embeddings, [1, 0, 2])
        reference_embeddings = tf.transpose(reference_embeddings, [1, 0, 2])
    distances = euclidean_distances(embeddings, reference_embeddings)
    same = tf.equal(tf.cast(labels, tf.int64)[:, None], tf.cast(reference_labels, tf.int64)[None, :])
    hardest_positive = tf.reduce_max(tf.where(same, distances, 0.0), axis=-1)
    hardest_negative = tf.reduce_min(tf.where(same, float("inf"), distances), axis=-1)
    has_negative = tf.reduce_any(~same, axis=-1)
    gap = hardest_positive - tf.where(has_negative, hardest_negative, 0.0)
    loss = tf.nn.softplus(gap) if margin == 0 else tf.nn.relu(gap + margin)
    loss = tf.where(has_negative, loss, 0.0)
    return tf.transpose(loss) if parts else loss


def training_metrics(labels, outputs):
    """Per-example figures a training step reports beside its loss terms: `global_accuracy
    [B]`, `part_accuracies [B,K]` (the classifiers' top-1 hits) and `part_fallback [B]` (whose
    partition fell back to stripes)."""
    labels = tf.cast(labels, tf.int64)
    return {
        "global_accuracy": tf.equal(tf.argmax(outputs["global_logits"], -1), labels),
        "part_accuracies": tf.equal(tf.argmax(outputs["part_logits"], -1), labels[:, None]),
        "part_fallback": outputs["part_fallback"],
    }


def plnet_loss(labels, outputs, part_loss_weight=1.0, label_smoothing=0.0, triplet_weight=0.0,
               triplet_margin=0.3, part_triplet=False, gather=None, triplet_normalize=False,
               part_assignment_weight=0.0):
    """Total PL-Net loss and its pieces, per example.

    Args:
        labels: int `[B]`.
        outputs: the `PartLossNet` output dict.
        part_loss_weight: lambda in global + lambda * part.
        label_smoothing: epsilon for every identity loss.
        triplet_weight: w in global + lambda * part + w * (triplet + part triplet); 0 computes
            no triplet loss at all (the loss and its gradients are exactly the softmax-only ones).
        triplet_margin: the triplet hinge margin; 0 selects the soft margin.
        part_triplet: also a triplet loss on each part's features (mined per part), averaged
            over the parts.
        gather: maps a replica's `[B, ...]` tensor to the global batch's `[B*R, ...]` (an
            all-gather with a gradient, see `train.step`), so that the hardest examples are
            mined over the global batch; None mines within `labels`.
        triplet_normalize: mine and score the triplets on L2-normalised features.
        part_assignment_weight: weight of a learned partition's teacher loss
            (`learned_parts.assignment_loss` of `part_targets` and `part_assignment_logits`);
            0 computes none.

    Returns:
        dict of `loss [B]`, `global_loss [B]`, `part_loss [B]`, `part_losses [B,K]`, and with a
        triplet weight `triplet_loss [B]` (on `global_features`) and, with `part_triplet`,
        `part_triplet_loss [B]` (on `part_features`).
    """
    global_loss = identity_loss(labels, outputs["global_logits"], label_smoothing)
    mean_part = part_loss(labels, outputs["part_logits"], label_smoothing)
    terms = {
        "loss": global_loss + part_loss_weight * mean_part,
        "global_loss": global_loss,
        "part_loss": mean_part,
        "part_losses": part_losses(labels, outputs["part_logits"], label_smoothing),
    }
    if part_assignment_weight:
        terms["part_assignment_loss"] = learned_parts.assignment_loss(
            outputs["part_targets"], outputs["part_assignment_logits"])
        terms["loss"] = terms["loss"] + part_assignment_weight * terms["part_assignment_loss"]
    if not triplet_weight:
        return terms
    gather = gather or (lambda value: value)
    all_labels = gather(labels)

    def triplet(features):
        features = tf.cast(features, tf.float32)
        return batch_hard_triplet_loss(labels, features, triplet_margin, all_labels,
                                       gather(features), normalize=triplet_normalize)

    terms["triplet_loss"] = triplet(outputs["global_features"])
    metric = terms["triplet_loss"]
    if part_triplet and outputs["part_features"].shape[1]:
        terms["part_triplet_loss"] = tf.reduce_mean(triplet(outputs["part_features"]), axis=1)
        metric = metric + terms["part_triplet_loss"]
    terms["loss"] = terms["loss"] + triplet_weight * metric
    return terms
