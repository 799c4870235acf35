"""The training step: `make_train_step(...)(iterator, n)` runs n distributed steps in one
`tf.function` (orbit style) and returns their metrics."""

import keras
import tensorflow as tf

from reid_tf.model import losses


def make_train_step(model, optimizer, strategy, global_batch_size, part_loss_weight=1.0,
                    label_smoothing=0.0, jit_compile=False, loss_fn=None, **loss_options):
    """Builds `train_step(iterator, num_steps)`: `num_steps` distributed steps in one tf.function.

    Returns the metrics averaged over those steps: `loss`, `global_loss`, `part_loss`,
    `part_losses [K]`, `global_accuracy`, `part_accuracies [K]`; `skipped_steps`, how many of
    them loss scaling skipped (a non-finite float16 gradient: no variable changed); and
    `first_bad_step` (the 0-based offset of the first step with a non-finite loss, -1 if none).
    `optimizer` is the run's one optimizer (`optim.build_optimizer`); build its variables inside
    `strategy.scope()` before the first call. A skipped step still advances `iterations`, so the
    step counter stays the number of batches consumed (the resume position and the schedule).
    `jit_compile` compiles the replica step with XLA.

    `loss_fn(labels, outputs, gather)` returns named per-example terms, `loss` the one
    minimised; every term is a metric under its name, beside `losses.training_metrics`. Default:
    `losses.plnet_loss` with `part_loss_weight`, `label_smoothing` and `loss_options` (the
    triplet settings, `part_assignment_weight`).
    With a `triplet_weight`, the metrics add `triplet_loss` (and `part_triplet_loss` with
    `part_triplet`); with a `part_assignment_weight`, `part_assignment_loss`. The hardest positives and negatives are mined over
    the global batch, not per replica: each replica all-gathers the features and labels of every
    replica (an all-gather whose gradient sums back to each replica's own rows), so a run on R
    replicas computes the loss and gradients of the same run on one device. Mining per replica
    would mine among B/R examples instead, a loss that changes with the number of devices.
    """
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    if loss_fn is None:
        def loss_fn(labels, outputs, gather):
            return losses.plnet_loss(labels, outputs, part_loss_weight, label_smoothing,
                                     gather=gather, **loss_options)

    def apply(pairs):
        if not scaled:
            optimizer.apply_gradients(pairs)
            return tf.constant(0.0)
        before = tf.identity(optimizer.iterations)
        optimizer.apply_gradients(pairs)
        skipped = tf.cast(tf.equal(optimizer.iterations, before), optimizer.iterations.dtype)
        optimizer.inner_optimizer.iterations.assign_add(skipped)
        return tf.cast(skipped, tf.float32)

    def gather(value):
        if strategy.num_replicas_in_sync == 1:
            return value
        return tf.distribute.get_replica_context().all_gather(value, axis=0)

    def replica_step(batch):
        images, labels = batch["image"], batch["label"]
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            terms = loss_fn(labels, outputs, gather)
            loss = tf.nn.compute_average_loss(terms["loss"], global_batch_size=global_batch_size)
            objective = optimizer.scale_loss(loss) if scaled else loss
        variables = model.trainable_variables
        gradients = tape.gradient(objective, variables)
        skipped = apply(list(zip(gradients, variables)))

        def batch_mean(values):
            return tf.reduce_sum(tf.cast(values, tf.float32), axis=0) / global_batch_size

        measured = {**terms, **losses.training_metrics(labels, outputs)}
        return {name: batch_mean(value) for name, value in measured.items()}, skipped

    if jit_compile:
        replica_step = tf.function(replica_step, jit_compile=True)

    def one_step(iterator):
        sums, skipped = strategy.run(replica_step, args=(next(iterator),))
        metrics = {name: strategy.reduce("SUM", value, axis=None) for name, value in sums.items()}
        # Every replica applies the same all-reduced gradients, so each saw the same skip.
        metrics["skipped_steps"] = strategy.reduce("MEAN", skipped, axis=None)
        return metrics

    # A function of its own, called at one place: the step's graph is traced and optimised once
    # (called once before the loop and once in it, it was traced twice: half of the start-up).
    step_function = tf.function(one_step)
    return tf.function(lambda iterator, num_steps: _steps(step_function, iterator, num_steps))


def _steps(one_step, iterator, num_steps):
    """`num_steps` (>= 1) calls of `one_step`, a `tf.function`, in one graph: their metrics
    averaged, the skipped steps summed, and the offset of the first with a non-finite loss (-1
    if none)."""
    outputs = one_step.get_concrete_function(iterator).structured_outputs
    totals = {name: tf.zeros(value.shape, value.dtype) for name, value in outputs.items()}
    first_bad = tf.constant(-1)
    for offset in tf.range(num_steps):
        metrics = one_step(iterator)
        first_bad = tf.where((first_bad < 0) & ~tf.math.is_finite(metrics["loss"]),
                             offset, first_bad)
        totals = {name: totals[name] + metrics[name] for name in totals}
    means = {name: value / tf.cast(num_steps, tf.float32) for name, value in totals.items()
             if name != "skipped_steps"}
    return {**means, "skipped_steps": tf.cast(tf.round(totals["skipped_steps"]), tf.int64),
            "first_bad_step": first_bad}
