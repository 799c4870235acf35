"""Where a training step's time goes: a TensorFlow profiler trace of the baseline recipe's step.

The CUHK03 baseline recipe's step (torchvision-layout MobileNetV2, 128x64, batch 64, K=0, Adam,
random pixels in one cached batch, so only the model is traced) runs --warmup steps, then
--steps under `tf.profiler.experimental`; the trace is read back with xprof's converter
(`pip install tensorboard-plugin-profile`, a benchmark-only tool, not a reid-tf dependency) and
the op types with the most self time on the host are printed, with their share. With
--keras_batch_norm the backbone's batch norm runs Keras's own unfused path, as before
`normalization.FusedBatchNormalization`. With --mixed_precision=bfloat16 the step runs under
the trainer's policy (`train.loop.precision`: Keras's `mixed_bfloat16`), so the two traces say
where bfloat16's time goes against float32's (casts, ops without bfloat16 kernels); the line
before the table says whether the CPU has bfloat16 units (AVX512-BF16, AMX).

    python benchmarks/profile_train.py [--keras_batch_norm] [--mixed_precision=bfloat16]
        [--logdir=/tmp/profile_train]
"""

import collections
import csv
import glob
import io
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from reid_tf import testing  # noqa: E402
from reid_tf import model as model_lib  # noqa: E402
from reid_tf.model import normalization  # noqa: E402
from reid_tf.train import loop  # noqa: E402
from reid_tf.train import step as step_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("keras_batch_norm", False, "Keras's unfused batch norm (the old path).")
flags.DEFINE_integer("warmup", 3, "Untraced steps first.")
flags.DEFINE_integer("steps", 5, "Traced steps.")
flags.DEFINE_integer("top", 12, "Op types to print.")
flags.DEFINE_string("logdir", "/tmp/profile_train", "Where the trace goes.")
flags.DEFINE_enum("mixed_precision", "none", ["none", "bfloat16"], "The trainer's policy.")


def op_type_self_times(logdir):
    """{op type: host self-time in microseconds} from the newest trace under `logdir`."""
    from xprof.convert import raw_to_tool_data

    path = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")))[-1]
    data, _ = raw_to_tool_data.xspace_to_tool_data([path], "framework_op_stats^", {})
    if isinstance(data, bytes):
        data = data.decode()
    totals = collections.Counter()
    if data.lstrip().startswith("{") or data.lstrip().startswith("["):
        tables = json.loads(data)
        table = tables[0] if isinstance(tables, list) else tables
        names = [column["id"] for column in table["cols"]]
        for row in table["rows"]:
            values = dict(zip(names, [cell.get("v") if cell else None for cell in row["c"]]))
            if values.get("host_or_device", "Host") == "Host":
                totals[values["type"]] += float(values["total_self_time"])
    else:  # CSV
        for values in csv.DictReader(io.StringIO(data)):
            if values.get("Host/device", "Host") == "Host":
                totals[values["Operation Type"]] += float(values["Total self-time (us)"])
    return totals


def main(argv):
    del argv
    print(testing.cpu_line(), flush=True)  # every figure below depends on it
    units = testing.cpu_facts()["units"]
    if FLAGS.mixed_precision == "bfloat16" and not (units["avx512_bf16"] or units["amx_bf16"]):
        print("bfloat16: this CPU has no bfloat16 units (AVX512-BF16 or AMX); TensorFlow "
              "emulates them, so the figures say little about a CPU that has them.", flush=True)
    with loop.precision(FLAGS.mixed_precision):
        profile()


def profile():
    if FLAGS.keras_batch_norm:
        normalization.FusedBatchNormalization._fusable = lambda self, inputs, mask: False
    net = model_lib.PartLossNet(num_classes=600, num_parts=0, backbone="torchvision_mobilenet_v2",
                                image_size=(128, 64), embedding_dim=256)
    net.build()
    optimizer = keras.optimizers.Adam(3e-4)
    optimizer.build(net.trainable_variables)
    step = step_lib.make_train_step(net, optimizer, tf.distribute.get_strategy(),
                                     global_batch_size=64)
    batch = {"image": tf.random.uniform([64, 128, 64, 3], 0, 255),
             "label": tf.random.uniform([64], 0, 600, tf.int32)}
    batches = iter(tf.data.Dataset.from_tensors(batch).repeat())
    step(batches, tf.constant(FLAGS.warmup))["loss"].numpy()
    best = 0.0  # untraced: the profiler's own cost left out
    for _ in range(3):
        start = time.perf_counter()
        step(batches, tf.constant(FLAGS.steps))["loss"].numpy()
        best = max(best, FLAGS.steps * 64 / (time.perf_counter() - start))
    print(f"untraced: {best:.1f} images/s (best of 3 calls of {FLAGS.steps} steps)", flush=True)
    tf.profiler.experimental.start(FLAGS.logdir)
    start = time.perf_counter()
    for _ in range(FLAGS.steps):  # one call per step, so the trace shows step boundaries
        step(batches, tf.constant(1))["loss"].numpy()
    seconds = time.perf_counter() - start
    tf.profiler.experimental.stop()
    totals = op_type_self_times(FLAGS.logdir)
    idle = totals.pop("IDLE", 0.0)
    everything = sum(totals.values())
    print(f"machine: {os.cpu_count()} CPU cores, TensorFlow {tf.__version__}; batch norm: "
          f"{'Keras (unfused)' if FLAGS.keras_batch_norm else 'fused'}; policy "
          f"{keras.mixed_precision.global_policy().name}; {FLAGS.steps} steps in "
          f"{seconds:.2f} s under the profiler ({FLAGS.steps * 64 / seconds:.1f} images/s)")
    print(f"host self time by op type (of {everything / 1e6:.2f} s busy across threads; "
          f"{idle / 1e6:.2f} s idle not counted):")
    for name, micros in totals.most_common(FLAGS.top):
        print(f"  {name:48s} {micros / 1e3:9.1f} ms  {100 * micros / everything:5.1f} %")


if __name__ == "__main__":
    app.run(main)
