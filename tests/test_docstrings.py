"""The `>>>` examples in reid_tf's docstrings run, as keras-hub runs its own (issue 40): a
docstring that shows a call and its answer stays true."""

import doctest
import importlib
import os

import numpy as np
import pytest
import tensorflow as tf

import reid_tf

PACKAGE = os.path.dirname(reid_tf.__file__)


def modules_with_examples():
    names = []
    for folder, _, files in os.walk(PACKAGE):
        for file in sorted(files):
            path = os.path.join(folder, file)
            if file.endswith(".py") and ">>>" in open(path, encoding="utf-8").read():
                relative = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3]
                names.append(relative.replace(os.sep, "."))
    return sorted(names)


def test_the_examples_are_found():
    found = modules_with_examples()
    assert "reid_tf.model.plnet" in found and len(found) >= 6, found


@pytest.mark.parametrize("name", modules_with_examples())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    examples = 0
    for test in finder.find(module, name, globs={"tf": tf, "np": np, **vars(module)}):
        runner.run(test)
        examples += len(test.examples)
    assert examples > 0
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0, f"{failed} of {attempted} examples in {name} failed (output above)"
