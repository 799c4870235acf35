"""The optimizer: one Keras optimizer whose variables fall into parameter groups, each with its
own learning-rate and weight-decay factor (as fast-reid's solver builds them), and the
learning-rate schedule.

Groups are data (`parameter_groups`): the backbone's learning-rate factor
(`--backbone_lr_multiplier`) and the variables kept out of weight decay (biases, BatchNorm
scales and offsets: factor 0). Under float16 the optimizer is wrapped once in Keras's
`LossScaleOptimizer`, so there is one dynamic loss scale for every variable.
"""

import dataclasses
import math

import keras
import tensorflow as tf

# Variables whose names hold one of these are never decayed (biases, BatchNorm scales and
# offsets), as Keras's `exclude_from_weight_decay(var_names=...)` matches them.
NO_DECAY_NAMES = ("bias", "gamma", "beta")


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

    def scaled(self, factor):
        """The same schedule with its peak multiplied by `factor` (a parameter group's)."""
        return WarmupThenDecay(self.learning_rate * factor, self.total_steps, self.warmup_steps,
                               self.schedule, self.boundaries, self.decay_factor)


@dataclasses.dataclass(frozen=True)
class ParameterGroup:
    """Variables that share a learning-rate factor and a weight-decay factor."""

    variables: tuple
    learning_rate_factor: float = 1.0
    weight_decay_factor: float = 1.0


def parameter_groups(model, backbone_lr_multiplier=1.0):
    """A `PartLossNet`'s groups: backbone and heads, each split into decayed variables and the
    biases/BatchNorm parameters that are not (`NO_DECAY_NAMES`)."""
    backbone = {id(v) for v in model.backbone.trainable_variables}
    groups = {}
    for variable in model.trainable_variables:
        lr_factor = backbone_lr_multiplier if id(variable) in backbone else 1.0
        decay_factor = 0.0 if any(n in variable.name for n in NO_DECAY_NAMES) else 1.0
        groups.setdefault((lr_factor, decay_factor), []).append(variable)
    return [ParameterGroup(tuple(variables), lr, decay)
            for (lr, decay), variables in groups.items()]


class GroupedOptimizer:
    """Mixed in before a Keras optimizer class: per-variable learning-rate and weight-decay
    factors from `ParameterGroup`s (`set_groups`); variables in no group get factors 1.

    A group's learning rate is the schedule's `scaled(factor)` at the current step (or the
    learning rate times the factor, for other schedules); its decoupled weight decay is
    `variable * weight_decay * weight_decay_factor * group learning rate`, as Keras decays.
    """

    def set_groups(self, groups):
        self._group_factors = {self._var_key(variable): (group.learning_rate_factor,
                                                         group.weight_decay_factor)
                               for group in groups for variable in group.variables}

    def _factors(self, variable):
        return getattr(self, "_group_factors", {}).get(self._var_key(variable), (1.0, 1.0))

    def _group_learning_rate(self, factor, learning_rate):
        if factor == 1.0:
            return learning_rate
        if isinstance(self._learning_rate, WarmupThenDecay):
            return self._learning_rate.scaled(factor)(self._iterations)
        return learning_rate * factor

    def update_step(self, gradient, variable, learning_rate):
        factor, _ = self._factors(variable)
        return super().update_step(gradient, variable,
                                   self._group_learning_rate(factor, learning_rate))

    def _apply_weight_decay(self, variables):
        if self.weight_decay is None:
            return

        def decay(distribution, variables):
            def decay_one(variable):
                lr_factor, decay_factor = self._factors(variable)
                if not decay_factor:
                    return
                learning_rate = tf.cast(
                    self._group_learning_rate(lr_factor, self.learning_rate), variable.dtype)
                weight_decay = tf.cast(self.weight_decay, variable.dtype)
                if decay_factor != 1.0:
                    weight_decay = weight_decay * decay_factor
                variable.assign_sub(variable * weight_decay * learning_rate)

            for variable in variables:
                if isinstance(variable, keras.Variable):
                    variable = variable.value
                distribution.extended.update(variable, decay_one, group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(
            decay, self._distribution_strategy, variables)


# Keras arguments of each optimizer: SGD with Nesterov momentum 0.9; Adam; AdamW.
OPTIMIZER_ARGUMENTS = {
    "sgd": lambda schedule, weight_decay: dict(learning_rate=schedule, momentum=0.9,
                                               nesterov=True, weight_decay=weight_decay or None),
    "adam": lambda schedule, weight_decay: dict(learning_rate=schedule,
                                                weight_decay=weight_decay or None),
    "adamw": lambda schedule, weight_decay: dict(learning_rate=schedule,
                                                 weight_decay=weight_decay),
}
_CLASSES = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam,
            "adamw": keras.optimizers.AdamW}


def grouped_class(name):
    """The Keras optimizer class called `name` with `GroupedOptimizer` mixed in."""
    base = _CLASSES[name]
    return type(f"Grouped{base.__name__}", (GroupedOptimizer, base), {})


def build_optimizer(name, schedule, weight_decay, groups, loss_scale=False):
    """The one optimizer of a run: `name` (sgd with Nesterov momentum 0.9, adam, adamw) over
    `schedule`, with decoupled `weight_decay` and the `groups`' factors; wrapped in a
    `keras.optimizers.LossScaleOptimizer` when `loss_scale` (float16). Build its variables in
    the strategy's scope before the first step."""
    if name not in _CLASSES:
        raise ValueError(f"optimizer={name!r}: expected one of {tuple(_CLASSES)}.")
    optimizer = grouped_class(name)(**OPTIMIZER_ARGUMENTS[name](schedule, weight_decay))
    optimizer.set_groups(groups)
    if loss_scale:  # float16 gradients underflow without it
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def inner(optimizer):
    """The optimizer itself, under a LossScaleOptimizer if there is one."""
    return getattr(optimizer, "inner_optimizer", optimizer)
