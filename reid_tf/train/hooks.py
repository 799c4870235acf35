"""What the training loop does between steps, one hook per concern (as fast-reid's
`PeriodicCheckpointer`, `EvalHook`, `PeriodicWriter`): the progress line and its summaries, the
part-mask pictures, checkpoints and periodic evaluation. Each is a `Hook`: `every` (its period
in steps, 0 = never; the loop stops at each boundary), and `run(step, metrics, images_per_second)`
called when the hook is due (the base class owns the cadence). `train_and_evaluate(hooks=...)`
takes more, so a new concern needs no change to the loop."""

import dataclasses
import json
import os
import time

import tensorflow as tf

from reid_tf.deploy.runtime import KerasRuntime
from reid_tf.evaluate import calibration
from reid_tf.evaluate import evaluator
from reid_tf.evaluate.extract import extract
from reid_tf.evaluate import visualize
from reid_tf.files import write_atomically


def every(step, period):
    """True when `step` is a positive multiple of `period` (period 0: never)."""
    return bool(period) and step > 0 and step % period == 0


def format_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s")


def flags_markdown(config):
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(dataclasses.asdict(config).items()))
    return "| flag | value |\n| --- | --- |\n" + rows


class Hook:
    """Something done every `every` steps (0: never) and, with `at_end`, after the last step.

    The loop stops training at each hook's boundary, calls `after_steps` there, and sets
    `total_steps` on a hook given without it. Subclasses implement `run`; `due` is the cadence.
    """

    at_end = True

    def __init__(self, every, total_steps=None):
        self.every, self.total_steps = every, total_steps

    def due(self, step):
        return every(step, self.every) or (self.at_end and step == self.total_steps)

    def after_steps(self, step, metrics, images_per_second):
        if self.due(step):
            self.run(step, metrics, images_per_second)

    def run(self, step, metrics, images_per_second):
        raise NotImplementedError


TRIPLET_TERMS = (("triplet_loss", "triplet"), ("part_triplet_loss", "part triplet"),
                 ("part_assignment_loss", "assign"))  # the optional terms of the loss


class Progress(Hook):
    """The progress line (losses per part, accuracy, images/s, time left, steps skipped by loss
    scaling) and the training summaries, every `every` steps and at the end."""

    def __init__(self, every, total_steps, start_step, batch_size, num_parts, optimizer,
                 skipped_steps, writer, log):
        super().__init__(every, total_steps)
        self.start_step = start_step
        self.batch_size, self.num_parts = batch_size, num_parts
        self.optimizer, self.writer, self.log = optimizer, writer, log
        self.skipped_steps = skipped_steps  # the run's count (checkpointed), resumes included
        self.start_time = time.perf_counter()

    def run(self, step, metrics, images_per_second):
        elapsed = time.perf_counter() - self.start_time
        remaining = elapsed / (step - self.start_step) * (self.total_steps - step)
        parts = " ".join(f"{v:.2f}" for v in metrics["part_losses"].numpy())
        count = int(self.skipped_steps.numpy())
        skipped = f"  skipped {count}" if count else ""
        triplets = "".join(f"  {label} {float(metrics[name]):.4f}"
                           for name, label in TRIPLET_TERMS if name in metrics)
        fallback = float(metrics["part_fallback"])  # clustering gave up: stripes instead
        stripes = f"  stripes-fallback {100 * fallback:.0f}%" if fallback else ""
        self.log(f"step {step}/{self.total_steps}  loss {float(metrics['loss']):.4f}  "
                 f"global {float(metrics['global_loss']):.4f}  part "
                 f"{float(metrics['part_loss']):.4f} [{parts}]{triplets}  acc "
                 f"{float(metrics['global_accuracy']):.3f}  {images_per_second:.1f} img/s  ETA "
                 f"{format_duration(remaining)}{skipped}{stripes}")
        with self.writer.as_default(step=step):
            for name in ("loss", "global_loss", "part_loss", "global_accuracy", "part_fallback",
                         *(name for name, _ in TRIPLET_TERMS)):
                if name in metrics:
                    tf.summary.scalar(f"train/{name}", metrics[name])
            for k in range(self.num_parts):
                tf.summary.scalar(f"train/part_{k + 1}_loss", metrics["part_losses"][k])
                tf.summary.scalar(f"train/part_{k + 1}_accuracy", metrics["part_accuracies"][k])
            tf.summary.scalar("train/learning_rate", self.optimizer.learning_rate)
            tf.summary.scalar("train/images_per_second", images_per_second)
            tf.summary.scalar("train/skipped_steps", count)


