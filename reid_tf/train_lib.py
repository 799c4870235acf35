"""Training: `train_and_evaluate(config, workdir)`, a tf.distribute custom loop.

The workdir holds everything a run writes (`config.json`, `flags.txt`, `checkpoints/`,
`tensorboard/{train,eval}/`, `export/<version>/`, `results.json`); running the same command
again resumes from its latest checkpoint.
"""

import dataclasses
import json
import math
import os
import shutil
import time

import keras
import numpy as np
import tensorflow as tf

from reid_tf import backbones
from reid_tf import evaluation
from reid_tf import export
from reid_tf import input_pipeline
from reid_tf import layers
from reid_tf import losses
from reid_tf import model as model_lib
from reid_tf import visualize
from reid_tf import workdir as workdir_lib

STRATEGIES = ("default", "mirrored", "multi_worker")
PRECISIONS = ("none", "bfloat16", "float16")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step")
# Fields that define the model and its checkpoint: a workdir only resumes with the same values.
@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; `reid-train` builds it from flags."""

    # Data.
    dataset: str = "synthetic_persons"
    data_dir: str = None
    manual_dir: str = None
    skip_corrupt: bool = False
    cache_in_memory: bool = False  # TFDS data: read every encoded image at start, not by index
    validation_identities: float = 0.0  # share (< 1) or number (>= 1) of training identities
    validation_seed: int = 0
    # Model.
    backbone: str = "resnet50"
    weights: str = None
    num_parts: int = 4
    part_strategy: str = "bands"
    embedding_dim: int = 256
    image_height: int = 256
    image_width: int = 128
    last_stride: int = 1
    kmeans_iterations: int = 10
    # Loss.
    part_loss_weight: float = 1.0
    label_smoothing: float = 0.0
    # Optimisation.
    optimizer: str = "sgd"
    learning_rate: float = 0.01
    backbone_lr_multiplier: float = 1.0
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    schedule: str = "cosine"
    lr_decay_steps: tuple = ()  # step schedule boundaries; empty: 60 % and 85 % of training
    lr_decay_factor: float = 0.1
    train_steps: int = 0  # 0: use epochs
    epochs: int = 10
    identities_per_batch: int = 8  # P
    images_per_identity: int = 4  # K
    flip: bool = True
    pad: int = 10
    random_erasing: float = 0.5
    # Distribution and numerics.
    strategy: str = "default"
    cpu_replicas: int = 0
    mixed_precision: str = "none"  # "none", "bfloat16" or "float16" (with loss scaling)
    jit_compile: bool = False  # XLA for the training step (off on CPU: several times slower)
    seed: int = 0
    # Cadence (in steps; 0 = off).
    log_every: int = 20
    checkpoint_every: int = 200
    eval_every: int = 0
    image_summary_every: int = 200
    max_steps_per_call: int = 50
    eval_batch_size: int = 64
    export: bool = True
    final_eval: bool = True  # evaluate on the test split at the end

    @property
    def image_size(self):
        return (self.image_height, self.image_width)

    @property
    def global_batch_size(self):
        return self.identities_per_batch * self.images_per_identity

    def validate(self):
        """Checks what needs no data or model; ValueError names the flag and the valid values."""
        choices = {"strategy": STRATEGIES, "optimizer": OPTIMIZERS, "schedule": SCHEDULES,
                   "mixed_precision": PRECISIONS}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"--{name}={getattr(self, name)!r}: expected one of {valid}.")
        positive = ["identities_per_batch", "images_per_identity", "embedding_dim", "log_every",
                    "max_steps_per_call", "eval_batch_size", "image_height", "image_width"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)}: expected a positive integer.")
        if self.train_steps < 0 or (self.train_steps == 0 and self.epochs < 1):
            raise ValueError("--train_steps or --epochs: expected a positive number of steps or "
                             "epochs.")
        if self.num_parts < 0:
            raise ValueError(f"--num_parts={self.num_parts}: expected an integer >= 0 "
                             "(0 = global-loss baseline).")
        if self.part_strategy not in layers.PART_STRATEGIES:
            raise ValueError(f"--part_strategy={self.part_strategy!r}: expected one of "
                             f"{layers.PART_STRATEGIES}.")
        if self.backbone not in backbones.BACKBONES:
            raise ValueError(f"--backbone={self.backbone!r}: expected one of "
                             f"{tuple(sorted(backbones.BACKBONES))}.")
        if self.validation_identities < 0:
            raise ValueError(f"--validation_identities={self.validation_identities}: expected "
                             "0 (none), a share in (0, 1) or a number of identities.")
        if self.cpu_replicas < 0:
            raise ValueError(f"--cpu_replicas={self.cpu_replicas}: expected >= 0.")
        if self.strategy == "multi_worker" and "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy=multi_worker needs the TF_CONFIG environment variable.")

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def split_cpu(num_replicas):
    """Splits the first CPU into `num_replicas` logical devices (before TF initialises devices).

    Lets the MirroredStrategy code path really run with several replicas on a CPU machine.
    """
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current is not None and len(current) == num_replicas:
        return
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(num_replicas)]
    )


def make_strategy(name="default", cpu_replicas=0):
    """Returns the `tf.distribute` strategy called `name` (one of `STRATEGIES`).

    `cpu_replicas > 0` mirrors over that many logical CPU devices (no GPU needed);
    `multi_worker` reads the cluster from TF_CONFIG.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r}: expected one of {STRATEGIES}.")
    if cpu_replicas:
        split_cpu(cpu_replicas)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if cpu_replicas or not tf.config.list_physical_devices("GPU"):
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
            # Collective all-reduce keys clash between two CPU MirroredStrategies in one process
            # ("Shape mismatch in the collective instance"); reducing on one device is exact.
            return tf.distribute.MirroredStrategy(
                devices=devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
            )
        return tf.distribute.MirroredStrategy()
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy):
    """True on the one worker that writes summaries, exports and the real checkpoints."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    if resolver.task_type == "chief":
        return True
    return (resolver.task_type == "worker" and resolver.task_id == 0
            and "chief" not in resolver.cluster_spec().as_dict())


def every(step, period):
    """True when `step` is a positive multiple of `period` (period 0: never)."""
    return bool(period) and step > 0 and step % period == 0


def steps_to_next(step, periods, total):
    """Steps to run before the next cadence boundary or the end of training."""
    candidates = [total - step] + [p - step % p for p in periods if p]
    return max(1, min(candidates))


@keras.saving.register_keras_serializable(package="reid_tf")
class WarmupThenDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0, then cosine decay to 0 or step decay at `boundaries`."""

    def __init__(self, learning_rate, total_steps, warmup_steps=0, schedule="cosine",
                 boundaries=(), decay_factor=0.1):
        self.learning_rate = learning_rate
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.schedule = schedule
        self.boundaries = tuple(boundaries)
        self.decay_factor = decay_factor

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = tf.minimum(1.0, (step + 1) / max(self.warmup_steps, 1))
        if self.schedule == "cosine":
            progress = tf.clip_by_value((step - self.warmup_steps)
                                        / max(self.total_steps - self.warmup_steps, 1), 0.0, 1.0)
            decay = 0.5 * (1.0 + tf.cos(math.pi * progress))
        else:
            passed = tf.add_n([tf.cast(step >= b, tf.float32) for b in self.boundaries] or [0.0])
            decay = tf.pow(self.decay_factor, passed)
        return self.learning_rate * warmup * decay

    def get_config(self):
        return {"learning_rate": self.learning_rate, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "schedule": self.schedule,
                "boundaries": self.boundaries, "decay_factor": self.decay_factor}


