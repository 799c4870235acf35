"""How reid-serve opens its gallery: the index spec, and seeding an empty gallery from a
features.npz or a folder of images."""

import sqlite3

from reid_tf.data import splits
from reid_tf.deploy.gallery import thumbnails
from reid_tf.deploy.gallery.store import GalleryStore
from reid_tf.evaluate import extract
from reid_tf.evaluate import features_npz


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


def open_gallery(export, gallery_db=None, npz=None, images=None, index="Flat", nprobe=16,
                 ef_search=64, persist_every=1000, log=print,
                 thumbnail_size=thumbnails.DEFAULT_HEIGHT, uri=None, milvus=None):
    """The server's gallery (`export`: a runtime): `gallery_db` (the SQLite store, durable;
    ":memory:" when None) or `uri` (`backend_of`; `milvus`: MilvusGallery's options), seeded
    from a features.npz or a folder of images when it is empty (images: with thumbnails
    `thumbnail_size` pixels high, 0 for none)."""
    if npz and images:
        raise ValueError("give one of --gallery and --gallery_images.")
    if uri and gallery_db:
        raise ValueError("give one of --gallery_db and --gallery_uri.")
    backend, location = backend_of(uri) if uri else ("sqlite", gallery_db or ":memory:")
    model = getattr(export, "model_id", None)
    if backend == "sqlite":
        store = GalleryStore(location, dimension=export.embedding_width, index=index,
                             nprobe=nprobe, ef_search=ef_search, persist_every=persist_every,
                             log=log, model=model)
    else:
        from reid_tf.deploy.gallery.milvus import MilvusGallery

        store = MilvusGallery(location, dimension=export.embedding_width, nprobe=nprobe,
                              ef_search=ef_search, model=model, log=log, **(milvus or {}))
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
