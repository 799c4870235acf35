"""The contract of a live gallery, whatever holds it: `store.GalleryStore` (SQLite + faiss, the
embedded default) or `milvus.MilvusGallery` (Milvus Lite on a local file, or a Milvus server).
reid-serve only calls what is here; tests/test_gallery_contract.py runs one suite on each.

- `add(entries, meta=None) -> int`: adds, or replaces by id, every entry or none (a bad one
  raises `GalleryError` naming it, and nothing is written); returns once the backend holds
  them durably, as far as it promises (its docstring says how far): that is the acknowledgement.
  An entry: `id` (non-empty string), `embedding` (`dimension` finite numbers, not all zero;
  stored L2-normalised), optional `person_id`, `camera_id` (64-bit integers), `timestamp`
  (finite seconds), `metadata` (a JSON object) and `thumbnail` (JPEG bytes), kept together.
- `remove(ids) -> int`: removes these ids; how many existed.
- `search(queries, k=10, exclude_camera=None, time_range=None, report=False)`: per query, the k
  nearest entries passing the filters, nearest first, each `{id, person_id, camera_id,
  timestamp, metadata, thumbnail (bool), distance}` with distance = 1 - cosine similarity;
  `exclude_camera` leaves that camera out (entries without a camera stay), `time_range`
  `(start, end)` keeps entries with a timestamp inside (either bound None). `report=True`
  returns `(results, incomplete)`: a query that ended with fewer than k matches although more
  entries pass.
- `get(id)` (with its embedding) / `thumbnail(id)` / `browse(offset, limit)` (newest first,
  `(entries, total)`) / `stats()` / `count()` / `len()` / `staleness()` / `close()`.
- `import_features(arrays, ...)` / `import_progress()`: a seed import that resumes.
"""

import abc
import dataclasses
import json
import math

import numpy as np

from reid_tf.model.descriptors import unit_rows

FIELDS = ("id", "person_id", "camera_id", "timestamp", "metadata", "thumbnail")
MAX_ID_BYTES = 512
MAX_THUMBNAIL_BYTES = 256 << 10


class GalleryError(ValueError):
    """A bad entry or request: `field` names it (e.g. `entries[3].id`)."""

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class GalleryUnavailable(RuntimeError):
    """The gallery cannot answer right now without hiding entries (retry shortly)."""


class GalleryFull(RuntimeError):
    """The gallery's disk is full: the change was not written (HTTP 507)."""


def check_entries(entries, dimension, field="entries"):
    """Every entry of an `add`, checked (GalleryError names the first bad one): dicts of
    `FIELDS` plus `embedding` (float32, L2-normalised), absent fields None."""
    checked, seen = [], set()
    for i, entry in enumerate(entries):
        where = f"{field}[{i}]"
        if not isinstance(entry, dict):
            raise GalleryError(where, "expected an object with 'id' and an embedding.")
        entry_id = entry.get("id")
        if not isinstance(entry_id, str) or not entry_id:
            raise GalleryError(f"{where}.id", "expected a non-empty string.")
        try:
            size = len(entry_id.encode("utf-8"))
        except UnicodeEncodeError:
            raise GalleryError(f"{where}.id", "not valid Unicode (a lone surrogate?).") \
                from None
        if size > MAX_ID_BYTES:
            raise GalleryError(f"{where}.id", f"{size} bytes; at most {MAX_ID_BYTES}.")
        if entry_id in seen:
            raise GalleryError(f"{where}.id", f"{entry_id!r} appears twice in the request.")
        seen.add(entry_id)
        try:
            with np.errstate(over="ignore"):
                embedding = np.asarray(entry.get("embedding"), np.float32)
        except (OverflowError, ValueError, TypeError):
            embedding = None
        if embedding is None or embedding.shape != (dimension,) \
                or not np.isfinite(embedding).all():
            raise GalleryError(f"{where}.embedding", f"expected {dimension} finite numbers.")
        if not np.any(embedding):
            raise GalleryError(f"{where}.embedding", "all zeros: it has no direction.")
        values = {"id": entry_id, "embedding": unit_rows(embedding[None])[0]}
        for name in ("person_id", "camera_id"):
            value = entry.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not -2 ** 63 <= value < 2 ** 63):
                raise GalleryError(f"{where}.{name}", "expected an integer (64-bit).")
            values[name] = value
        timestamp = entry.get("timestamp")
        if timestamp is not None:
            try:
                valid = (isinstance(timestamp, (int, float)) and not isinstance(timestamp, bool)
                         and math.isfinite(float(timestamp)))
            except (OverflowError, TypeError, ValueError):
                valid = False
            if not valid:
                raise GalleryError(f"{where}.timestamp", "expected a finite number (seconds).")
            timestamp = float(timestamp)
        values["timestamp"] = timestamp
        metadata = entry.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise GalleryError(f"{where}.metadata", "expected a JSON object.")
        values["metadata"] = metadata
        thumbnail = entry.get("thumbnail")
        if thumbnail is not None and (not isinstance(thumbnail, bytes) or not thumbnail
                                      or len(thumbnail) > MAX_THUMBNAIL_BYTES):
            raise GalleryError(f"{where}.thumbnail", "expected JPEG bytes, at most "
                               f"{MAX_THUMBNAIL_BYTES} of them.")
        values["thumbnail"] = thumbnail
        checked.append(values)
    return checked


