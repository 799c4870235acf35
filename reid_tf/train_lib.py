"""Training: strategies and the distributed PL-Net train step."""

import tensorflow as tf

from reid_tf import losses

STRATEGIES = ("default", "mirrored", "multi_worker")


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

    `cpu_replicas > 0` mirrors over that many logical CPU devices (no GPU needed).
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


def make_train_step(model, optimizer, strategy, global_batch_size, part_loss_weight=1.0,
                    label_smoothing=0.0):
    """Builds `train_step(iterator, num_steps)`: `num_steps` distributed steps in one tf.function.

    Returns per-call metrics (means over the global batch of the last step): `loss`,
    `global_loss`, `part_loss`, `part_losses [K]`, `global_accuracy`, `part_accuracies [K]`.
    Build the optimizer's variables inside `strategy.scope()` before the first call.
    """

    def replica_step(batch):
        images, labels = batch["image"], batch["label"]
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            terms = losses.plnet_loss(labels, outputs, part_loss_weight, label_smoothing)
            loss = tf.nn.compute_average_loss(terms["loss"], global_batch_size=global_batch_size)
            scaled = optimizer.scale_loss(loss)  # loss scaling under mixed precision, else as is
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))

        def batch_mean(values):
            return tf.reduce_sum(values, axis=0) / global_batch_size

        labels = tf.cast(labels, tf.int64)
        global_hits = tf.cast(tf.equal(tf.argmax(outputs["global_logits"], -1), labels), tf.float32)
        part_hits = tf.cast(tf.equal(tf.argmax(outputs["part_logits"], -1), labels[:, None]),
                            tf.float32)
        return {
            "loss": batch_mean(terms["loss"]),
            "global_loss": batch_mean(terms["global_loss"]),
            "part_loss": batch_mean(terms["part_loss"]),
            "part_losses": batch_mean(terms["part_losses"]),
            "global_accuracy": batch_mean(global_hits),
            "part_accuracies": batch_mean(part_hits),
        }

    @tf.function
    def train_step(iterator, num_steps):
        for _ in tf.range(num_steps - 1):
            strategy.run(replica_step, args=(next(iterator),))
        metrics = strategy.run(replica_step, args=(next(iterator),))
        return {name: strategy.reduce("SUM", value, axis=None) for name, value in metrics.items()}

    return train_step
