"""Every recipe under experiments/ parses as reid-train flags and says what validation chose."""

import copy
import glob
import os

import pytest

RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "experiments",
                                        "*.flags")))


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_parses_and_its_header_names_validation_choices(path):
    from absl import flags

    from reid_tf.cli import train  # noqa: F401  (defines reid-train's flags)

    values = copy.deepcopy(flags.FLAGS)
    values(["reid-train", f"--flagfile={path}", "--workdir=unused"])  # unknown flags raise
    header = "".join(line for line in open(path) if line.startswith("#"))
    assert "validation" in header.lower()
    assert values["part_strategy"].value in ("bands", "peaks", "stripes", "activation")
    if "resnet50" in path and values["num_parts"].value:
        assert values["part_strategy"].value == "bands"  # the strategy chosen on validation