@dataclasses.dataclass(frozen=True)
class EntryLimits:
    """Bounds on what one entry may carry (reid-serve's --max_metadata_bytes and
    --max_metadata_depth): metadata nested 256 deep was accepted once and then broke every
    answer that returned it (the JSON writer's depth limit), and 1 MB of it rode with every
    hit."""

    max_metadata_bytes: int = 16 << 10
    max_metadata_depth: int = 16


def check_metadata(metadata, field, limits=EntryLimits()):
    """GalleryError naming `field` and the limit when `metadata` is nested deeper or is larger
    (as JSON) than `limits` allow. The depth is measured without recursion."""
    depth, level = 0, [metadata]
    while level:
        depth += 1
        if depth > limits.max_metadata_depth:
            raise GalleryError(field, f"nested deeper than {limits.max_metadata_depth} levels "
                               "(--max_metadata_depth).")
        level = [child for value in level
                 for child in (value.values() if isinstance(value, dict) else value)
                 if isinstance(child, (dict, list))]
    size = len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode())
    if size > limits.max_metadata_bytes:
        raise GalleryError(field, f"{size} bytes of JSON; at most {limits.max_metadata_bytes} "
                           "(--max_metadata_bytes).")


def check_ids(ids):
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise GalleryError("ids", "expected a list of entry ids (strings).")
    return ids


def no_filter(time_range):
    """`time_range` with `[None, None]` (bounds nothing) as None."""
    return None if time_range is not None and tuple(time_range) == (None, None) else time_range


class Gallery(abc.ABC):
    """A live gallery (the module's docstring is the contract)."""

    dimension: int

    @abc.abstractmethod
    def add(self, entries, meta=None):
        ...

    @abc.abstractmethod
    def remove(self, ids):
        ...

    @abc.abstractmethod
    def search(self, queries, k=10, exclude_camera=None, time_range=None, report=False):
        ...

    @abc.abstractmethod
    def get(self, entry_id):
        ...

    @abc.abstractmethod
    def thumbnail(self, entry_id):
        ...

    @abc.abstractmethod
    def browse(self, offset=0, limit=50):
        ...

    @abc.abstractmethod
    def stats(self):
        ...

    @abc.abstractmethod
    def count(self):
        ...

    @abc.abstractmethod
    def import_progress(self):
        ...

    @abc.abstractmethod
    def close(self):
        ...

    def __len__(self):
        return self.count()

    def staleness(self):
        """Changes acknowledged but not yet in a derived index file (0: none kept)."""
        return 0

    def import_features(self, arrays, id_prefix="", source=None, start=0, chunk=10000):
        """Seeds the gallery from a reid-extract features.npz (ids: its file names; optional
        `thumbnails`: JPEG bytes per entry), `chunk` entries per `add` from entry `start`. Each
        `add` also records how far the import of `source` got (`import_progress()`), so a
        killed import resumes where it stopped. Returns the entries imported by this call."""
        total = len(arrays["file_names"])
        for begin in range(start, total, chunk):
            entries = []
            for i in range(begin, min(begin + chunk, total)):
                entry = {"id": id_prefix + str(arrays["file_names"][i]),
                         "embedding": arrays["embeddings"][i]}
                for key in ("person_id", "camera_id"):
                    if f"{key}s" in arrays:
                        entry[key] = int(arrays[f"{key}s"][i])
                if arrays.get("thumbnails") is not None and arrays["thumbnails"][i]:
                    entry["thumbnail"] = arrays["thumbnails"][i]
                entries.append(entry)
            progress = {"source": source, "total": total, "done": begin + len(entries)}
            self.add(entries, meta={"import": json.dumps(progress)})
        return total - start
