"""`train_and_evaluate(config, workdir)`: a tf.distribute custom loop with hooks.

The workdir holds everything a run writes (`config.json`, `flags.txt`, `checkpoints/`,
`tensorboard/{train,eval}/`, `export/<version>/`, `results.json`); running the same command
again resumes from its latest checkpoint.
"""

import contextlib
import dataclasses
import os
import time

import keras
import numpy as np
import tensorflow as tf

from reid_tf.data import pipeline
from reid_tf.data import splits as splits_lib
from reid_tf.model import PartLossNet
from reid_tf.train import distribute
from reid_tf.train import hooks as hooks_lib
from reid_tf.train import optim
from reid_tf.train import workdir as workdir_lib
from reid_tf.train.step import make_train_step


def steps_to_next(step, periods, total):
    """Steps to run before the next cadence boundary or the end of training."""
    candidates = [total - step] + [p - step % p for p in periods if p]
    return max(1, min(candidates))


@contextlib.contextmanager
def precision(mixed_precision):
    """Keras's global dtype policy for `mixed_precision` ("none", "bfloat16", "float16"),
    restored on exit, so what runs afterwards (the export) computes in float32 again."""
    previous = keras.mixed_precision.global_policy()
    if mixed_precision != "none":
        keras.mixed_precision.set_global_policy(f"mixed_{mixed_precision}")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


@dataclasses.dataclass
class Data:
    """A run's splits and its length in steps."""

    splits: dict
    num_classes: int
    steps_per_epoch: int
    total_steps: int


