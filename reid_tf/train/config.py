"""`TrainConfig`: every option of a training run, each declared once (`options.Option`).

`reid-train`'s flags, the config built from them, the checks of their values and the options a
resume must keep are all derived from the fields below. `resume=True` marks an option that
changes what the checkpoint holds (the model, the optimizer's variables, the numerics), the
training data or its order, or what training computes (the recipe); the others (where data is
read from, cadence, distribution, the training length) may change when a run resumes.
"""

import dataclasses
import json
import os

from reid_tf import options
from reid_tf.model import backbones
from reid_tf.model import learned_parts
from reid_tf.options import Option

STRATEGIES = ("default", "mirrored", "multi_worker")
PRECISIONS = ("none", "bfloat16", "float16")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; `reid-train` builds it from its flags."""

    # Data.
    dataset: str = options.DATASET.field()
    data_dir: str = options.DATA_DIR.field()
    manual_dir: str = options.MANUAL_DIR.field()
    skip_corrupt: bool = options.SKIP_CORRUPT.field()
    cache_in_memory: bool = Option(
        False, "TFDS data: read every encoded image into memory at start (default: read each "
        "by index from the prepared files as training needs it; folders are always read file "
        "by file).").field()
    validation_identities: float = Option(
        0.0, "Hold out this share (< 1) or number (>= 1) of the training identities as a "
        "validation query/gallery; --eval_every then evaluates on it, and the test split only "
        "once, at the end. 0: no validation.", resume=True).field()
    validation_seed: int = Option(0, "Seed of the validation identities and queries.",
                                  resume=True).field()
    # Model.
    backbone: str = Option("resnet50", "Backbone (torchvision_mobilenet_v2: torchvision's "
                           "layout, for --weights=*.pth).", resume=True,
                           choices=tuple(sorted(backbones.BACKBONES))).field()
    weights: str = Option(None, "Backbone initialisation: empty (random), imagenet (Keras "
                          "download) or the path of a torchvision checkpoint (.pth; "
                          "mobilenet_v2 then uses torchvision's layout).", resume=True).field()
    num_parts: int = Option(4, "K parts; 0 = global-loss baseline.", resume=True).field()
    part_strategy: str = Option("bands", "How parts are found: from the activations (bands, "
                                "peaks, activation), fixed stripes, or learned (a per-cell "
                                "classifier taught by --part_teacher).", resume=True,
                                choices=learned_parts.STRATEGIES).field()
    part_teacher: str = Option("bands", "What a learned partition learns from.", resume=True,
                               choices=learned_parts.TEACHERS).field()
    part_assignment_weight: float = Option(
        1.0, "Weight of a learned partition's teacher loss (cross-entropy per cell).",
        resume=True, minimum=0.0).field()
    part_induction: float = Option(
        0.0, "A learned partition pools with its teacher's masks for this share of training "
        "(RPP's induction), then with its own; 0: its own from the start (ISP-style).",
        resume=True, minimum=0.0).field()
    embedding_dim: int = Option(256, "Size of each embedding.", resume=True, minimum=1).field()
    image_height: int = options.IMAGE_HEIGHT.field()
    image_width: int = options.IMAGE_WIDTH.field()
    last_stride: int = Option(1, "Backbone last-stage stride (1 or 2).", resume=True).field()
    kmeans_iterations: int = Option(10, "Lloyd iterations of the part clustering.",
                                    resume=True, minimum=1).field()
    # Loss.
    part_loss_weight: float = Option(1.0, "lambda of the part loss.", resume=True).field()
    label_smoothing: float = Option(0.0, "Label smoothing epsilon.", resume=True).field()
    triplet_weight: float = Option(
        0.0, "Weight of the batch-hard triplet loss on the embeddings before the BNNeck "
        "BatchNorm, mined over the global P x K batch; 0 trains without it.", resume=True,
        minimum=0.0).field()
    triplet_margin: float = Option(
        0.3, "Triplet hinge margin; 0 selects the soft margin log(1 + exp(d_ap - d_an)).",
        resume=True, minimum=0.0).field()
    triplet_normalize: bool = Option(
        False, "Mine and score the triplets on L2-normalised embeddings (cosine geometry, "
        "distances in [0, 2]) instead of the raw ones.", resume=True).field()
    part_triplet: bool = Option(
        False, "Also a triplet loss on each part's embedding, mined per part (with "
        "--triplet_weight).", resume=True).field()
    # Optimisation.
    optimizer: str = Option("sgd", "Optimizer.", resume=True, choices=OPTIMIZERS).field()
    learning_rate: float = Option(0.01, "Peak learning rate.", resume=True).field()
    backbone_lr_multiplier: float = Option(
        1.0, "Backbone learning rate = learning_rate x this (e.g. 0.1 when pretrained).",
        resume=True).field()
    weight_decay: float = Option(5e-4, "Decoupled weight decay.", resume=True).field()
    warmup_steps: int = Option(0, "Linear warm-up steps.", resume=True).field()
    schedule: str = Option("cosine", "Decay after warm-up.", resume=True,
                           choices=SCHEDULES).field()
    lr_decay_steps: tuple = Option((), "Step schedule boundaries (default 60%, 85% of "
                                   "training).", resume=True, item=int).field()
    lr_decay_factor: float = Option(0.1, "Step schedule factor.", resume=True).field()
    train_steps: int = Option(0, "Training steps (0: use --epochs).").field()
    epochs: int = Option(10, "Epochs, when --train_steps=0.").field()
    identities_per_batch: int = Option(8, "P: identities in each training batch.", resume=True,
                                       minimum=1).field()
    images_per_identity: int = Option(4, "Images of each identity in a training batch "
                                      "(batch = P x this).", resume=True, minimum=1).field()
    flip: bool = Option(True, "Random horizontal flip.", resume=True).field()
    pad: int = Option(10, "Pad-and-crop pixels (0: off).", resume=True).field()
    random_erasing: float = Option(0.5, "Random erasing probability.", resume=True).field()
    # Distribution and numerics.
    strategy: str = Option("default", "tf.distribute.", choices=STRATEGIES).field()
    cpu_replicas: int = Option(0, "Split the CPU into N logical devices (with mirrored).",
                               minimum=0).field()
    mixed_precision: str = Option(
        "none", "Compute in bfloat16 (no loss scaling needed) or float16 (T4, V100: with Keras "
        "dynamic loss scaling); variables stay float32.", resume=True,
        choices=PRECISIONS).field()
    jit_compile: bool = Option(False, "Compile the training step with XLA (for GPUs; on CPU it "
                               "was measured several times slower).").field()
    seed: int = Option(0, "Seed of initialisation, batches, augmentation.", resume=True).field()
    # Cadence (in steps; 0 = off).
    log_every: int = Option(20, "Steps between progress lines.", minimum=1).field()
    checkpoint_every: int = Option(200, "Steps between checkpoints.").field()
    eval_every: int = Option(0, "Steps between evaluations (0: at end).").field()
    image_summary_every: int = Option(200, "Steps between part-mask pictures in "
                                      "TensorBoard.").field()
    max_steps_per_call: int = Option(50, "Most training steps run in one tf.function call.",
                                     minimum=1).field()
    eval_batch_size: int = options.BATCH_SIZE.replace(
        help="Images per batch when evaluating.").field()
    export: bool = Option(True, "Export a SavedModel at the end.").field()
    final_eval: bool = Option(True, "Evaluate on the test split at the end (false: a run that "
                              "only measures training, e.g. on a large synthetic set).").field()
    also_evaluate_on: tuple = Option(
        (), "Datasets whose test split the final model is also evaluated on, comma-separated "
        "(e.g. the same people in detector boxes: a robustness figure with no new training); "
        "results.json's `also_evaluated`.", item=str).field()

    @property
    def image_size(self):
        return (self.image_height, self.image_width)

    @property
    def global_batch_size(self):
        return self.identities_per_batch * self.images_per_identity

    def validate(self):
        """Checks what needs no data or model; ValueError names the flag and the valid values."""
        options.check(self)
        if self.train_steps < 0 or (self.train_steps == 0 and self.epochs < 1):
            raise ValueError("--train_steps or --epochs: expected a positive number of steps or "
                             "epochs.")
        if self.num_parts < 0:
            raise ValueError(f"--num_parts={self.num_parts}: expected an integer >= 0 "
                             "(0 = global-loss baseline).")
        if self.validation_identities < 0:
            raise ValueError(f"--validation_identities={self.validation_identities}: expected "
                             "0 (none), a share in (0, 1) or a number of identities.")
        if self.strategy == "multi_worker" and "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy=multi_worker needs the TF_CONFIG environment variable.")

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


RESUME_OPTIONS = options.resume_options(TrainConfig)


_TRAINING = {name: option for name, _, option in options.declared(TrainConfig)}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Every option of reid-demo; those it shares with training are training's declarations."""

    backbone: str = _TRAINING["backbone"].replace(default="tiny").field()
    num_parts: int = _TRAINING["num_parts"].field()
    part_strategy: str = _TRAINING["part_strategy"].replace(
        choices=tuple(s for s in learned_parts.STRATEGIES if s != "learned")).field()
    num_identities: int = Option(8, "Identities in the generated batch.", minimum=1).field()
    images_per_identity: int = _TRAINING["images_per_identity"].field()
    steps: int = Option(20, "Training steps.", minimum=1).field()
    height: int = Option(128, "Image height.", minimum=1).field()
    width: int = Option(64, "Image width.", minimum=1).field()
    cpu_replicas: int = _TRAINING["cpu_replicas"].field()
    seed: int = _TRAINING["seed"].field()
