"""PartLossNet: PL-Net's global branch plus K activation-defined part branches."""

import keras
import tensorflow as tf

from reid_tf.data import preprocessing
from reid_tf.model import backbones
from reid_tf.model import heads
from reid_tf.model import learned_parts
from reid_tf.model import parts
from reid_tf.model.descriptors import descriptor


OUTPUT_KEYS = ("global_logits", "part_logits", "global_embedding", "part_embeddings",
               "part_masks", "embedding", "global_features", "part_features", "part_fallback",
               "part_assignment_logits", "part_targets")


@keras.saving.register_keras_serializable(package="reid_tf")
class PartLossNet(keras.Model):
    """PL-Net (Yao et al., arXiv 1707.00798): identity classification from the whole image and
    from K parts that the network finds in its own activations.

    backbone -> feature map [B,h,w,C] -> global average pool -> embedding -> global logits
                                      -> ActivationPartPartition -> masked pooling per part
                                         -> per-part embedding -> per-part logits

    Args:
        num_classes: N, identities in the training set.
        num_parts: K; 0 is the paper's global-loss baseline (part outputs then have K=0).
        part_strategy: one of `learned_parts.STRATEGIES`: an activation partition
            (`ActivationPartPartition`) or `learned` (`LearnedPartPartition`: soft masks from a
            per-cell classifier taught by `part_teacher`).
        embedding_dim: D, size of the global and of each part embedding.
        backbone: a name in `backbones.BACKBONES`.
        image_size: `(height, width)` of the input images.
        backbone_weights: `None`, `"imagenet"` or a torchvision `.pth` path (see
            `backbones.build_backbone`).
        last_stride: 1 or 2, the backbone's last stage stride.
        kmeans_iterations: Lloyd iterations of the part clustering.
        sync_batch_norm: BatchNorm statistics over all replicas (set by training when it runs
            on several); identical moving statistics on every replica and worker.
        part_teacher: the partition a `learned` one learns from (`learned_parts.TEACHERS`).

    Call: `images [B,H,W,3]` float RGB in [0, 255] -> dict with `global_logits [B,N]`,
    `part_logits [B,K,N]`, `global_embedding [B,D]`, `part_embeddings [B,K,D]`,
    `part_masks [B,h,w,K]`, `embedding [B,(K+1)*D]` (L2-normalised), and `global_features [B,D]`
    and `part_features [B,K,D]`, the embeddings before the BNNeck BatchNorm (where the triplet
    loss goes, as in Bag of Tricks), and `part_fallback [B]` (1 for an image whose clustering
    fell back to stripes), `part_assignment_logits [B,h,w,K]` and `part_targets [B,h,w,K]`
    (a learned partition's per-cell logits and what it learns from); the same keys in training
    and inference.

    Example:
    >>> model = PartLossNet(num_classes=5, num_parts=3, backbone="tiny", image_size=(64, 32))
    >>> model(tf.zeros([2, 64, 32, 3]))["part_logits"].shape
    TensorShape([2, 3, 5])
    """

    def __init__(self, num_classes, num_parts=4, part_strategy="bands", embedding_dim=256,
                 backbone="resnet50", image_size=(256, 128), backbone_weights=None,
                 last_stride=1, kmeans_iterations=10, sync_batch_norm=False, part_teacher="bands",
                 **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_parts, int) or num_parts < 0:
            raise ValueError(f"num_parts={num_parts!r}: expected an integer >= 0 (0 = baseline).")
        if part_strategy not in learned_parts.STRATEGIES:
            raise ValueError(
                f"part_strategy={part_strategy!r}: expected one of {learned_parts.STRATEGIES}."
            )
        self.num_classes = num_classes
        self.num_parts = num_parts
        self.part_strategy = part_strategy
        self.embedding_dim = embedding_dim
        # A torchvision checkpoint builds torchvision's layout; the config records the layout.
        self.backbone_name = backbones.resolve_backbone(backbone, backbone_weights)
        self.image_size = tuple(image_size)
        self.backbone_weights = backbone_weights
        self.last_stride = last_stride
        self.kmeans_iterations = kmeans_iterations
        self.sync_batch_norm = sync_batch_norm
        self.part_teacher = part_teacher
        self.learned = bool(num_parts) and part_strategy == "learned"

        self.backbone = backbones.build_backbone(
            backbone, (*self.image_size, 3), weights=backbone_weights, last_stride=last_stride,
            sync_batch_norm=sync_batch_norm,
        )
        grid_height, grid_width = self.backbone.output_shape[1:3]
        self.grid_size = (grid_height, grid_width)
        if num_parts > grid_height:
            raise ValueError(
                f"num_parts={num_parts}: backbone {backbone!r} at image_size={self.image_size} "
                f"gives a {grid_height}x{grid_width} feature grid, so num_parts must be in "
                f"0..{grid_height}."
            )
        self.global_head = heads.PartClassifierBlock(1, embedding_dim, num_classes,
                                                      sync_batch_norm, name="global_head")
        if self.learned:
            self.partition = learned_parts.LearnedPartPartition(
                num_parts, part_teacher, kmeans_iterations, name="partition")
        elif num_parts:
            self.partition = parts.ActivationPartPartition(
                num_parts, part_strategy, kmeans_iterations, name="partition"
            )
        if num_parts:
            self.part_pooling = parts.MaskedAveragePooling(name="part_pooling")
            self.part_head = heads.PartClassifierBlock(num_parts, embedding_dim, num_classes,
                                                        sync_batch_norm, name="part_head")

    def preprocess(self, images):
        """uint8 (or float) RGB images `[B,H,W,3]` of any size -> the model's input (float32 at
        `image_size`, [0, 255]): the resize every caller shares (`data.preprocessing`)."""
        return preprocessing.preprocess(images, self.image_size)

    def decode(self, encoded):
        """One encoded JPEG/PNG/BMP image (string scalar) -> the model's input `[h,w,3]`."""
        return preprocessing.decode(encoded, self.image_size)

    def build(self, input_shape=None):
        # 1 while a learned partition pools with its teacher's masks in training (RPP's
        # induction; `train.hooks.PartInduction` turns it off), 0 after; checkpointed.
        if self.learned:
            self.teacher_pooling = self.add_weight(name="teacher_pooling", shape=(),
                                                   initializer="zeros", trainable=False)
        # Heads are built by running the graph once on zeros; nothing is updated.
        self.call(tf.zeros([1, *self.image_size, 3]), training=False)
        self.built = True

    def call(self, images, training=None):
        features = self.backbone(images, training=training)
        batch = tf.shape(features)[0]
        pooled = tf.reduce_mean(features, axis=[1, 2])[:, None, :]
        global_embedding, global_logits, global_features = self.global_head(
            pooled, training=training, with_features=True)
        if self.learned:
            part_masks, pooling_masks, targets, logits, fallback = self._learned_masks(
                features, bool(training))
            pooled_parts = self.part_pooling([features, pooling_masks])
            part_embeddings, part_logits, part_features = self.part_head(
                pooled_parts, training=training, with_features=True)
        elif self.num_parts:
            part_masks, fallback = self.partition(features, return_fallback=True)
            targets, logits = part_masks, tf.zeros_like(part_masks)
            pooled_parts = self.part_pooling([features, part_masks])
            part_embeddings, part_logits, part_features = self.part_head(
                pooled_parts, training=training, with_features=True)
        else:
            part_masks = tf.zeros([batch, *self.grid_size, 0], tf.float32)
            fallback = tf.zeros([batch], tf.bool)
            part_embeddings = tf.zeros([batch, 0, self.embedding_dim], global_embedding.dtype)
            part_features = part_embeddings
            part_logits = tf.zeros([batch, 0, self.num_classes], tf.float32)
            targets = logits = part_masks
        return {
            "global_logits": global_logits[:, 0],
            "part_logits": part_logits,
            "global_embedding": global_embedding[:, 0],
            "part_embeddings": part_embeddings,
            "part_masks": part_masks,
            "embedding": descriptor(global_embedding[:, 0], part_embeddings),
            "global_features": global_features[:, 0],
            "part_features": part_features,
            "part_fallback": tf.cast(fallback, tf.float32),
            # The learned partition's per-cell part logits (from the backbone's features
            # without gradient: its teacher loss trains the head only) and their targets:
            # the teacher's parts in training, the head's own hard parts at inference. Other
            # strategies: zeros and their masks.
            "part_assignment_logits": logits,
            "part_targets": targets,
        }

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "num_parts": self.num_parts,
            "part_strategy": self.part_strategy,
            "embedding_dim": self.embedding_dim,
            "backbone": self.backbone_name,
            "image_size": self.image_size,
            # Saved weights replace any initialisation: never download again on reload.
            "backbone_weights": None,
            "last_stride": self.last_stride,
            "kmeans_iterations": self.kmeans_iterations,
            "sync_batch_norm": self.sync_batch_norm,
            "part_teacher": self.part_teacher,
        }

    def _learned_masks(self, features, training):
        """The learned partition's `(masks, pooling masks, targets, logits, fallback)`: soft
        masks from the head; in training the teacher's parts are the targets, and the pooling
        uses them while `teacher_pooling` is on. At inference no teacher runs (no K-means)."""
        head = self.partition(features)
        logits = self.partition(tf.stop_gradient(features))["logits"]
        if not training:
            targets = tf.one_hot(tf.argmax(head["masks"], -1), self.num_parts)
            return head["masks"], head["masks"], targets, logits, tf.zeros(tf.shape(features)[:1],
                                                                            tf.bool)
        targets, fallback = self.partition.teacher_partition(tf.stop_gradient(features),
                                                             return_fallback=True)
        targets = tf.cast(targets, tf.float32)
        pooling = tf.where(self.teacher_pooling > 0.5, targets, head["masks"])
        return head["masks"], pooling, targets, logits, fallback
