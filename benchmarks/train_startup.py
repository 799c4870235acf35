"""Where a real reid-train run's start-up goes: a timeline from process start to the last step,
and a cProfile of the same run grouped by phase.

The run is the CUHK03 recipe (`--recipe`, default the labeled flagfile) cut to `--steps` steps,
float32, no evaluation and no export, in a fresh workdir. Two processes, one after the other:
1. plain: each line of reid-train's output is stamped with the seconds since the process
   started, giving the time to the first line (imports), to the `training ...` line (data,
   model, the imported weights, the optimizer), to the first progress line (the train step's
   tracing, its first graph optimisation and the first pipeline fill, plus `--log_every`
   steps), and the steady rate between the later progress lines;
2. profiled (`python -m cProfile`): the cumulative seconds of the functions that make up each
   phase (`PHASES`), from the profile's call tree.

    REID_TF_SHARED_DIR=../shared python benchmarks/train_startup.py [--steps=150]
"""

import os
import pstats
import re
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from reid_tf import testing

FLAGS = flags.FLAGS
flags.DEFINE_string("recipe", "experiments/cuhk03_pair1_labeled_mobilenetv2_128x64.flags",
                    "The recipe's flagfile.")
flags.DEFINE_integer("steps", 150, "Training steps of the run.")
flags.DEFINE_integer("log_every", 10, "Progress lines every this many steps.")
flags.DEFINE_list("extra", [], "More reid-train flags (e.g. --num_parts=0).")
flags.DEFINE_bool("profile", True, "Also run it under cProfile for the phase breakdown.")

STEP_LINE = re.compile(r"^step (\d+)/(\d+)")
# (phase, the functions whose cumulative time is that phase: file suffix, function name)
PHASES = [
    ("imports (reid_tf, TensorFlow, Keras)", [("reid_tf/cli/train.py", "<module>")]),
    ("dataset: scan, splits", [("reid_tf/train/loop.py", "build_data")]),
    ("model: build, imported weights", [("reid_tf/train/loop.py", "build_model")]),
    ("optimizer: build", [("reid_tf/train/loop.py", "build_optimizer")]),
    ("checkpoint restore", [("reid_tf/train/loop.py", "restore")]),
    ("input pipeline: build", [("reid_tf/data/pipeline.py", "train_dataset")]),
    ("hooks: preview batch", [("reid_tf/data/pipeline.py", "eval_dataset")]),
    ("train step: tracing", [("polymorphic_function.py", "_initialize")]),
    ("train step: all calls (first: graph optimisation, pipeline fill)",
     [("reid_tf/train/loop.py", "_steps")]),
    ("the whole train_and_evaluate", [("reid_tf/train/loop.py", "train_and_evaluate")]),
]


def command(workdir, profile_path=None):
    python = [sys.executable] + (["-m", "cProfile", "-o", profile_path] if profile_path else [])
    return python + ["-m", "reid_tf.cli.train", f"--flagfile={FLAGS.recipe}",
                     f"--workdir={workdir}", f"--train_steps={FLAGS.steps}",
                     f"--log_every={FLAGS.log_every}", "--checkpoint_every=0", "--eval_every=0",
                     "--nofinal_eval", "--noexport", "--mixed_precision=none", *FLAGS.extra]


def timeline():
    """[(seconds since start, line)] of a plain run."""
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        process = subprocess.Popen(command(workdir), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        lines = [(time.perf_counter() - start, line.rstrip()) for line in process.stdout]
        process.wait()
        lines.append((time.perf_counter() - start, f"exit {process.returncode}"))
    if process.returncode:
        raise RuntimeError("\n".join(line for _, line in lines[-20:]))
    return lines


def report_timeline(lines, batch_size):
    first = next(t for t, line in lines if not line.startswith(("WARNING", "I0000", "E0000")))
    training = next(t for t, line in lines if line.startswith("training "))
    steps = [(t, int(STEP_LINE.match(line).group(1))) for t, line in lines
             if STEP_LINE.match(line)]
    end = lines[-1][0]
    (t0, s0), (t1, s1) = steps[0], steps[-1]
    steady = (s1 - s0) * batch_size / (t1 - t0)
    print(f"first output line (imports done): {first:.1f} s")
    print(f"'training ...' line (data, model, weights, optimizer): {training:.1f} s")
    print(f"first progress line (step {s0}): {t0:.1f} s; {t0 - training:.1f} s after the "
          "'training' line")
    print(f"last progress line (step {s1}): {t1:.1f} s; process exit {end:.1f} s")
    print(f"steady rate, steps {s0}-{s1}: {steady:.1f} images/s; whole run, process start to "
          f"exit: {s1 * batch_size / end:.1f} images/s; start-up cost (exit time minus "
          f"{s1} steps at the steady rate): {end - s1 * batch_size / steady:.1f} s")


def report_profile(path):
    stats = pstats.Stats(path)
    cumulative = {}
    for (file, _, name), (_, _, _, total, _) in stats.stats.items():
        cumulative[(file, name)] = max(cumulative.get((file, name), 0.0), total)
    print("| phase (cProfile, cumulative) | seconds |")
    print("| --- | --- |")
    for phase, functions in PHASES:
        seconds = sum(max([total for (file, name), total in cumulative.items()
                           if file.endswith(suffix) and name == function] or [0.0])
                      for suffix, function in functions)
        print(f"| {phase} | {seconds:.1f} |")


def main(argv):
    del argv
    print(testing.cpu_line(), flush=True)  # every figure below depends on it
    config = open(FLAGS.recipe).read()
    batch_size = (int(re.search(r"--identities_per_batch=(\d+)", config).group(1))
                  * int(re.search(r"--images_per_identity=(\d+)", config).group(1)))
    lines = timeline()
    report_timeline(lines, batch_size)
    if FLAGS.profile:
        with tempfile.TemporaryDirectory() as workdir:
            path = os.path.join(workdir, "train.prof")
            subprocess.run(command(os.path.join(workdir, "run"), path), check=True,
                           capture_output=True)
            report_profile(path)


if __name__ == "__main__":
    app.run(main)