def make_optimizer(config, schedule):
    if config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True,
                                         weight_decay=config.weight_decay or None)
    elif config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(schedule, weight_decay=config.weight_decay or None)
    else:
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay)
    # No decay on biases and BatchNorm scales/offsets, as usual.
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


def make_train_step(model, optimizer, strategy, global_batch_size, part_loss_weight=1.0,
                    label_smoothing=0.0, backbone_optimizer=None, jit_compile=False):
    """Builds `train_step(iterator, num_steps)`: `num_steps` distributed steps in one tf.function.

    Returns the metrics averaged over those steps: `loss`, `global_loss`, `part_loss`,
    `part_losses [K]`, `global_accuracy`, `part_accuracies [K]`, and `first_bad_step` (the
    0-based offset of the first step with a non-finite loss, -1 if none). With
    `backbone_optimizer`, the backbone's variables are updated by it (e.g. a lower learning
    rate), the rest by `optimizer`. Build the optimizers' variables inside `strategy.scope()`
    before the first call.

    With `keras.optimizers.LossScaleOptimizer`s (float16), the loss is multiplied by the head
    optimizer's dynamic scale; the backbone's gradients are rescaled to the backbone optimizer's
    own scale, so each optimizer unscales, checks for non-finite values and adapts its scale as
    Keras does. `jit_compile` compiles the replica step with XLA.
    """
    backbone_ids = {id(v) for v in model.backbone.trainable_variables}
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def apply(which, pairs):
        """apply_gradients; a step that loss scaling skipped (non-finite float16 gradients)
        still counts, so `iterations` stays the number of batches trained on (resume
        position, schedule)."""
        if not scaled:
            which.apply_gradients(pairs)
            return
        before = tf.identity(which.iterations)
        which.apply_gradients(pairs)
        skipped = tf.cast(tf.equal(which.iterations, before), which.iterations.dtype)
        which.inner_optimizer.iterations.assign_add(skipped)

    def replica_step(batch):
        images, labels = batch["image"], batch["label"]
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            terms = losses.plnet_loss(labels, outputs, part_loss_weight, label_smoothing)
            loss = tf.nn.compute_average_loss(terms["loss"], global_batch_size=global_batch_size)
            objective = optimizer.scale_loss(loss) if scaled else loss
        variables = model.trainable_variables
        gradients = tape.gradient(objective, variables)
        pairs = list(zip(gradients, variables))
        if backbone_optimizer is None:
            apply(optimizer, pairs)
        else:
            backbone_pairs = [p for p in pairs if id(p[1]) in backbone_ids]
            if scaled:  # from the head's loss scale to the backbone optimizer's own
                ratio = backbone_optimizer.dynamic_scale / optimizer.dynamic_scale
                backbone_pairs = [(g * tf.cast(ratio, g.dtype), v) for g, v in backbone_pairs]
            apply(backbone_optimizer, backbone_pairs)
            apply(optimizer, [p for p in pairs if id(p[1]) not in backbone_ids])

        def batch_mean(values):
            return tf.reduce_sum(tf.cast(values, tf.float32), axis=0) / global_batch_size

        labels = tf.cast(labels, tf.int64)
        global_hits = tf.equal(tf.argmax(outputs["global_logits"], -1), labels)
        part_hits = tf.equal(tf.argmax(outputs["part_logits"], -1), labels[:, None])
        return {
            "loss": batch_mean(terms["loss"]),
            "global_loss": batch_mean(terms["global_loss"]),
            "part_loss": batch_mean(terms["part_loss"]),
            "part_losses": batch_mean(terms["part_losses"]),
            "global_accuracy": batch_mean(global_hits),
            "part_accuracies": batch_mean(part_hits),
        }

    if jit_compile:
        replica_step = tf.function(replica_step, jit_compile=True)

    def one_step(iterator):
        per_replica = strategy.run(replica_step, args=(next(iterator),))
        return {name: strategy.reduce("SUM", value, axis=None)
                for name, value in per_replica.items()}

    @tf.function
    def train_step(iterator, num_steps):
        totals = one_step(iterator)
        first_bad = tf.where(tf.math.is_finite(totals["loss"]), -1, 0)
        for offset in tf.range(1, num_steps):
            metrics = one_step(iterator)
            first_bad = tf.where((first_bad < 0) & ~tf.math.is_finite(metrics["loss"]),
                                 offset, first_bad)
            totals = {name: totals[name] + metrics[name] for name in totals}
        means = {name: value / tf.cast(num_steps, tf.float32) for name, value in totals.items()}
        return {**means, "first_bad_step": first_bad}

    return train_step


