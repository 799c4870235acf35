"""msmt17 dataset: MSMT17 (Wei et al., CVPR 2018) from the user's own download."""

from reid_datasets import reid_builder
from reid_tf.data import sources

FOLDERS = ("MSMT17_V1", "MSMT17_V2", "MSMT17")


class Builder(reid_builder.ReidBuilder):
    """MSMT17: 4,101 identities, 15 cameras, 126,441 boxes.

    Splits: train 32,621 images (list_train + list_val) / 1,041 ids; query 11,659 and gallery
    82,161 / 3,060 ids.
    """

    HOMEPAGE = "https://www.pkuvmc.com/dataset.html"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Request MSMT17 from its authors, unzip it, and pass the folder holding `MSMT17_V1/` (train/,
    test/, list_train.txt, list_val.txt, list_query.txt, list_gallery.txt) as manual_dir.
    """

    def _parse(self, manual_dir):
        return sources.parse_msmt17(sources.first_existing_folder(manual_dir, FOLDERS))