class PartMaskPictures(Hook):
    """Input crops with their part masks in colour, in TensorBoard."""

    def __init__(self, every, total_steps, model, preview, writer):
        super().__init__(every, total_steps)
        self.model, self.preview, self.writer = model, preview, writer

    def run(self, step, metrics, images_per_second):
        masks = self.model(self.preview, training=False)["part_masks"]
        with self.writer.as_default(step=step):
            tf.summary.image("train/part_masks",
                             visualize.overlay_part_masks(self.preview, masks), max_outputs=8)


class PartInduction(Hook):
    """A learned partition pools with its teacher's masks until `switch_step` (RPP's induction
    from a trained partition), then with its own: sets the model's `teacher_pooling`."""

    def __init__(self, switch_step, total_steps, model):
        super().__init__(switch_step, total_steps)
        self.model = model

    def start(self, step):
        self.model.teacher_pooling.assign(1.0 if step < self.every else 0.0)

    def due(self, step):
        return step >= self.every

    def run(self, step, metrics, images_per_second):
        self.model.teacher_pooling.assign(0.0)


class Checkpoints(Hook):
    """A checkpoint every `every` steps and at the end."""

    def __init__(self, every, total_steps, manager):
        super().__init__(every, total_steps)
        self.manager = manager

    def run(self, step, metrics, images_per_second):
        self.manager.save(checkpoint_number=step)