def extract_outputs(model, split, image_size, batch_size):
    """The descriptors (`model_lib.DESCRIPTORS` that the model has) and `part_masks` of a split,
    in its order, no augmentation: `{name: np.ndarray [N, ...]}`."""
    names = [n for n in model_lib.DESCRIPTORS if n != "part_embeddings" or model.num_parts]

    @tf.function
    def predict(images):
        outputs = model(images, training=False)
        return {**{n: model_lib.select_descriptor(outputs, n) for n in names},
                "part_masks": outputs["part_masks"]}

    batches = [{k: v.numpy() for k, v in predict(batch["image"]).items()}
               for batch in input_pipeline.eval_dataset(split, image_size, batch_size)]
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


def extract_features(model, split, image_size, batch_size):
    """Embeddings `[N, (K+1)·D]` of a split, in its order (no augmentation)."""
    return extract_outputs(model, split, image_size, batch_size)["embedding"].astype(np.float32)


def evaluate_model(model, query_split, gallery_split, config):
    """rank-1 / mAP / mINP / CMC of `model` (cosine, test descriptor `embedding`).

    Also `descriptors`: `{name: {rank1, mAP, mINP}}` for every descriptor the model has, and
    `part_consistency` (`layers.part_consistency` over the query and gallery masks) for PL-Net.
    """
    query = extract_outputs(model, query_split, config.image_size, config.eval_batch_size)
    gallery = extract_outputs(model, gallery_split, config.image_size, config.eval_batch_size)
    labels = (query_split.person_ids, gallery_split.person_ids, query_split.camera_ids,
              gallery_split.camera_ids)
    descriptors = {}
    for name in query:
        if name == "part_masks":
            continue
        distances = evaluation.pairwise_distances(query[name], gallery[name], "cosine")
        descriptors[name] = evaluation.evaluate(distances, *labels)
    metrics = dict(descriptors["embedding"])
    metrics["descriptors"] = {name: {"rank1": m["rank1"], "mAP": m["mAP"], "mINP": m["mINP"]}
                              for name, m in descriptors.items()}
    if model.num_parts:
        metrics["part_consistency"] = layers.part_consistency(
            np.concatenate([query["part_masks"], gallery["part_masks"]]))
    return metrics


