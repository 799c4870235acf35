"""msmt17 dataset."""

from reid_datasets.msmt17.msmt17_dataset_builder import Builder  # noqa: F401