class Evaluation(Hook):
    """Evaluation on validation (when held out; else test) every `every` steps before the end,
    and `run(split)` for the final ones. Logs, summarises, and keeps the validation curve in
    `<workdir>/validation_curve.json` (a resumed run keeps its earlier points)."""

    def __init__(self, every, total_steps, model, splits, config, steps_per_epoch, workdir,
                 writer, chief, log):
        super().__init__(every, total_steps)
        self.runtime = KerasRuntime(model)
        self.splits, self.batch_size = splits, config.eval_batch_size
        self.steps_per_epoch, self.writer, self.chief, self.log = (steps_per_epoch, writer,
                                                                   chief, log)
        self.tag = config.dataset.replace("/", "_").replace(":", "_")
        self.validation = "val_query" in splits
        self.curve_path = os.path.join(workdir, "validation_curve.json")
        self.calibration_path = os.path.join(workdir, "calibration.json")
        self.dataset, self.validation_identities = config.dataset, config.validation_identities
        self.curve = []

    def resume(self, step):
        if self.validation and os.path.exists(self.curve_path):
            with open(self.curve_path) as f:
                self.curve = [point for point in json.load(f) if point["step"] <= step]

    at_end = False  # the final evaluations are the loop's (`run`, `calibrate`, `finish`)

    def due(self, step):
        return super().due(step) and step < self.total_steps and self.chief

    def after_steps(self, step, metrics, images_per_second):
        if self.due(step):
            self.run(step, "validation" if self.validation else "test")

    def run(self, step, split="test", splits=None, tag=None):
        """Evaluates on `split` ("test" or "validation") of the run's splits (or of `splits`,
        another dataset's, tagged `tag`); logs, summarises, returns metrics."""
        splits = splits or self.splits
        names = ("val_query", "val_gallery") if split == "validation" else ("query", "gallery")
        metrics = evaluator.evaluate_runtime(self.runtime, splits[names[0]],
                                             splits[names[1]], self.batch_size)
        tag = tag or self.tag
        tag = f"{tag}/validation" if split == "validation" else tag
        consistency = metrics.get("part_consistency")
        with self.writer.as_default(step=step):
            tf.summary.scalar(f"eval/{tag}/rank1", metrics["rank1"])
            tf.summary.scalar(f"eval/{tag}/mAP", metrics["mAP"])
            for name, values in metrics["descriptors"].items():
                if name != "embedding":
                    tf.summary.scalar(f"eval/{tag}/{name}/mAP", values["mAP"])
            for name, value in (consistency or {}).items():
                tf.summary.scalar(f"eval/{tag}/part_consistency/{name}", value)
            if metrics.get("part_fallback") is not None:
                tf.summary.scalar(f"eval/{tag}/part_fallback", metrics["part_fallback"])
        where = split if tag == self.tag else f"{split} of {tag}"
        line = (f"eval ({where}) step {step}: rank-1 {metrics['rank1']:.4f}  "
                f"mAP {metrics['mAP']:.4f}  (queries {metrics['num_valid']}, skipped "
                f"{metrics['num_skipped']})")
        if consistency:
            line += (f"  parts: IoU {consistency['mean_iou']:.3f} ordered "
                     f"{consistency['ordered_fraction']:.3f}")
        if metrics.get("part_fallback"):
            line += f"  stripes-fallback {100 * metrics['part_fallback']:.1f}% of images"
        self.log(line)
        if split == "validation" and self.chief:
            self.curve.append({"step": step, "epoch": step / self.steps_per_epoch,
                               "rank1": metrics["rank1"], "mAP": metrics["mAP"],
                               "descriptors": metrics["descriptors"],
                               "part_consistency": consistency})
            write_atomically(self.curve_path, json.dumps(self.curve, indent=1))
        return metrics

    def run_other(self, step, dataset, splits):
        """The final model on another dataset's test split: results.json's figures for it."""
        metrics = self.run(step, "test", splits, dataset.replace("/", "_").replace(":", "_"))
        return {"rank1": metrics["rank1"], "mAP": metrics["mAP"], "mINP": metrics["mINP"],
                "num_queries": metrics["num_valid"], "skipped_queries": metrics["num_skipped"],
                "descriptors": metrics["descriptors"]}

    def calibrate(self, step):
        """Fits the decision thresholds on the validation identities with the final model
        (`evaluate.calibration`), writes `<workdir>/calibration.json` (the export carries it)
        and returns results.json's summary of it."""
        fitted = evaluator.calibrate(
            self.runtime, self.splits["val_query"], self.splits["val_gallery"],
            batch_size=self.batch_size,
            measured_on={"dataset": self.dataset, "split": "validation identities",
                         "validation_identities": self.validation_identities, "step": step})
        write_atomically(self.calibration_path, json.dumps(fitted, indent=2))
        points = ", ".join(f"FAR {p['far']:g}: DIR {p['dir']:.3f} (FAR measured "
                           f"{p['measured_far']:.3f}, 95 % interval {p['far_interval'][0]:.3f}-"
                           f"{p['far_interval'][1]:.3f})" for p in fitted["open_set"])
        self.log(f"calibration ({len(self.splits['val_query'])} validation queries): {points}; "
                 f"wrote {self.calibration_path}")
        return {kind: fitted[kind] for kind in ("verification", "open_set")}, fitted

    def open_set(self, fitted):
        """Open-set identification on the test split at the validation thresholds
        (`calibration.evaluate_open_set`: a third of the test identities out of the gallery)."""
        query, gallery = self.splits["query"], self.splits["gallery"]
        embeddings = [extract(self.runtime, split, ["embedding"], self.batch_size)["embedding"]
                      for split in (query, gallery)]
        report = calibration.evaluate_open_set(embeddings[0], query, embeddings[1], gallery,
                                               fitted)
        self.log("open set (test, validation thresholds): " + ", ".join(
            f"FAR {p['far']:g}: DIR {p['dir']:.3f}, measured FAR {p['measured_far']:.3f}"
            for p in report["points"]))
        return report

    def finish(self, step):
        """The final evaluations' part of results.json: validation (its last point, evaluated
        now if it is not at `step`) and its curve."""
        if not self.validation:
            return {}
        if not self.curve or self.curve[-1]["step"] != step:
            self.run(step, "validation")
        return {"validation": {key: self.curve[-1][key] for key in
                               ("rank1", "mAP", "descriptors", "part_consistency")},
                "validation_curve": [{k: p[k] for k in ("step", "epoch", "rank1", "mAP")}
                                     for p in self.curve]}
