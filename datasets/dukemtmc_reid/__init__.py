"""dukemtmc_reid dataset."""

from reid_datasets.dukemtmc_reid.dukemtmc_reid_dataset_builder import Builder  # noqa: F401