def build_data(config, log=print):
    """The splits of `config.dataset` (with validation identities held out) and the schedule's
    length. ValueError names a missing split. A run that evaluates on validation only
    (`--validation_identities` with `--nofinal_eval`: a hyper-parameter search trial) never
    opens the test split: a folder dataset's query and gallery are not even listed."""
    needed = ("train", "query", "gallery")
    if config.validation_identities and not config.final_eval:
        needed = ("train",)
    splits = splits_lib.load_splits(config.dataset, config.data_dir, config.manual_dir,
                                    config.skip_corrupt, log, config.validation_identities,
                                    config.validation_seed, config.cache_in_memory,
                                    splits=needed)
    for split in needed:
        if split not in splits:
            raise ValueError(f"--dataset={config.dataset}: has no {split!r} split.")
    train_labels, num_classes = splits_lib.relabel(splits["train"].person_ids)
    epoch_length = len(pipeline.pk_epoch(
        train_labels, config.identities_per_batch, config.images_per_identity,
        np.random.default_rng([config.seed, 0])))
    steps_per_epoch = max(1, epoch_length // config.global_batch_size)
    return Data(splits, num_classes, steps_per_epoch,
                config.train_steps or config.epochs * steps_per_epoch)


def load_other(config, dataset, train_split, log=print):
    """The query and gallery splits of another dataset, for `--also_evaluate_on`.

    ValueError when one is missing, or when its query identities include a training identity
    (person ids compared as numbers, as in datasets that share one numbering: a figure on
    people the model was trained on is no test).
    """
    splits = splits_lib.load_splits(dataset, config.data_dir, config.manual_dir,
                                    config.skip_corrupt, log)
    missing = [name for name in ("query", "gallery") if name not in splits]
    if missing:
        raise ValueError(f"--also_evaluate_on={dataset}: has no {' or '.join(missing)} split.")
    seen = set(np.asarray(train_split.person_ids).tolist())
    shared = sorted(seen & set(np.asarray(splits["query"].person_ids).tolist()))
    if shared:
        raise ValueError(f"--also_evaluate_on={dataset}: {len(shared)} of its query identities "
                         f"are training identities (e.g. {shared[:5]}).")
    return splits


def build_model(config, num_classes, replicas=1):
    """The run's `PartLossNet` (under the current dtype policy), built."""
    model = PartLossNet(
        num_classes=num_classes, num_parts=config.num_parts,
        part_strategy=config.part_strategy, embedding_dim=config.embedding_dim,
        backbone=config.backbone, image_size=config.image_size,
        backbone_weights=config.weights, last_stride=config.last_stride,
        kmeans_iterations=config.kmeans_iterations, part_teacher=config.part_teacher,
        # The P×K batch is split across replicas: normalise over the whole batch, and keep one
        # set of moving statistics on every replica and worker.
        sync_batch_norm=replicas > 1)
    model.build()
    return model


def build_optimizer(config, model, total_steps):
    """The run's one optimizer over `model`'s variables (call in the strategy's scope)."""
    boundaries = config.lr_decay_steps or (int(0.6 * total_steps), int(0.85 * total_steps))
    schedule = optim.WarmupThenDecay(
        config.learning_rate, total_steps=total_steps, warmup_steps=config.warmup_steps,
        schedule=config.schedule, boundaries=boundaries, decay_factor=config.lr_decay_factor)
    optimizer = optim.build_optimizer(
        config.optimizer, schedule, config.weight_decay,
        optim.parameter_groups(model, config.backbone_lr_multiplier),
        loss_scale=config.mixed_precision == "float16")
    optimizer.build(model.trainable_variables)
    return optimizer


def checkpoint_of(model, optimizer):
    """What a checkpoint holds: the model, the optimizer (its step counter included) and the
    count of steps loss scaling skipped."""
    skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps",
                          aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    return tf.train.Checkpoint(model=model, optimizer=optimizer, skipped_steps=skipped)


def restore(checkpoint, checkpoint_dir, chief, log):
    """Restores the newest readable checkpoint, if any; returns its path or None."""
    latest = workdir_lib.newest_readable_checkpoint(checkpoint_dir, log, repair=chief)
    if latest:
        if any(name.startswith("backbone_optimizer/") for name, _ in
               tf.train.list_variables(latest)):
            raise ValueError(f"{latest}: written by an older reid-tf with a second (backbone) "
                             "optimizer; it cannot resume here: use another --workdir.")
        checkpoint.restore(latest).assert_existing_objects_matched()
    return latest


class LostWorker(RuntimeError):
    """Another worker of a multi-worker run stopped: the collectives cannot go on."""


def train_and_evaluate(config, workdir, log=print, flags_text=None, hooks=()):
    """Trains PL-Net as `config` says, evaluates, exports; resumes from `workdir` if it can.

    `flags_text` (the command's flags) is saved as `workdir/flags.txt`. `hooks`: more
    `hooks.Hook`s, called after the built-in ones at their own boundaries (their `total_steps`
    is set to the run's when left None). Returns the results dict also written to
    `workdir/results.json`.
    """
    # Every check before anything is written: a refused start leaves the workdir as it was.
    config.validate()
    workdir_lib.check_usable(workdir)
    workdir_lib.check_config(workdir, config)
    strategy = distribute.make_strategy(config.strategy, config.cpu_replicas)
    chief = distribute.is_chief(strategy)
    replicas = strategy.num_replicas_in_sync
    if config.global_batch_size % replicas:
        raise ValueError(f"batch P*K={config.global_batch_size} (--identities_per_batch="
                         f"{config.identities_per_batch} x --images_per_identity="
                         f"{config.images_per_identity}) does not divide over {replicas} replicas.")
    with precision(config.mixed_precision):
        keras.utils.set_random_seed(config.seed)
        data = build_data(config, log)
        with strategy.scope():
            model = build_model(config, data.num_classes, replicas)
            if chief:  # the checks passed: config.json, flags.txt, model.json (how to rebuild it)
                workdir_lib.record(workdir, config, model.get_config(), flags_text)
            optimizer = build_optimizer(config, model, data.total_steps)
            checkpoint = checkpoint_of(model, optimizer)
        writer = hooks_lib.ResultsWriter(os.path.join(workdir, "results.json"), chief)
        results = _train(config, workdir, strategy, chief, data, model, optimizer, checkpoint,
                         log, (*hooks, writer))  # written before the export: its card has them
    if config.export and chief:  # in float32 whatever the training policy: reid-export's model
        path = os.path.join(workdir, "export", str(results["step"]))
        if os.path.exists(path):
            log(f"export {path} already exists")
        else:
            path, _ = workdir_lib.export_latest(workdir, log=log)
            log(f"exported {path}")
        results["export"] = path
        writer.write(results)
    return results


def _step_function(config, model, optimizer, strategy):
    """The compiled training step of `config`'s loss terms."""
    return make_train_step(model, optimizer, strategy, config.global_batch_size,
                           config.part_loss_weight, config.label_smoothing,
                           jit_compile=config.jit_compile,
                           triplet_weight=config.triplet_weight,
                           triplet_margin=config.triplet_margin,
                           part_triplet=config.part_triplet,
                           triplet_normalize=config.triplet_normalize,
                           part_assignment_weight=config.part_assignment_weight
                           if model.learned else 0.0)


def _train(config, workdir, strategy, chief, data, model, optimizer, checkpoint, log,
           extra_hooks=()):
    """The loop: restore, run steps until the end calling the hooks at their boundaries, then
    the final evaluations. Returns the results (without the export)."""
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    # Every worker saves (the save is collective); only the chief's copy is the real one.
    save_dir = checkpoint_dir if chief else os.path.join(
        checkpoint_dir, f".worker_{strategy.cluster_resolver.task_id}")
    manager = tf.train.CheckpointManager(checkpoint, save_dir, max_to_keep=3)
    latest = restore(checkpoint, checkpoint_dir, chief, log)
    step = int(optimizer.iterations.numpy())
    if latest:
        log(f"resumed from {latest} at step {step}")

    def dataset_fn(context):
        return pipeline.train_dataset(
            data.splits["train"], config.image_size, config.identities_per_batch,
            config.images_per_identity, seed=config.seed,
            augmentation=pipeline.Augmentation(config.flip, config.pad, config.random_erasing),
            input_context=context, start_batch=step)

    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    train_step = _step_function(config, model, optimizer, strategy)
    writers = {name: tf.summary.create_file_writer(os.path.join(workdir, "tensorboard", name))
               if chief else tf.summary.create_noop_writer() for name in ("train", "eval")}
    splits, total = data.splits, data.total_steps
    others = {dataset: load_other(config, dataset, splits["train"], log)  # refused before training
              for dataset in config.also_evaluate_on} if chief and config.final_eval else {}
    preview = next(iter(pipeline.eval_dataset(splits["train"], config.image_size, 8)))["image"]
    log(f"training {config.backbone} PL-Net K={config.num_parts} ({config.part_strategy}) on "
        f"{config.dataset}: {len(splits['train'])} images, {data.num_classes} identities; "
        f"{total} steps of {config.global_batch_size} ({data.steps_per_epoch} steps/epoch) on "
        f"{strategy.num_replicas_in_sync} replica(s); workdir {workdir}")
    if step == 0:
        with writers["train"].as_default(step=0):
            tf.summary.text("flags", hooks_lib.flags_markdown(config))
    evaluation = _evaluation(config, workdir, data, model, step, writers["eval"], chief, log)
    ends = [hooks_lib.Calibration(evaluation, workdir), hooks_lib.OtherDatasets(evaluation, others)]
    skipped_steps = checkpoint.skipped_steps
    hooks = [hooks_lib.Progress(config.log_every, total, step, config.global_batch_size,
                                config.num_parts, optimizer, skipped_steps, writers["train"],
                                log),
             hooks_lib.PartMaskPictures(config.image_summary_every, total, model, preview,
                                        writers["train"]),
             hooks_lib.Checkpoints(config.checkpoint_every, total, manager),
             evaluation]
    if model.learned:
        induction = hooks_lib.PartInduction(int(round(config.part_induction * total)), total,
                                            model)
        induction.start(step)
        hooks.append(induction)
    for hook in (*ends, *extra_hooks):
        hook.total_steps = total if hook.total_steps is None else hook.total_steps
        hooks.append(hook)

    start_step, train_seconds = step, 0.0  # in training steps only: no hooks
    try:
        step, train_seconds = _steps(step, total, train_seconds, config, hooks, iterator,
                                     train_step, manager, skipped_steps)
    finally:  # what was logged up to a failure is on disk (reid-train then ends at once)
        for writer in writers.values():
            writer.flush()

    results = {"step": step, "epochs": step / data.steps_per_epoch, "dataset": config.dataset,
               "num_parts": config.num_parts, "part_strategy": config.part_strategy,
               "train_seconds": train_seconds,  # this call's steps, mean over them:
               "train_images_per_second":
                   (step - start_step) * config.global_batch_size / max(train_seconds, 1e-9),
               "skipped_steps": int(skipped_steps.numpy()),
               "train_identities": data.num_classes,  # a training-identities curve's x
               "held_out_identities": len(data.splits["val_query"].identities)
               if "val_query" in data.splits else 0}
    if chief:  # results.json: each hook adds its part, the last (ResultsWriter) writes it
        for hook in hooks:
            hook.end(step, results)
    for writer in writers.values():
        writer.flush()
    return results


def _evaluation(config, workdir, data, model, step, writer, chief, log):
    """The evaluation hook, resumed at `step` (its validation curve up to it kept)."""
    splits = data.splits
    evaluation = hooks_lib.Evaluation(config.eval_every, data.total_steps, model, splits, config,
                                      data.steps_per_epoch, workdir, writer, chief, log)
    evaluation.resume(step)
    if evaluation.validation:
        log(f"validation: {len(splits['val_query'])} queries, {len(splits['val_gallery'])} "
            f"gallery images of {len(splits['val_query'].identities)} held-out training "
            "identities")
    return evaluation


def _steps(step, total, train_seconds, config, hooks, iterator, train_step, manager,
           skipped_steps):
    """Training steps from `step` to `total`, the hooks at their boundaries; returns
    `(step, seconds spent in training steps)`."""
    while step < total:
        num_steps = steps_to_next(step, [hook.every for hook in hooks]
                                  + [config.max_steps_per_call], total)
        call_start = time.perf_counter()
        try:
            metrics = train_step(iterator, tf.constant(num_steps))
        except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError) as error:
            # Under MultiWorkerMirroredStrategy, a lost peer aborts every collective: this
            # worker cannot go on alone, and every worker must start again together.
            reason = str(error.message).strip().splitlines()[0]
            raise LostWorker(
                f"a worker was lost after step {step} ({reason}); start every worker again "
                f"with the same command: they resume from {manager.latest_checkpoint}.") from None
        first_bad = int(metrics["first_bad_step"])
        if first_bad >= 0:
            raise FloatingPointError(
                f"non-finite loss at step {step + first_bad + 1}: training stopped; the last "
                f"checkpoint ({manager.latest_checkpoint}) is intact.")
        step += num_steps
        call_seconds = time.perf_counter() - call_start
        train_seconds += call_seconds
        skipped_steps.assign_add(metrics["skipped_steps"])
        for hook in hooks:
            hook.after_steps(step, metrics, num_steps * config.global_batch_size / call_seconds)
    return step, train_seconds
