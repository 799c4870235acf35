"""Options are declared once: flags, config and the resume check all come from the declaration."""

import dataclasses
import os
import subprocess
import sys

import keras
import pytest
import tensorflow as tf
from absl import flags

from reid_tf import options
from reid_tf.train import config as train_config
from reid_tf.train import loop
from reid_tf.train import workdir as workdir_lib

TrainConfig = train_config.TrainConfig


def train_flag_names():
    import reid_tf.cli.train  # noqa: F401  (defines reid-train's flags)

    return {flag.name for flag in flags.FLAGS.get_flags_for_module("reid_tf.cli.train")}


def test_every_config_field_has_a_flag_and_every_flag_a_field():
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    assert all("option" in field.metadata for field in dataclasses.fields(TrainConfig))
    assert train_flag_names() - {"workdir"} == fields


@pytest.mark.slow  # trains, or runs a tool in a process
def test_helpfull_lists_every_option_with_its_help():
    result = subprocess.run([sys.executable, "-m", "reid_tf.cli.train", "--helpfull"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    for name, _, option in options.declared(TrainConfig):
        assert f"--{name}" in result.stdout or f"--[no]{name}" in result.stdout, name
    assert "Lloyd iterations of the part clustering" in result.stdout


def test_flags_round_trip_into_the_config():
    values = flags.FlagValues()
    options.define_flags(TrainConfig, values)
    values(["reid-train", "--kmeans_iterations=3", "--lr_decay_steps=10,20", "--weights=",
            "--mixed_precision=float16", "--noflip"])
    config = options.from_flags(TrainConfig, values)
    assert config.kmeans_iterations == 3 and config.lr_decay_steps == (10, 20)
    assert config.weights is None and config.mixed_precision == "float16" and not config.flip
    assert dataclasses.replace(config, kmeans_iterations=10, lr_decay_steps=(), weights=None,
                               mixed_precision="none", flip=True) == TrainConfig()


def changed(name, value, option):
    if option.choices:
        return next(c for c in option.choices if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.25
    if isinstance(value, tuple):
        return (7,)
    return (value or "") + "_other"


@pytest.mark.parametrize("name", train_config.RESUME_OPTIONS)
def test_a_resume_option_that_changes_is_refused_in_one_line(tmp_path, name):
    config = TrainConfig()
    workdir_lib.record(str(tmp_path), config)
    option = dict((n, o) for n, _, o in options.declared(TrainConfig))[name]
    other = dataclasses.replace(config, **{name: changed(name, getattr(config, name), option)})
    with pytest.raises(ValueError, match=rf"different flags \(--{name}=") as error:
        workdir_lib.check_config(str(tmp_path), other)
    assert "\n" not in str(error.value)
    workdir_lib.check_config(str(tmp_path), config)  # the same options resume


BASE = TrainConfig(backbone="tiny", image_height=64, image_width=32, embedding_dim=8,
                   num_parts=3, optimizer="adam")


def checkpoint_layout(config, tmp_path):
    """{variable: shape} of the checkpoint a run of `config` writes (no data needed)."""
    with loop.precision(config.mixed_precision):
        model = loop.build_model(config, num_classes=5)
        optimizer = loop.build_optimizer(config, model, total_steps=10)
        path = loop.checkpoint_of(model, optimizer).write(str(tmp_path / "ckpt"))
    return dict(tf.train.list_variables(path))


@pytest.mark.slow  # trains, or runs a tool in a process
def test_an_option_that_changes_the_checkpoint_is_a_resume_option(tmp_path):
    """Derived, not listed: every option whose change alters what the checkpoint holds must
    be one a resume keeps (mixed_precision adds the loss scale; weights can change the
    backbone's layout; sizes change shapes)."""
    base = checkpoint_layout(BASE, tmp_path)
    changes = []
    for name, _, option in options.declared(TrainConfig):
        if name in ("strategy", "dataset", "weights"):  # need TF_CONFIG, data or a file
            continue
        values = ([c for c in option.choices if c != getattr(BASE, name)] if option.choices
                  else [changed(name, getattr(BASE, name), option)])
        layouts = []
        for value in values:
            keras.backend.clear_session()
            try:
                layouts.append(checkpoint_layout(dataclasses.replace(BASE, **{name: value}),
                                                 tmp_path))
            except ValueError:  # the model cannot be built so: that changes the checkpoint too
                layouts.append(None)
        if any(layout != base for layout in layouts):
            changes.append(name)
            assert option.resume, f"--{name} changes the checkpoint but may change on resume"
    assert {"mixed_precision", "embedding_dim", "num_parts", "backbone"} <= set(changes)
    assert "backbone_lr_multiplier" not in changes  # one optimizer: a factor, no new variables


def test_a_saved_config_reads_back_typed_and_an_old_one_still_reads(tmp_path):
    config = dataclasses.replace(TrainConfig(), lr_decay_steps=(10, 20), learning_rate=0.02,
                                 also_evaluate_on=("cuhk03/detected",))
    workdir_lib.record(str(tmp_path), config)
    assert workdir_lib.read_config(str(tmp_path)) == config  # lists back to typed tuples
    old = {"dataset": "market1501", "num_parts": 6, "learning_rate": 1, "lr_decay_steps": [5],
           "retired_option": 3}  # before most options existed, and one since removed
    read = options.read(TrainConfig, old)
    assert (read.dataset, read.num_parts, read.lr_decay_steps) == ("market1501", 6, (5,))
    assert read.learning_rate == 1.0 and isinstance(read.learning_rate, float)
    assert read.part_strategy == TrainConfig().part_strategy  # absent: its default


TOOL_FLAGS = """
import importlib, json, sys
from absl import flags
module = sys.argv[1]
importlib.import_module(module)
print(json.dumps(sorted(f.name for f in flags.FLAGS.get_flags_for_module(module))))
"""


@pytest.mark.slow  # runs each tool in a process
@pytest.mark.parametrize("module, config", [
    ("reid_tf.cli.eval", "reid_tf.evaluate.config.EvalConfig"),
    ("reid_tf.cli.extract", "reid_tf.evaluate.config.ExtractConfig"),
    ("reid_tf.cli.serve", "reid_tf.deploy.serving.config.ServeConfig"),
    ("reid_tf.cli.export", "reid_tf.deploy.config.ExportConfig"),
    ("reid_tf.cli.demo", "reid_tf.train.config.DemoConfig")])
def test_a_tool_declares_each_option_once(module, config):
    """Every flag of the tool is an option of its config (each tool in its own process: two
    tools' flags cannot share one absl registry)."""
    import importlib
    import json

    result = subprocess.run([sys.executable, "-c", TOOL_FLAGS, module], capture_output=True,
                            text=True, timeout=300, check=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    where, name = config.rsplit(".", 1)
    config_class = getattr(importlib.import_module(where), name)
    assert json.loads(result.stdout.splitlines()[-1]) == sorted(
        name for name, _, _ in options.declared(config_class))


def test_reid_eval_options_parse_and_check():
    from reid_tf.evaluate import config as eval_config
    from reid_tf.evaluate import evaluator

    declared = {name for name, _, _ in options.declared(eval_config.EvalConfig)}
    assert {name for name, _, _ in options.declared(evaluator.Scoring)} < declared
    values = flags.FlagValues()
    options.define_flags(eval_config.EvalConfig, values)
    values(["reid-eval", "--export=x/1", "--fars=0.5,0.05", "--k2=3", "--rerank"])
    config = options.from_flags(eval_config.EvalConfig, values)
    assert config.fars == (0.5, 0.05) and config.k2 == 3 and config.rerank
    with pytest.raises(ValueError, match="--batch_size=0"):
        options.check(dataclasses.replace(config, batch_size=0))
