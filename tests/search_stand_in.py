"""A stand-in for reid-train in tests/test_search.py: no TensorFlow, seconds instead of hours.

It takes the trial's flags, writes `validation_curve.json` point by point (every --eval_every
steps, atomically, as reid-train does) with a level set by the learning rate (best at 10^-2.5),
resumes from its own `state.json` as reid-train resumes from a checkpoint, and ends with
`results.json`. `DIVERGE_ABOVE`: a learning rate above it ends like a diverging reid-train.
"""

import json
import math
import os
import sys
import time

args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
workdir = args["workdir"]
os.makedirs(workdir, exist_ok=True)
steps_per_epoch = int(os.environ.get("STAND_IN_STEPS_PER_EPOCH", "10"))
total = int(args["epochs"]) * steps_per_epoch
every = int(args["eval_every"])
learning_rate = float(args["learning_rate"])
level = 1.0 / (1.0 + abs(math.log10(learning_rate) + 2.5))


def write(path, value):
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)


state_path = os.path.join(workdir, "state.json")
curve_path = os.path.join(workdir, "validation_curve.json")
start = json.load(open(state_path))["step"] if os.path.exists(state_path) else 0
print(f"started at step {start}", flush=True)
curve = json.load(open(curve_path)) if os.path.exists(curve_path) else []
curve = [point for point in curve if point["step"] <= start]
if learning_rate > float(os.environ.get("DIVERGE_ABOVE", "1")):
    print("reid-train: error: non-finite loss at step 3: training stopped", flush=True)
    sys.exit(1)
step = start
while step < total:
    step = min(total, step + every)
    time.sleep(float(os.environ.get("STAND_IN_SECONDS", "0.02")))
    value = level * step / total
    curve.append({"step": step, "epoch": step / steps_per_epoch, "rank1": value, "mAP": value})
    write(curve_path, curve)
    write(state_path, {"step": step})
write(os.path.join(workdir, "results.json"),
      {"step": total, "validation": {"mAP": curve[-1]["mAP"], "rank1": curve[-1]["rank1"]},
       "validation_curve": curve, "train_images_per_second": 1.0})
