"""How reid-serve opens its gallery: the index spec, and seeding an empty gallery from a
features.npz or a folder of images."""

import dataclasses
import sqlite3

from reid_tf.data import splits
from reid_tf.deploy.gallery import thumbnails
from reid_tf.deploy.gallery.store import GalleryStore
from reid_tf.evaluate import extract
from reid_tf.evaluate import features_npz
from reid_tf.options import Option


def start_error(problem, gallery_db):
    """reid-serve's one line for a start-up failure: an SQLite error names --gallery_db (not a
    database, a folder, a missing folder); others give their first line (RuntimeError:
    faiss's)."""
    if isinstance(problem, sqlite3.Error):
        return (f"--gallery_db={gallery_db}: {str(problem).strip() or type(problem).__name__}"
                " (an SQLite gallery database, or a new file in an existing folder)")
    return str(problem).strip().splitlines()[0]


def index_spec(index, nlist):
    """--index as a faiss index_factory string (the old names flat and ivf still work)."""
    return {"flat": "Flat", "ivf": f"IVF{nlist},Flat"}.get(index, index)


def backend_of(uri):
    """`(backend, location)` of --gallery_uri: `sqlite:PATH` (the SQLite + faiss store),
    `milvus:PATH` (Milvus Lite on a local file) or `http(s)://host:port` (a Milvus server)."""
    if uri.startswith(("http://", "https://")):
        return "milvus", uri
    for scheme in ("sqlite", "milvus"):
        if uri.startswith(scheme + ":"):
            location = uri[len(scheme) + 1:]
            location = location[2:] if location.startswith("//") else location
            if not location:
                break
            return scheme, location
    raise ValueError(f"--gallery_uri={uri}: expected sqlite:PATH, milvus:PATH (Milvus Lite) or "
                     "http://host:19530 (a Milvus server).")


IMPORT_CHUNK = 10_000  # entries per transaction of a seed import (its unit of resumption)


@dataclasses.dataclass(frozen=True)
class GalleryOptions:
    """Where the gallery lives, its index and its seed (reid-serve's options, declared once)."""

    gallery_db: str = Option(None, "The live gallery's SQLite file (created if missing; the "
                             "source of truth, survives restarts). Without it the gallery "
                             "lives in memory only.").field()
    gallery_uri: str = Option(None, "Another gallery backend: milvus:PATH (Milvus Lite, "
                              "embedded, one local file), http://host:19530 (a Milvus server "
                              "or cluster), or sqlite:PATH (= --gallery_db). Needs pip install "
                              "'reid-tf[milvus]' for Milvus.").field()
    milvus_index: str = Option("FLAT", "The Milvus gallery's vector index (with --nlist, "
                               "--nprobe, --ef_search), set when its collection is created.",
                               choices=("FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW")).field()
    milvus_collection: str = Option("reid_gallery", "The Milvus collection.").field()
    milvus_token: str = Option("", "A Milvus server's credentials (user:password or an API "
                               "key).").field()
    gallery: str = Option(None, "A features.npz (reid-extract) that seeds an empty "
                          "gallery.").field()
    gallery_images: str = Option(None, "Or a folder of gallery images, extracted at start (a "
                                 "Market layout root: its bounding_box_test).").field()
    index: str = Option("Flat", "faiss index_factory string of the gallery index: Flat "
                        "(exact), IVF4096,SQ8, IVF4096,PQ64, HNSW32, ... (flat and ivf: the "
                        "earlier names).").field()
    nlist: int = Option(100, "IVF lists when --index=ivf.", minimum=1).field()
    nprobe: int = Option(16, "IVF lists searched per query.", minimum=1).field()
    ef_search: int = Option(64, "HNSW search breadth.", minimum=1).field()
    persist_every: int = Option(1000, "Write the index file every this many gallery changes "
                                "(and at shutdown).").field()

    @property
    def wanted(self):
        """Whether these options ask for a gallery at all."""
        return bool(self.gallery_db or self.gallery_uri or self.gallery or self.gallery_images)


def open_gallery(export, options=GalleryOptions(), log=print,
                 thumbnail_size=thumbnails.DEFAULT_HEIGHT):
    """The server's gallery (`export`: a runtime; `options`: `GalleryOptions`): the SQLite store
    at `gallery_db` (durable; ":memory:" when None) or the backend of `gallery_uri`
    (`backend_of`), seeded from a features.npz (`gallery`) or a folder of images
    (`gallery_images`, with thumbnails `thumbnail_size` pixels high, 0 for none) when it is
    empty."""
    o = options
    npz, images, uri, gallery_db = o.gallery, o.gallery_images, o.gallery_uri, o.gallery_db
    if npz and images:
        raise ValueError("give one of --gallery and --gallery_images.")
    if uri and gallery_db:
        raise ValueError("give one of --gallery_db and --gallery_uri.")
    backend, location = backend_of(uri) if uri else ("sqlite", gallery_db or ":memory:")
    model = getattr(export, "model_id", None)
    if backend == "sqlite":
        store = GalleryStore(location, dimension=export.embedding_width,
                             index=index_spec(o.index, o.nlist), nprobe=o.nprobe,
                             ef_search=o.ef_search, persist_every=o.persist_every, log=log,
                             model=model)
    else:
        from reid_tf.deploy.gallery.milvus import MilvusGallery

        store = MilvusGallery(location, dimension=export.embedding_width, nprobe=o.nprobe,
                              ef_search=o.ef_search, model=model, log=log, index=o.milvus_index,
                              nlist=o.nlist, collection=o.milvus_collection,
                              token=o.milvus_token)
    gallery_db = uri or gallery_db
    source = npz or images
    if source:
        progress = store.import_progress()
        resume = (progress is not None and progress["source"] == source
                  and progress["done"] < progress["total"])
        if store.count() and not resume:
            log(f"gallery: {gallery_db} already holds {store.count()} entries; "
                f"{source} not imported again")
            return store
        arrays = _read_seed(export, npz, images, thumbnail_size)
        width = arrays["embeddings"].shape[1]
        if width != store.dimension:
            raise ValueError(f"{source}: embeddings of {width}, but the model and the gallery "
                             f"hold {store.dimension}: extract it with this model's export.")
        start = progress["done"] if resume else 0
        if resume:
            log(f"gallery: resuming the interrupted import of {source}: {start} of "
                f"{progress['total']} entries were in; importing the other "
                f"{progress['total'] - start}")
        imported = store.import_features(arrays, source=source, start=start,
                                         chunk=IMPORT_CHUNK)
        log(f"gallery: imported {imported} entries from {source}")
    return store


def _read_seed(export, npz, images, thumbnail_size):
    if npz:
        return features_npz.load_features(npz)
    split = splits.load_split(images=images, split="gallery")
    embeddings = extract.extract(export, split, ["embedding"], encoded=True,
                                 description="extracting")["embedding"]
    arrays = dict(features_npz.feature_arrays(embeddings, split.file_names, split.person_ids,
                                              split.camera_ids))
    if thumbnail_size:
        arrays["thumbnails"] = thumbnails.thumbnails_of(split, thumbnail_size)
    return arrays
