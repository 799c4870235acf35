"""PL-Net's training objective: global identity loss + lambda * part loss, per example.

Every function returns per-example values, so a distribution strategy reduces them with
`tf.nn.compute_average_loss(..., global_batch_size=...)`.
"""

import tensorflow as tf


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


def plnet_loss(labels, outputs, part_loss_weight=1.0, label_smoothing=0.0):
    """Total PL-Net loss and its pieces, per example.

    Args:
        labels: int `[B]`.
        outputs: the `PartLossNet` output dict.
        part_loss_weight: lambda in global + lambda * part.
        label_smoothing: epsilon for every identity loss.

    Returns:
        dict of `loss [B]`, `global_loss [B]`, `part_loss [B]`, `part_losses [B,K]`.
    """
    global_loss = identity_loss(labels, outputs["global_logits"], label_smoothing)
    mean_part = part_loss(labels, outputs["part_logits"], label_smoothing)
    return {
        "loss": global_loss + part_loss_weight * mean_part,
        "global_loss": global_loss,
        "part_loss": mean_part,
        "part_losses": part_losses(labels, outputs["part_logits"], label_smoothing),
    }
