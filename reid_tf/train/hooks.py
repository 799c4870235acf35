"""What the training loop does between steps and after the last, one hook per concern (as
fast-reid's `PeriodicCheckpointer`, `EvalHook`, `PeriodicWriter`): the progress line and its
summaries, the part-mask pictures, checkpoints, evaluation, the decision calibration and open
set, the other datasets, and the results writer. Each is a `Hook`: `every` (its period in
steps, 0 = never; the loop stops at each boundary), `run(step, metrics, images_per_second)`
called when the hook is due (the base class owns the cadence), and `end(step, results)` after
the last step, where it adds its part to results.json; `ResultsWriter`, the last hook, writes
the file. `train_and_evaluate(hooks=...)` takes more, so a new concern, or a new figure in
results.json, needs no change to the loop."""

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
from reid_tf import version


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
    After the last step the chief calls every hook's `end(step, results)` in order: a hook adds
    its figures to `results`, the dict that becomes results.json.
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

    def end(self, step, results):
        """After the last step (the chief only): add to `results` (results.json)."""


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
    and at the end (`end`) the validation summary and the test evaluation. Logs, summarises,
    and keeps the validation curve in `<workdir>/validation_curve.json` (a resumed run keeps its
    earlier points). `run(split, splits)` is one evaluation (also of another dataset's)."""

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
        self.dataset, self.validation_identities = config.dataset, config.validation_identities
        self.final_eval = config.final_eval
        self.curve = []

    def resume(self, step):
        if self.validation and os.path.exists(self.curve_path):
            with open(self.curve_path) as f:
                self.curve = [point for point in json.load(f) if point["step"] <= step]

    at_end = False  # the final evaluations are `end`'s

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

    def end(self, step, results):
        """The validation curve's summary (its last point evaluated now if it is not at
        `step`) and, with `final_eval`, the test evaluation."""
        if self.validation:
            if not self.curve or self.curve[-1]["step"] != step:
                self.run(step, "validation")
            results["validation"] = {key: self.curve[-1][key] for key in
                                     ("rank1", "mAP", "descriptors", "part_consistency")}
            results["validation_curve"] = [{k: p[k] for k in ("step", "epoch", "rank1", "mAP")}
                                           for p in self.curve]
        if self.final_eval:
            metrics = self.run(step)
            results.update(rank1=metrics["rank1"], mAP=metrics["mAP"], mINP=metrics["mINP"],
                           cmc=[float(v) for v in metrics["cmc"][:20]],
                           num_queries=metrics["num_valid"],
                           skipped_queries=metrics["num_skipped"],
                           descriptors=metrics["descriptors"],
                           part_consistency=metrics.get("part_consistency"),
                           part_fallback=metrics.get("part_fallback"))


class Calibration(Hook):
    """After the last step, with validation identities held out: the decision thresholds
    fitted on them with the final model (`evaluate.calibration`), written as
    `<workdir>/calibration.json` (the export carries it), and open-set identification on the
    test split at those thresholds; results.json's `calibration` and `open_set`."""

    at_end = False

    def __init__(self, evaluation, workdir):
        super().__init__(every=0)
        self.evaluation = evaluation
        self.path = os.path.join(workdir, "calibration.json")

    def end(self, step, results):
        evaluation = self.evaluation
        if not (evaluation.validation and evaluation.final_eval):
            return
        splits, log = evaluation.splits, evaluation.log
        fitted = evaluator.calibrate(
            evaluation.runtime, splits["val_query"], splits["val_gallery"],
            batch_size=evaluation.batch_size,
            measured_on={"dataset": evaluation.dataset, "split": "validation identities",
                         "validation_identities": evaluation.validation_identities,
                         "step": step})
        write_atomically(self.path, json.dumps(fitted, indent=2))
        points = ", ".join(f"FAR {p['far']:g}: DIR {p['dir']:.3f} (FAR measured "
                           f"{p['measured_far']:.3f}, 95 % interval {p['far_interval'][0]:.3f}-"
                           f"{p['far_interval'][1]:.3f})" for p in fitted["open_set"])
        log(f"calibration ({len(splits['val_query'])} validation queries): {points}; "
            f"wrote {self.path}")
        results["calibration"] = {kind: fitted[kind] for kind in ("verification", "open_set")}
        results["open_set"] = self.open_set(fitted)

    def open_set(self, fitted):
        """Open-set identification on the test split at the validation thresholds
        (`calibration.evaluate_open_set`: a third of the test identities out of the gallery)."""
        evaluation = self.evaluation
        query, gallery = evaluation.splits["query"], evaluation.splits["gallery"]
        embeddings = [extract(evaluation.runtime, split, ["embedding"],
                              evaluation.batch_size)["embedding"] for split in (query, gallery)]
        report = calibration.evaluate_open_set(embeddings[0], query, embeddings[1], gallery,
                                               fitted)
        evaluation.log("open set (test, validation thresholds): " + ", ".join(
            f"FAR {p['far']:g}: DIR {p['dir']:.3f}, measured FAR {p['measured_far']:.3f}"
            for p in report["points"]))
        return report


class OtherDatasets(Hook):
    """After the last step: the final model on other datasets' test splits (`others`:
    {dataset: its splits}); results.json's `also_evaluated`."""

    at_end = False

    def __init__(self, evaluation, others):
        super().__init__(every=0)
        self.evaluation, self.others = evaluation, others

    def end(self, step, results):
        if not self.others:
            return
        also = results["also_evaluated"] = {}
        for dataset, splits in self.others.items():
            metrics = self.evaluation.run(step, "test", splits,
                                          dataset.replace("/", "_").replace(":", "_"))
            also[dataset] = {"rank1": metrics["rank1"], "mAP": metrics["mAP"],
                             "mINP": metrics["mINP"], "num_queries": metrics["num_valid"],
                             "skipped_queries": metrics["num_skipped"],
                             "descriptors": metrics["descriptors"]}


class ResultsWriter(Hook):
    """results.json, written in one place: after every other hook's `end` has added its part,
    with the commit that finished the run; `write` again when more comes (the export)."""

    at_end = False

    def __init__(self, path, chief):
        super().__init__(every=0)
        self.path, self.chief = path, chief

    def end(self, step, results):
        results["code"] = version.code()
        self.write(results)

    def write(self, results):
        if self.chief:
            write_atomically(self.path, json.dumps(results, indent=2))