def _format_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s")


def _flags_markdown(config):
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(dataclasses.asdict(config).items()))
    return "| flag | value |\n| --- | --- |\n" + rows


def train_and_evaluate(config, workdir, log=print, flags_text=None):
    """Trains PL-Net as `config` says, evaluates, exports; resumes from `workdir` if it can.

    `flags_text` (the command's flags) is saved as `workdir/flags.txt`. Returns the results
    dict also written to `workdir/results.json`.
    """
    # Every check before anything is written: a refused start leaves the workdir as it was.
    config.validate()
    workdir_lib.check_usable(workdir)
    workdir_lib.check_config(workdir, config)
    strategy = make_strategy(config.strategy, config.cpu_replicas)
    chief = is_chief(strategy)
    replicas = strategy.num_replicas_in_sync
    if config.global_batch_size % replicas:
        raise ValueError(f"batch P*K={config.global_batch_size} (--identities_per_batch="
                         f"{config.identities_per_batch} x --images_per_identity="
                         f"{config.images_per_identity}) does not divide over {replicas} replicas.")
    if config.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(f"mixed_{config.mixed_precision}")
    keras.utils.set_random_seed(config.seed)

    splits = input_pipeline.load_splits(config.dataset, config.data_dir, config.manual_dir,
                                        config.skip_corrupt, log, config.validation_identities,
                                        config.validation_seed, config.cache_in_memory)
    for split in ("train", "query", "gallery"):
        if split not in splits:
            raise ValueError(f"--dataset={config.dataset}: has no {split!r} split.")
    train_labels, num_classes = input_pipeline.relabel(splits["train"].person_ids)
    epoch_length = len(input_pipeline.pk_epoch(
        train_labels, config.identities_per_batch, config.images_per_identity,
        np.random.default_rng([config.seed, 0])))
    steps_per_epoch = max(1, epoch_length // config.global_batch_size)
    total_steps = config.train_steps or config.epochs * steps_per_epoch

    with strategy.scope():
        model = model_lib.PartLossNet(
            num_classes=num_classes, num_parts=config.num_parts,
            part_strategy=config.part_strategy, embedding_dim=config.embedding_dim,
            backbone=config.backbone, image_size=config.image_size,
            backbone_weights=config.weights, last_stride=config.last_stride,
            kmeans_iterations=config.kmeans_iterations,
            # The P×K batch is split across replicas: normalise over the whole batch, and keep
            # one set of moving statistics on every replica and worker.
            sync_batch_norm=replicas > 1,
        )
        model.build()
        if chief:  # the checks passed: config.json, flags.txt, model.json (how to rebuild it)
            workdir_lib.record(workdir, config, model.get_config(), flags_text)
        boundaries = config.lr_decay_steps or (int(0.6 * total_steps), int(0.85 * total_steps))
        schedule_args = dict(total_steps=total_steps, warmup_steps=config.warmup_steps,
                             schedule=config.schedule, boundaries=boundaries,
                             decay_factor=config.lr_decay_factor)
        optimizer = make_optimizer(config, WarmupThenDecay(config.learning_rate, **schedule_args))
        backbone_optimizer = None
        if config.backbone_lr_multiplier != 1.0:
            backbone_optimizer = make_optimizer(config, WarmupThenDecay(
                config.learning_rate * config.backbone_lr_multiplier, **schedule_args))
        if config.mixed_precision == "float16":  # float16 gradients underflow without it
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            if backbone_optimizer is not None:
                backbone_optimizer = keras.optimizers.LossScaleOptimizer(backbone_optimizer)
        optimizer.build(model.trainable_variables)
        if backbone_optimizer is not None:
            backbone_optimizer.build(model.backbone.trainable_variables)
        trackables = {"model": model, "optimizer": optimizer}
        if backbone_optimizer is not None:
            trackables["backbone_optimizer"] = backbone_optimizer
        checkpoint = tf.train.Checkpoint(**trackables)

    checkpoint_dir = os.path.join(workdir, "checkpoints")
    # Every worker saves (the save is collective); only the chief's copy is the real one.
    save_dir = checkpoint_dir if chief else os.path.join(
        checkpoint_dir, f".worker_{strategy.cluster_resolver.task_id}")
    manager = tf.train.CheckpointManager(checkpoint, save_dir, max_to_keep=3)
    latest = workdir_lib.newest_readable_checkpoint(checkpoint_dir, log, repair=chief)
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
    step = int(optimizer.iterations.numpy())
    if latest:
        log(f"resumed from {latest} at step {step}")

    def dataset_fn(context):
        return input_pipeline.train_dataset(
            splits["train"], config.image_size, config.identities_per_batch,
            config.images_per_identity, seed=config.seed,
            augmentation=input_pipeline.Augmentation(config.flip, config.pad,
                                                     config.random_erasing),
            input_context=context, start_batch=step)

    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    train_step = make_train_step(model, optimizer, strategy, config.global_batch_size,
                                 config.part_loss_weight, config.label_smoothing,
                                 backbone_optimizer, jit_compile=config.jit_compile)
    tensorboard_dir = os.path.join(workdir, "tensorboard")
    if chief:
        train_writer = tf.summary.create_file_writer(os.path.join(tensorboard_dir, "train"))
        eval_writer = tf.summary.create_file_writer(os.path.join(tensorboard_dir, "eval"))
    else:
        train_writer = eval_writer = tf.summary.create_noop_writer()
    preview = next(iter(input_pipeline.eval_dataset(splits["train"], config.image_size, 8)))["image"]
    dataset_tag = config.dataset.replace("/", "_").replace(":", "_")

    log(f"training {config.backbone} PL-Net K={config.num_parts} ({config.part_strategy}) on "
        f"{config.dataset}: {len(splits['train'])} images, {num_classes} identities; "
        f"{total_steps} steps of {config.global_batch_size} ({steps_per_epoch} steps/epoch) on "
        f"{replicas} replica(s); workdir {workdir}")
    if step == 0:
        with train_writer.as_default(step=0):
            tf.summary.text("flags", _flags_markdown(config))

    validation = "val_query" in splits
    curve_path = os.path.join(workdir, "validation_curve.json")
    curve = []
    if validation and os.path.exists(curve_path):
        with open(curve_path) as f:  # earlier evaluations of a resumed run
            curve = [point for point in json.load(f) if point["step"] <= step]
    if validation:
        log(f"validation: {len(splits['val_query'])} queries, {len(splits['val_gallery'])} "
            f"gallery images of {len(splits['val_query'].identities)} held-out training "
            "identities")

    def run_eval(split="test"):
        """Evaluates on `split` ("test" or "validation"); logs, summarises, returns metrics."""
        names = ("val_query", "val_gallery") if split == "validation" else ("query", "gallery")
        metrics = evaluate_model(model, splits[names[0]], splits[names[1]], config)
        tag = f"{dataset_tag}/validation" if split == "validation" else dataset_tag
        consistency = metrics.get("part_consistency")
        with eval_writer.as_default(step=step):
            tf.summary.scalar(f"eval/{tag}/rank1", metrics["rank1"])
            tf.summary.scalar(f"eval/{tag}/mAP", metrics["mAP"])
            for name, values in metrics["descriptors"].items():
                if name != "embedding":
                    tf.summary.scalar(f"eval/{tag}/{name}/mAP", values["mAP"])
            for name, value in (consistency or {}).items():
                tf.summary.scalar(f"eval/{tag}/part_consistency/{name}", value)
        line = (f"eval ({split}) step {step}: rank-1 {metrics['rank1']:.4f}  "
                f"mAP {metrics['mAP']:.4f}  (queries {metrics['num_valid']}, skipped "
                f"{metrics['num_skipped']})")
        if consistency:
            line += (f"  parts: IoU {consistency['mean_iou']:.3f} ordered "
                     f"{consistency['ordered_fraction']:.3f}")
        log(line)
        if split == "validation" and chief:
            curve.append({"step": step, "epoch": step / steps_per_epoch,
                          "rank1": metrics["rank1"], "mAP": metrics["mAP"],
                          "descriptors": metrics["descriptors"],
                          "part_consistency": consistency})
            workdir_lib.write_atomically(curve_path, json.dumps(curve, indent=1))
        return metrics

    start_time, start_step = time.perf_counter(), step
    train_seconds = 0.0  # in training steps only: no evaluation, checkpoints or summaries
    while step < total_steps:
        cadence = (config.log_every, config.checkpoint_every, config.eval_every,
                   config.image_summary_every, config.max_steps_per_call)
        num_steps = steps_to_next(step, cadence, total_steps)
        call_start = time.perf_counter()
        metrics = train_step(iterator, tf.constant(num_steps))
        first_bad = int(metrics["first_bad_step"])
        if first_bad >= 0:
            raise FloatingPointError(
                f"non-finite loss at step {step + first_bad + 1}: training stopped; the last "
                f"checkpoint ({manager.latest_checkpoint}) is intact.")
        step += num_steps
        call_seconds = time.perf_counter() - call_start
        train_seconds += call_seconds
        images_per_second = num_steps * config.global_batch_size / call_seconds
        if every(step, config.log_every) or step == total_steps:
            elapsed = time.perf_counter() - start_time
            remaining = elapsed / (step - start_step) * (total_steps - step)
            parts = " ".join(f"{v:.2f}" for v in metrics["part_losses"].numpy())
            log(f"step {step}/{total_steps}  loss {float(metrics['loss']):.4f}  "
                f"global {float(metrics['global_loss']):.4f}  part {float(metrics['part_loss']):.4f}"
                f" [{parts}]  acc {float(metrics['global_accuracy']):.3f}  "
                f"{images_per_second:.1f} img/s  ETA {_format_duration(remaining)}")
            with train_writer.as_default(step=step):
                for name in ("loss", "global_loss", "part_loss", "global_accuracy"):
                    tf.summary.scalar(f"train/{name}", metrics[name])
                for k in range(config.num_parts):
                    tf.summary.scalar(f"train/part_{k + 1}_loss", metrics["part_losses"][k])
                    tf.summary.scalar(f"train/part_{k + 1}_accuracy",
                                      metrics["part_accuracies"][k])
                tf.summary.scalar("train/learning_rate", optimizer.learning_rate)
                tf.summary.scalar("train/images_per_second", images_per_second)
        if every(step, config.image_summary_every) or step == total_steps:
            masks = model(preview, training=False)["part_masks"]
            with train_writer.as_default(step=step):
                tf.summary.image("train/part_masks", visualize.overlay_part_masks(preview, masks),
                                 max_outputs=8)
        if every(step, config.checkpoint_every) or step == total_steps:
            manager.save(checkpoint_number=step)
        if every(step, config.eval_every) and step < total_steps and chief:
            run_eval("validation" if validation else "test")

    results = {"step": step, "epochs": step / steps_per_epoch, "dataset": config.dataset,
               "num_parts": config.num_parts, "part_strategy": config.part_strategy,
               "train_seconds": train_seconds,  # this call's steps, mean over them:
               "train_images_per_second":
                   (step - start_step) * config.global_batch_size / max(train_seconds, 1e-9)}
    if chief:
        if validation:
            if not curve or curve[-1]["step"] != step:
                run_eval("validation")
            results["validation"] = {key: curve[-1][key] for key in
                                     ("rank1", "mAP", "descriptors", "part_consistency")}
            results["validation_curve"] = [{k: p[k] for k in ("step", "epoch", "rank1", "mAP")}
                                           for p in curve]
        metrics = run_eval() if config.final_eval else None
    if chief and metrics is not None:
        results.update(rank1=metrics["rank1"], mAP=metrics["mAP"], mINP=metrics["mINP"],
                       cmc=[float(v) for v in metrics["cmc"][:20]],
                       num_queries=metrics["num_valid"], skipped_queries=metrics["num_skipped"],
                       descriptors=metrics["descriptors"],
                       part_consistency=metrics.get("part_consistency"))
    if config.export:
        export_dir = os.path.join(workdir, "export")
        if not chief:  # every worker saves, as MultiWorkerMirroredStrategy expects; one keeps it
            export_dir = os.path.join(workdir, f".export_worker_{strategy.cluster_resolver.task_id}")
        version = step
        path = os.path.join(export_dir, str(version))
        if os.path.exists(path):
            log(f"export {path} already exists")
        else:
            path = export.export_model(model, export_dir, version)
            log(f"exported {path}")
        if not chief:
            shutil.rmtree(export_dir, ignore_errors=True)
        results["export"] = path if chief else None
    for writer in (train_writer, eval_writer):
        writer.flush()
    if chief:
        workdir_lib.write_atomically(os.path.join(workdir, "results.json"),
                                     json.dumps(results, indent=2))
    return results
