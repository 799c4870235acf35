"""Options: each declared once, with its type, default, help and whether a resume must keep it.

A config is a dataclass whose fields are `Option(...).field()`; its command-line flags
(`define_flags`), the config built from them (`from_flags`, or `parse` from a command line
of one's own), the checks of values
(`check`) and the resume check (`resume_options`) are all derived from those declarations, so a
flag without a field, or a field without a flag, cannot exist; `read` turns a saved config
(config.json) back into its typed config. Options that several tools
share (`EXPORT`, `DATASET`, `DATA_DIR`, `MANUAL_DIR`, `SKIP_CORRUPT`, `IMAGE_HEIGHT`, `IMAGE_WIDTH`,
`BATCH_SIZE`) are declared here once and defined by each tool with `define`.
"""

import dataclasses
import sys

from absl import app
from absl import flags


@dataclasses.dataclass(frozen=True)
class Option:
    """One option.

    Args:
        default: its value when not given.
        help: what it means (the flag's help text).
        resume: True if a resumed run must keep it: it changes what the checkpoint holds, the
            order or content of the training data, or what training computes.
        choices: the valid values (an enum flag).
        minimum: the smallest valid value of a number.
        item: the type of each item of a tuple option (a comma-separated flag).
    """

    default: object
    help: str
    resume: bool = False
    choices: tuple = None
    minimum: float = None
    item: type = None

    def field(self):
        """A dataclass field declaring this option."""
        return dataclasses.field(default=self.default, metadata={"option": self})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def declared(config_class):
    """`[(name, type, Option)]` of a config dataclass, in declaration order."""
    return [(f.name, f.type, f.metadata["option"]) for f in dataclasses.fields(config_class)
            if "option" in f.metadata]


def _caller_module(depth):
    """The module that asked for a flag, as absl names it (--help lists its flags)."""
    name = sys._getframe(depth + 1).f_globals.get("__name__", "")
    return sys.argv[0] if name == "__main__" else name


def define(name, kind, option, flag_values=flags.FLAGS, module_name=None):
    """Defines the absl flag `--name` of one option, as the calling module's flag."""
    module_name = module_name or _caller_module(1)
    common = dict(flag_values=flag_values, module_name=module_name)
    if option.choices:
        flags.DEFINE_enum(name, option.default, list(option.choices), option.help, **common)
    elif kind is bool:
        flags.DEFINE_bool(name, option.default, option.help, **common)
    elif kind is int:
        flags.DEFINE_integer(name, option.default, option.help, **common)
    elif kind is float:
        flags.DEFINE_float(name, option.default, option.help, **common)
    elif kind is tuple:
        flags.DEFINE_list(name, list(option.default), option.help, **common)
    else:
        flags.DEFINE_string(name, option.default, option.help, **common)


def define_flags(config_class, flag_values=flags.FLAGS, module_name=None):
    """Defines a flag for every option of `config_class`, as the calling module's flags."""
    module_name = module_name or _caller_module(1)
    for name, kind, option in declared(config_class):
        define(name, kind, option, flag_values, module_name)


def value(name, kind, option, flag_values=flags.FLAGS):
    """The parsed value of one option's flag, as the config holds it."""
    raw = flag_values[name].value
    if kind is tuple:
        return tuple(option.item(item) for item in raw)
    if kind is str and option.default is None:
        return raw or None  # an empty flag means "not given"
    return raw


def from_flags(config_class, flag_values=flags.FLAGS):
    """The config of `config_class` built from its parsed flags."""
    return config_class(**{name: value(name, kind, option, flag_values)
                           for name, kind, option in declared(config_class)})


def parse(config_class, argv):
    """The config a tool of `config_class` builds from the command line `argv` (without the
    program's name; flagfiles are read), in flag values of its own: for callers that are not
    the tool (the search driver, tests).

    >>> from reid_tf.train.config import TrainConfig
    >>> parse(TrainConfig, ["--epochs=3", "--noflip"]).epochs
    3
    """
    flag_values = flags.FlagValues()
    define_flags(config_class, flag_values, module_name="parse")
    flag_values(["parse", *argv])
    return from_flags(config_class, flag_values)


def checked_from_flags(config_class, flag_values=flags.FLAGS):
    """`from_flags`, then `check`: a value outside its declaration is absl's UsageError (the
    tool prints it with its usage line), before any work."""
    config = from_flags(config_class, flag_values)
    try:
        check(config)
    except ValueError as problem:
        raise app.UsageError(str(problem)) from None
    return config


def check(config):
    """ValueError naming the flag, for a value outside its declared choices or minimum."""
    for name, _, option in declared(type(config)):
        given = getattr(config, name)
        if option.choices and given not in option.choices:
            raise ValueError(f"--{name}={given!r}: expected one of {tuple(option.choices)}.")
        if option.minimum is not None and given is not None and given < option.minimum:
            expected = ("a positive integer" if option.minimum == 1 and isinstance(given, int)
                        else f"a value >= {option.minimum}")
            raise ValueError(f"--{name}={given}: expected {expected}.")


def read(config_class, saved):
    """The config of `config_class` from a saved mapping (a config.json), typed as declared:
    lists become tuples of their item type, ints stored for floats become floats. An option the
    file lacks (written before the option existed) takes its default; a key the class no longer
    declares is left out."""
    values = {}
    for name, kind, option in declared(config_class):
        if name not in saved:
            continue
        raw = saved[name]
        if kind is tuple:
            raw = tuple(option.item(item) for item in (raw or ()))
        elif kind is float and isinstance(raw, int) and not isinstance(raw, bool):
            raw = float(raw)
        values[name] = raw
    return config_class(**values)


def resume_options(config_class):
    """The names of the options a resumed run must keep."""
    return tuple(name for name, _, option in declared(config_class) if option.resume)


# Shared by reid-train, reid-eval, reid-extract and reid-serve.
EXPORT = Option(None, "A SavedModel export folder (<export_dir>/<version>).")
DATASET = Option("synthetic_persons", "A TFDS name (synthetic_persons, market1501, "
                 "cuhk03/labeled, ...), folder:PATH (Market layout) or identity_folders:PATH.",
                 resume=True)
DATA_DIR = Option(None, "TFDS data_dir (default ~/tensorflow_datasets).")
MANUAL_DIR = Option(None, "Folder holding the downloaded dataset (TFDS manual_dir).")
SKIP_CORRUPT = Option(False, "Leave out images that do not decode (else fail, naming them).",
                      resume=True)
IMAGE_HEIGHT = Option(256, "Input height.", resume=True, minimum=1)
IMAGE_WIDTH = Option(128, "Input width.", resume=True, minimum=1)
BATCH_SIZE = Option(64, "Images per batch when extracting features.", minimum=1)
