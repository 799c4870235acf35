"""Distribution: the `tf.distribute` strategy of a run, logical CPU devices for tests, and which
worker is the chief."""

import tensorflow as tf

from reid_tf.train import config


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
    """Returns the `tf.distribute` strategy called `name` (one of `config.STRATEGIES`).

    `cpu_replicas > 0` mirrors over that many logical CPU devices (no GPU needed);
    `multi_worker` reads the cluster from TF_CONFIG.
    """
    if name not in config.STRATEGIES:
        raise ValueError(f"strategy={name!r}: expected one of {config.STRATEGIES}.")
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
