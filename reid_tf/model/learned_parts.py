"""A learned part assignment (issue 38): a per-cell part classifier taught by a partition.

`ActivationPartPartition` clusters each image's activations at every call, K-means included,
in training and at inference. Refined part pooling (PCB + RPP, Sun et al., ECCV 2018) and
identity-guided part parsing (ISP, Zhu et al., ECCV 2020) instead *train* a classifier that
assigns every feature-map cell to a part, from pseudo-labels. `LearnedPartPartition` is that
classifier: a 1x1 convolution (one dense layer over each cell's channels) gives K logits per
cell and their softmax is a soft part mask. It learns from a teacher partition (`bands`, the
paper's activation partition, or `stripes`) as per-cell pseudo-labels recomputed from the
current features at each training step (ISP's loop); `PartLossNet` pools with the teacher's
masks while `teacher_pooling` is on (RPP's induction from a converged partition) and with the
head's masks after. At inference there is no teacher: the partition is a convolution and a
softmax, so every export format carries it without K-means.
"""

import keras
import tensorflow as tf

from reid_tf.model import parts

TEACHERS = ("bands", "stripes")
STRATEGIES = parts.PART_STRATEGIES + ("learned",)  # every --part_strategy PartLossNet takes


@keras.saving.register_keras_serializable(package="reid_tf")
class LearnedPartPartition(keras.layers.Layer):
    """Soft part masks from a per-cell classifier, taught by an activation partition.

    Shapes: `[B,h,w,C] -> {"masks": [B,h,w,K] (softmax over K), "logits": [B,h,w,K]}`;
    `teacher(features)` gives the teacher's one-hot `[B,h,w,K]` (no gradient).

    Args:
        num_parts: K >= 1.
        teacher: the partition it learns from, one of `TEACHERS`.
        kmeans_iterations: the teacher's Lloyd iterations (bands).

    Example:
    >>> layer = LearnedPartPartition(3)
    >>> layer(tf.ones([2, 8, 4, 16]))["masks"].shape
    TensorShape([2, 8, 4, 3])
    """

    def __init__(self, num_parts, teacher="bands", kmeans_iterations=10, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_parts, int) or num_parts < 1:
            raise ValueError(f"num_parts={num_parts!r}: expected an integer >= 1.")
        if teacher not in TEACHERS:
            raise ValueError(f"part_teacher={teacher!r}: expected one of {TEACHERS}.")
        self.num_parts = num_parts
        self.teacher_strategy = teacher
        self.kmeans_iterations = kmeans_iterations

    def build(self, input_shape):
        # Zero kernel and bias: the head starts from even odds, the teacher's labels move it.
        self.classifier = keras.layers.Dense(self.num_parts, kernel_initializer="zeros",
                                             name="classifier", dtype=self.dtype_policy)
        self.classifier.build(input_shape)
        self.teacher_partition = parts.ActivationPartPartition(
            self.num_parts, self.teacher_strategy, self.kmeans_iterations, name="teacher")

    def call(self, features):
        logits = tf.cast(self.classifier(features), tf.float32)
        return {"masks": tf.nn.softmax(logits, axis=-1), "logits": logits}

    def teacher(self, features):
        """The teacher's hard masks (float one-hot) on `features`, without gradient."""
        return tf.cast(self.teacher_partition(tf.stop_gradient(features)), tf.float32)

    def compute_output_shape(self, input_shape):
        shape = (*input_shape[:3], self.num_parts)
        return {"masks": shape, "logits": shape}

    def get_config(self):
        return {**super().get_config(), "num_parts": self.num_parts,
                "teacher": self.teacher_strategy, "kmeans_iterations": self.kmeans_iterations}


def assignment_loss(targets, logits):
    """Per example: the mean over cells of the cross-entropy between the teacher's one-hot part
    `targets [B,h,w,K]` and the head's `logits [B,h,w,K]` -> `[B]`. An image without parts
    (K = 0) scores 0."""
    if logits.shape[-1] == 0:
        return tf.zeros(tf.shape(logits)[:1], tf.float32)
    cells = tf.nn.softmax_cross_entropy_with_logits(labels=tf.cast(targets, tf.float32),
                                                    logits=tf.cast(logits, tf.float32))
    return tf.reduce_mean(cells, axis=[1, 2])
