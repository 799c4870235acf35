"""A whole real training run, reid-train against the PyTorch peer: process start to the last step.

The CUHK03 baseline recipe (`--recipe`, the labeled flagfile, with `--num_parts=0`: the peer
trains the global baseline), float32, the recipe's whole budget (12 epochs, its checkpoints every
100 steps), no evaluation and no export; then `experiments/peers/torch_baseline.py` (its own
virtual environment) for the same number of steps, checkpointing as often, on the same images.
Each process's output is stamped from the moment it was started; the measure is the time of
the progress line of the last step: everything a user waits for before the model is trained
(interpreter and framework imports, reading the data, the model and its imported weights,
tracing, the first pipeline fill, every step and checkpoint). The peer's evaluation after its
last step is not counted, as reid-train's is not run.

The runs are interleaved, `--rounds` rounds in the order ours, peer, peer, ours, ... so that a
drift of the machine weighs on both alike. Prints each run and the ratio of images/s, and a JSON
line with the CPU's facts.

    REID_TF_SHARED_DIR=../shared python benchmarks/train_whole_run.py [--rounds=2]
"""

import functools
import json
import os
import re
import sys
import tempfile
import time

from absl import app
from absl import flags

from reid_tf import testing

FLAGS = flags.FLAGS
flags.DEFINE_string("recipe", "experiments/cuhk03_pair1_labeled_mobilenetv2_128x64.flags",
                    "The recipe's flagfile (its --dataset names the images for the peer).")
flags.DEFINE_integer("rounds", 2, "Runs of each (alternating which goes first).")
flags.DEFINE_integer("train_steps", 0, "Cut both runs to this many steps (0: the recipe's).")
flags.DEFINE_string("peer_python", "experiments/peers/.venv/bin/python",
                    "The PyTorch peer's interpreter.")

STEP_LINE = re.compile(r"^step (\d+)/(\d+)")


@functools.cache
def recipe_values():
    """{flag: value} of the recipe's flagfile, read once."""
    with open(FLAGS.recipe) as f:
        return dict(re.findall(r"^--(\w+)=(.*)$", f.read(), re.M))


def recipe_value(name):
    return recipe_values()[name]


def ours(workdir, steps):
    return [sys.executable, "-m", "reid_tf.cli.train", f"--flagfile={FLAGS.recipe}",
            f"--workdir={workdir}", "--num_parts=0", "--nofinal_eval", "--noexport",
            "--mixed_precision=none", *([f"--train_steps={steps}"] if steps else [])]


def peer(workdir, steps):
    data = recipe_value("dataset").removeprefix("folder:")
    return [FLAGS.peer_python, "experiments/peers/torch_baseline.py", f"--data={data}",
            f"--weights={recipe_value('weights')}", f"--steps={steps}", "--seed=0",
            f"--checkpoint={os.path.join(workdir, 'checkpoint.pt')}",
            f"--checkpoint_every={recipe_value('checkpoint_every')}"]


def whole_run(name, argv_of, steps):
    """{"seconds" to the last step's line, "steps", "first_line", "steady"} of one fresh run."""
    with tempfile.TemporaryDirectory() as workdir:
        lines = testing.stamped_output(argv_of(workdir, steps))
    progress = [(t, int(m.group(1)), int(m.group(2))) for t, line in lines
                if (m := STEP_LINE.match(line))]
    (first, first_step, _), (last, last_step, total) = progress[0], progress[-1]
    if last_step != total:
        raise RuntimeError(f"{name} stopped at step {last_step} of {total}")
    batch = int(recipe_value("identities_per_batch")) * int(recipe_value("images_per_identity"))
    run = {"name": name, "steps": total, "seconds": last, "images_per_second": total * batch / last,
           "first_progress_line": first, "first_progress_step": first_step,
           "steady_images_per_second": (total - first_step) * batch / max(last - first, 1e-9)}
    print(f"{name}: {total} steps, last step at {last:.1f} s from process start "
          f"({run['images_per_second']:.1f} images/s whole run; step {first_step} at "
          f"{first:.1f} s; steady {run['steady_images_per_second']:.1f} images/s after it)",
          flush=True)
    return run


def main(argv):
    del argv
    print(testing.cpu_line(), flush=True)  # every figure below depends on it
    if not os.path.exists(FLAGS.peer_python):
        raise SystemExit(f"no PyTorch peer at {FLAGS.peer_python}: python3.11 -m venv "
                         "experiments/peers/.venv && experiments/peers/.venv/bin/pip install -r "
                         "experiments/peers/requirements.txt")
    runs, steps = [], FLAGS.train_steps
    for round_ in range(FLAGS.rounds):
        order = [("reid-tf", ours), ("peer", peer)][::1 if round_ % 2 == 0 else -1]
        for name, argv_of in order:
            if name == "peer" and not steps:
                steps = next(r["steps"] for r in runs if r["name"] == "reid-tf")
            runs.append(whole_run(name, argv_of, steps))
    rate = {name: sum(r["steps"] for r in runs if r["name"] == name)
            / sum(r["seconds"] for r in runs if r["name"] == name) for name in ("reid-tf", "peer")}
    print(f"whole run, process start to the last step, {FLAGS.rounds} each: reid-tf / PyTorch "
          f"peer {rate['reid-tf'] / rate['peer']:.2f}x (per round: "
          + ", ".join(f"{a['seconds'] and b['seconds'] / a['seconds']:.2f}x" for a, b in zip(
              [r for r in runs if r["name"] == "reid-tf"],
              [r for r in runs if r["name"] == "peer"])) + ")", flush=True)
    print(json.dumps({"cpu": testing.cpu_facts(), "date": time.strftime("%Y-%m-%d"),
                      "recipe": FLAGS.recipe, "runs": runs}))


if __name__ == "__main__":
    app.run(main)
