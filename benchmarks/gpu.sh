#!/usr/bin/env bash
# GPU figures in one short run (issue 15): training images/s of resnet50 PL-Net at 256x128,
# batch 64, in float32, float16 and float16 + XLA, then extraction images/s through the export.
# Run it only on a machine with a GPU; it refuses to run without one. Prints one line per figure.
#
#   bash benchmarks/gpu.sh            # uses .venv (make install EXTRAS=gpu,test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" - <<'PYEOF'
import os, sys, tempfile, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras, numpy as np, tensorflow as tf
from reid_tf import model as model_lib
from reid_tf.deploy import export as export_lib, runtime
from reid_tf.train import step as step_lib

gpus = tf.config.list_physical_devices("GPU")
if not gpus:
    sys.exit("benchmarks/gpu.sh: no GPU visible to TensorFlow; nothing measured.")
print(f"GPU: {tf.config.experimental.get_device_details(gpus[0]).get('device_name')}; "
      f"TensorFlow {tf.__version__}", flush=True)

def train_rate(precision, jit, steps=30):
    keras.mixed_precision.set_global_policy("float32" if precision == "float32"
                                            else f"mixed_{precision}")
    net = model_lib.PartLossNet(num_classes=751, num_parts=4, backbone="resnet50",
                                image_size=(256, 128))
    net.build()
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    if precision == "float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(net.trainable_variables)
    batch = {"image": tf.random.uniform([64, 256, 128, 3], 0, 255),
             "label": tf.repeat(tf.range(16), 4)}
    iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
    step = step_lib.make_train_step(net, optimizer, tf.distribute.get_strategy(), 64,
                                     jit_compile=jit)
    step(iterator, tf.constant(3))["loss"].numpy()
    start = time.perf_counter()
    step(iterator, tf.constant(steps))["loss"].numpy()
    return steps * 64 / (time.perf_counter() - start)

for precision, jit in (("float32", False), ("float16", False), ("float16", True)):
    print(f"train resnet50 PL-Net K=4 256x128 batch 64 {precision}"
          f"{' + XLA' if jit else ''}: {train_rate(precision, jit):.1f} images/s", flush=True)
keras.mixed_precision.set_global_policy("float32")
net = model_lib.PartLossNet(num_classes=751, num_parts=4, backbone="resnet50",
                            image_size=(256, 128))
net.build()
with tempfile.TemporaryDirectory() as scratch:
    export = runtime.SavedModelRuntime(export_lib.export_model(net, scratch, 1))
    images = np.random.default_rng(0).integers(0, 255, (128, 256, 128, 3), dtype=np.uint8)
    export.predict_images(images[:8])
    start = time.perf_counter()
    for _ in range(5):
        export.predict_images(images)
    print(f"extract (serving_default, batch 128): "
          f"{5 * 128 / (time.perf_counter() - start):.1f} images/s", flush=True)
PYEOF
