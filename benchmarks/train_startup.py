"""Where a real reid-train run's start-up goes: a timeline from process start to the last step,
and the start-up's phases timed one by one in a fresh process.

The run is the CUHK03 recipe (`--recipe`, default the labeled flagfile) cut to `--steps` steps,
float32, no evaluation and no export, in a fresh workdir. Two processes, one after the other:
1. reid-train itself: each line of its output is stamped with the seconds since the process
   started: the `training ...` line (imports, data, model, the imported weights, the
   optimizer), the first progress line (the train step's tracing, its first graph
   optimisation and the first pipeline fill, plus `--log_every` steps), the steady rate
   between the later progress lines, and the exit;
2. the same start-up through the library's own functions (`train.loop.build_data`,
   `build_model`, `build_optimizer`, the loop's step function, `data.pipeline.train_dataset`),
   each phase timed: imports; data; model; optimizer; the pipeline's first batch; the step's
   tracing alone (`get_concrete_function`); its first call of one step (graph optimisation);
   the next single steps.

    REID_TF_SHARED_DIR=../shared python benchmarks/train_startup.py [--steps=150]
"""

import json
import re
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

from reid_tf import testing

FLAGS = flags.FLAGS
flags.DEFINE_string("recipe", "experiments/cuhk03_pair1_labeled_mobilenetv2_128x64.flags",
                    "The recipe's flagfile.")
flags.DEFINE_integer("steps", 150, "Training steps of the run.")
flags.DEFINE_integer("log_every", 10, "Progress lines every this many steps.")
flags.DEFINE_list("extra", [], "More reid-train flags (e.g. --num_parts=0).")
flags.DEFINE_bool("phases", True, "Also time the start-up's phases in a fresh process.")

STEP_LINE = re.compile(r"^step (\d+)/(\d+)")
PHASES = r"""
import time
start = time.perf_counter()
import json, sys
from absl import flags
import tensorflow as tf
from reid_tf import options
from reid_tf.cli import train as cli  # declares reid-train's flags
from reid_tf.data import pipeline
from reid_tf.train import loop
from reid_tf.train.config import TrainConfig
seconds = {"imports": time.perf_counter() - start}
def phase(name, function):
    begin = time.perf_counter()
    value = function()
    seconds[name] = time.perf_counter() - begin
    return value
flags.FLAGS(sys.argv)
config = options.from_flags(TrainConfig)
strategy = tf.distribute.get_strategy()
data = phase("data: scan, splits", lambda: loop.build_data(config, log=lambda line: None))
model = phase("model: build, imported weights", lambda: loop.build_model(config, data.num_classes))
optimizer = phase("optimizer: build", lambda: loop.build_optimizer(config, model, data.total_steps))
def dataset(context):
    return pipeline.train_dataset(
        data.splits["train"], config.image_size, config.identities_per_batch,
        config.images_per_identity, seed=config.seed,
        augmentation=pipeline.Augmentation(config.flip, config.pad, config.random_erasing),
        input_context=context)
iterator = phase("pipeline: built, first batch", lambda: (lambda it: (next(it), it)[1])(
    iter(strategy.distribute_datasets_from_function(dataset))))
step = loop._step_function(config, model, optimizer, strategy)
phase("train step: tracing", lambda: step.get_concrete_function(iterator, tf.constant(1)))
phase("train step: first call, 1 step (graph optimisation)",
      lambda: step(iterator, tf.constant(1))["loss"].numpy())
phase("train step: second call, 1 step", lambda: step(iterator, tf.constant(1))["loss"].numpy())
phase("train step: 10 steps in one call", lambda: step(iterator, tf.constant(10))["loss"].numpy())
print(json.dumps(seconds))
"""


def command(workdir):
    return [sys.executable, "-m", "reid_tf.cli.train", f"--flagfile={FLAGS.recipe}",
                     f"--workdir={workdir}", f"--train_steps={FLAGS.steps}",
                     f"--log_every={FLAGS.log_every}", "--checkpoint_every=0", "--eval_every=0",
                     "--nofinal_eval", "--noexport", "--mixed_precision=none", *FLAGS.extra]


def timeline():
    """[(seconds since start, line)] of a plain run."""
    with tempfile.TemporaryDirectory() as workdir:
        return testing.stamped_output(command(workdir))


def report_timeline(lines, batch_size):
    training = next(t for t, line in lines if line.startswith("training "))
    steps = [(t, int(STEP_LINE.match(line).group(1))) for t, line in lines
             if STEP_LINE.match(line)]
    end = lines[-1][0]
    (t0, s0), (t1, s1) = steps[0], steps[-1]
    steady = (s1 - s0) * batch_size / (t1 - t0)
    print(f"'training ...' line (data, model, weights, optimizer): {training:.1f} s")
    print(f"first progress line (step {s0}): {t0:.1f} s; {t0 - training:.1f} s after the "
          "'training' line")
    print(f"last progress line (step {s1}): {t1:.1f} s; process exit {end:.1f} s")
    print(f"steady rate, steps {s0}-{s1}: {steady:.1f} images/s; whole run, process start to "
          f"exit: {s1 * batch_size / end:.1f} images/s; start-up cost (exit time minus "
          f"{s1} steps at the steady rate): {end - s1 * batch_size / steady:.1f} s")


def report_phases(batch_size):
    with tempfile.TemporaryDirectory() as workdir:
        result = subprocess.run([sys.executable, "-c", PHASES, *command(workdir)[3:]],
                                capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    seconds = json.loads(result.stdout.strip().splitlines()[-1])
    steady = 10 * batch_size / seconds["train step: 10 steps in one call"]
    print(f"| phase (a fresh process, the library's functions; steady {steady:.1f} images/s) "
          "| seconds |")
    print("| --- | --- |")
    for name, value in seconds.items():
        print(f"| {name} | {value:.1f} |")


def main(argv):
    del argv
    print(testing.cpu_line(), flush=True)  # every figure below depends on it
    config = open(FLAGS.recipe).read()
    batch_size = (int(re.search(r"--identities_per_batch=(\d+)", config).group(1))
                  * int(re.search(r"--images_per_identity=(\d+)", config).group(1)))
    lines = timeline()
    report_timeline(lines, batch_size)
    if FLAGS.phases:
        report_phases(batch_size)


if __name__ == "__main__":
    app.run(main)
