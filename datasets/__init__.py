"""TFDS builders for ReID datasets, installed as the package `reid_datasets`.

The repository folder is `datasets/` (the product's layout); it installs under another name so it
never shadows the HuggingFace `datasets` distribution. Importing a builder module registers it
with TFDS, e.g.:

    import reid_datasets.market1501  # registers "market1501"
    tfds.builder("market1501", data_dir=...).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="~/data"))

`BUILDERS` maps each dataset name to the module that registers it.
"""

import importlib

BUILDERS = {
    "market1501": "reid_datasets.market1501",
    "dukemtmc_reid": "reid_datasets.dukemtmc_reid",
    "cuhk03": "reid_datasets.cuhk03",
    "msmt17": "reid_datasets.msmt17",
    "viper": "reid_datasets.viper",
    "synthetic_persons": "reid_datasets.synthetic_persons",
}


def register(name):
    """Imports the module of dataset `name` (registering its builder); KeyError lists names."""
    if name.split("/")[0] not in BUILDERS:
        raise KeyError(f"dataset {name!r}: expected one of {sorted(BUILDERS)}.")
    return importlib.import_module(BUILDERS[name.split("/")[0]])
