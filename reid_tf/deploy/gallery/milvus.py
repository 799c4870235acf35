"""The live gallery on Milvus, through pymilvus: the same contract as the SQLite + faiss store
(`contract`), for galleries that outgrow one machine.

    MilvusGallery("gallery_milvus.db", dimension=1280)         # Milvus Lite, embedded, one file
    MilvusGallery("http://milvus:19530", dimension=1280, index="HNSW")   # a server or cluster

One collection holds every entry: `id` (the primary key, VARCHAR), `embedding` (FLOAT_VECTOR,
L2-normalised; inner-product metric, so distance = 1 - score), and scalar fields `person_id`,
`camera_id` (INT64), `timestamp` (DOUBLE), `metadata` (JSON), `thumbnail` (VARCHAR: the JPEG in
base64, since a VARCHAR holds at most 65,535 bytes: thumbnails up to `MAX_THUMBNAIL_BYTES`, a
128-pixel-high JPEG is 2-8 KB) and `added` (INT64 nanoseconds, the order of `browse`). An absent
value is a BOOL beside its field (`has_camera_id`, ..., `has_thumbnail`, what a search returns
instead of the bytes), not a null: Milvus servers before 2.5 (the `milvus` package's standalone
server is 2.3.5) have no nullable fields, and this one schema works on all of them and on Milvus
Lite (`FlaggedColumns`). Collections written by reid-tf before it used nullable fields
(`NullableColumns`); they are still read and written as they are. The
filters of a search are pushed down as a Milvus boolean expression on the scalar fields, never
applied afterwards in Python. An approximate index (IVF, HNSW) searches only part of the
collection, so a filter passing few entries can leave a query short of k: then the passing
entries are counted, up to `EXACT_FILTER_LIMIT` of them are searched exactly (read back with
their embeddings), and a query still short with more passing is flagged incomplete. A second
collection,
`<name>_meta`, keeps the model's identity and the seed import's progress.

Durability: `add` returns after Milvus acknowledges the upsert. Milvus Lite writes it to its
local file before answering (tests/test_gallery_contract.py kills the serving process during a
stream of adds and finds every acknowledged entry after a restart); a Milvus server or cluster
acknowledges an insert once its write-ahead log (the message queue: Pulsar, Kafka or the
Woodpecker log) holds it, and `flush` seals segments to object storage, which a restart does not
need. Replacing by id is Milvus's upsert (a delete and an insert, atomic per entity).
"""

import base64
import contextlib
import json
import logging
import threading
import time

import numpy as np

from reid_tf.deploy.gallery.contract import Gallery
from reid_tf.deploy.gallery.contract import GalleryError
from reid_tf.deploy.gallery.contract import GalleryUnavailable
from reid_tf.deploy.gallery.contract import MAX_ID_BYTES
from reid_tf.deploy.gallery.contract import check_entries
from reid_tf.deploy.gallery.contract import check_ids
from reid_tf.deploy.gallery.contract import no_filter
from reid_tf.extras import require
from reid_tf.model.descriptors import unit_rows

MAX_THUMBNAIL_BYTES = 48 << 10  # its base64 fits a VARCHAR (65,535 bytes)
INDEXES = ("FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW")
EXACT_FILTER_LIMIT = 4096  # a short filtered query passing at most this many is searched exactly


def index_parameters(index, nlist=128, hnsw_m=32):
    """`(index_type, build params)` of --milvus_index."""
    if index not in INDEXES:
        raise ValueError(f"--milvus_index={index}: expected one of {', '.join(INDEXES)}.")
    if index.startswith("IVF"):
        return index, {"nlist": nlist}
    if index == "HNSW":
        return index, {"M": hnsw_m, "efConstruction": 200}
    return index, {}


class FlaggedColumns:
    """The scalar fields with an absent value flagged by a BOOL beside it (`has_<field>`):
    nothing nullable, so every Milvus server from 2.3 reads it. What a row holds, how an entry
    becomes a row and back, and the filters as an expression on these fields."""

    OPTIONAL = ("person_id", "camera_id", "timestamp", "metadata")
    EMPTY = {"person_id": 0, "camera_id": 0, "timestamp": 0.0, "metadata": {}}

    @property
    def scalars(self):
        """What a search, get or browse reads back: every scalar but the thumbnail's bytes."""
        return (*self.fields_of(*self.OPTIONAL), "has_thumbnail")

    def fields_of(self, *names):
        """The fields that hold `names`' values: each with its flag."""
        return (*names, *(f"has_{name}" for name in names))

    def add_fields(self, schema, types):
        kinds = {"person_id": types.INT64, "camera_id": types.INT64,
                 "timestamp": types.DOUBLE, "metadata": types.JSON}
        for name in self.OPTIONAL:
            schema.add_field(name, kinds[name])
            schema.add_field(f"has_{name}", types.BOOL)
        schema.add_field("thumbnail", types.VARCHAR, max_length=65535)
        schema.add_field("has_thumbnail", types.BOOL)

    def row(self, entry):
        row = {}
        for name in self.OPTIONAL:
            present = entry[name] is not None
            row[name], row[f"has_{name}"] = entry[name] if present else self.EMPTY[name], present
        row["thumbnail"] = _base64(entry["thumbnail"]) or ""
        row["has_thumbnail"] = entry["thumbnail"] is not None
        return row

    def value(self, row, name):
        return row.get(name) if row.get(f"has_{name}") else None

    def is_null(self, name):
        return f"has_{name} == false"

    def not_null(self, name):
        return f"has_{name} == true"

    def filter(self, exclude_camera=None, time_range=None):
        """The Milvus boolean expression of the search filters (numbers only: nothing a client
        sends is pasted in as text), or "" for none; the same test as the SQLite store's."""
        clauses = []
        if exclude_camera is not None:
            clauses.append(f"({self.is_null('camera_id')} or camera_id != {int(exclude_camera)})")
        if time_range is not None:
            start, end = time_range
            clauses.append(self.not_null("timestamp"))
            if start is not None:
                clauses.append(f"timestamp >= {float(start)!r}")
            if end is not None:
                clauses.append(f"timestamp <= {float(end)!r}")
        return " and ".join(clauses)


class NullableColumns(FlaggedColumns):
    """The scalar fields of collections written before `FlaggedColumns`: each nullable (Milvus
    2.5 and later, and Milvus Lite), with `has_thumbnail` the only flag."""

    def fields_of(self, *names):
        return names

    def add_fields(self, schema, types):
        schema.add_field("person_id", types.INT64, nullable=True)
        schema.add_field("camera_id", types.INT64, nullable=True)
        schema.add_field("timestamp", types.DOUBLE, nullable=True)
        schema.add_field("metadata", types.JSON, nullable=True)
        schema.add_field("thumbnail", types.VARCHAR, max_length=65535, nullable=True)
        schema.add_field("has_thumbnail", types.BOOL)

    def row(self, entry):
        return {**{name: entry[name] for name in self.OPTIONAL},
                "thumbnail": _base64(entry["thumbnail"]),
                "has_thumbnail": entry["thumbnail"] is not None}

    def value(self, row, name):
        return row.get(name)

    def is_null(self, name):
        return f"{name} is null"

    def not_null(self, name):
        return f"{name} is not null"


def _base64(data):
    return None if data is None else base64.b64encode(data).decode()


# Escapes inside a double-quoted literal of Milvus's expression grammar: everything else stands
# for itself there, so an id can never end its literal and add a clause.
_LITERAL_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def string_literal(value):
    """`value` as a Milvus expression string literal. pymilvus's `get`/`delete(ids=...)` paste
    ids between single quotes unescaped (`x'] or id like '%' ...` matched every entry), and
    filter templates (`id in {ids}` with `filter_params`) are refused by Milvus Lite 3.2
    ("unexpected character '{'"), so every id goes through this one encoder instead
    (tests/test_gallery_contract.py: quotes, backslashes, brackets, wildcards, filter syntax)."""
    return '"' + "".join(_LITERAL_ESCAPES.get(ch, ch) for ch in value) + '"'


def in_expression(field, values):
    """`field in ["...", ...]`: the rows whose string `field` is one of `values`."""
    return f"{field} in [{', '.join(string_literal(v) for v in values)}]"


def _milvus_call(method):
    """Runs a gallery method with Milvus's errors as GalleryUnavailable (`_errors`)."""
    def call(self, *args, **kwargs):
        with self._errors():
            return method(self, *args, **kwargs)
    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


class MilvusGallery(Gallery):
    """A gallery in a Milvus collection (the module docstring says what is stored where).

    Args:
        uri: a local file path (Milvus Lite) or `http://host:19530` (a Milvus server).
        dimension: embedding width; taken from the collection when it exists.
        collection: the collection's name.
        index, nlist, nprobe, ef_search: the vector index (`INDEXES`) and its parameters.
        model: the export's `model_id`; a collection of another model's embeddings is refused.
        token: a server's credentials ("user:password" or an API key).
    """

    def __init__(self, uri, dimension=None, collection="reid_gallery", index="FLAT", nlist=128,
                 nprobe=16, ef_search=64, model=None, log=print, token=""):
        pymilvus = require("pymilvus")
        self._types = pymilvus.DataType
        self.uri, self.collection, self.log = uri, collection, log
        self.meta_collection = f"{collection}_meta"
        self.index_spec = index
        self.search_params = {"metric_type": "IP", "params": {"nprobe": nprobe, "ef": ef_search}}
        self._lock = threading.Lock()  # one writer at a time keeps replace-by-id ordered
        self._level = "Session"  # `_read`
        self._exception = pymilvus.exceptions.MilvusException
        self.local = not uri.startswith(("http://", "https://", "tcp://", "unix:"))
        if self.local:
            # Milvus Lite's in-process gRPC server logs a traceback for each call it does not
            # implement (pymilvus 3 asks it for timestamps first); the calls go on regardless.
            logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
        with self._errors():
            self.client = pymilvus.MilvusClient(uri, token=token)
            self._open(collection, dimension, index, nlist, model)

    @contextlib.contextmanager
    def _errors(self):
        """Milvus's own errors (a server down, a timeout) as GalleryUnavailable: reid-serve
        answers 503 with Retry-After, and names the gallery at start."""
        try:
            yield
        except self._exception as error:
            raise GalleryUnavailable(f"Milvus at {self.uri}: {error.message}") from None

    def _open(self, collection, dimension, index, nlist, model):
        uri = self.uri
        if self.client.has_collection(collection):
            fields = {f["name"]: f for f in self.client.describe_collection(collection)["fields"]}
            stored = int(fields["embedding"]["params"]["dim"])
            if dimension is not None and stored != dimension:
                raise ValueError(f"{uri} ({collection}): holds embeddings of {stored}, not "
                                 f"{dimension}.")
            self.dimension = stored
            self.columns = FlaggedColumns() if "has_camera_id" in fields else NullableColumns()
        else:
            if dimension is None:
                raise ValueError(f"{uri}: an empty gallery needs its embedding dimension.")
            self.dimension = dimension
            self.columns = FlaggedColumns()
            self._create(index, nlist)
        self.client.load_collection(collection)
        self.client.load_collection(self.meta_collection)
        self._check_model(model)

    # ---------------------------------------------------------------- set-up

    def _create(self, index, nlist):
        types = self._types
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", types.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
        schema.add_field("embedding", types.FLOAT_VECTOR, dim=self.dimension)
        self.columns.add_fields(schema, types)
        schema.add_field("added", types.INT64)
        index_type, params = index_parameters(index, nlist)
        indexes = self.client.prepare_index_params()
        indexes.add_index("embedding", index_type=index_type, metric_type="IP", params=params)
        self.client.create_collection(self.collection, schema=schema, index_params=indexes,
                                      consistency_level="Strong")
        meta = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        meta.add_field("key", types.VARCHAR, is_primary=True, max_length=64)
        meta.add_field("value", types.VARCHAR, max_length=65535)
        meta.add_field("vector", types.FLOAT_VECTOR, dim=2)  # Milvus needs one per collection
        meta_index = self.client.prepare_index_params()
        meta_index.add_index("vector", index_type="FLAT", metric_type="L2")
        self.client.create_collection(self.meta_collection, schema=meta, index_params=meta_index,
                                      consistency_level="Strong")

    def _read(self):
        """Every read sees this process's acknowledged writes. Session consistency waits for the
        server to have applied this process's last upsert, where Strong waits for its newest
        time tick (a server's proxy ticks every 200 ms: each Strong read took about 200 ms).
        A Milvus 2.3 server returns no time for a delete by filter, so after a delete the reads
        are Strong until the next upsert."""
        return {"consistency_level": self._level}

    def _meta(self, key):
        found = self._by_key(self.meta_collection, "key", [key], ["value"])
        return found[0]["value"] if found else None

    def _by_key(self, collection, field, values, output_fields):
        """The rows of `collection` whose primary key `field` is one of `values` (never
        pymilvus's `get`, which pastes the keys in unescaped)."""
        return self.client.query(collection, filter=in_expression(field, values),
                                 output_fields=output_fields, **self._read()) if values else []

    def _set_meta(self, values):
        self.client.upsert(self.meta_collection, [
            {"key": key, "value": value, "vector": [0.0, 0.0]} for key, value in values.items()])

    def _check_model(self, model):
        if model is None:
            return
        stored = self._meta("model")
        if stored is not None and stored != model:
            raise ValueError(f"{self.uri} ({self.collection}): holds embeddings of model "
                             f"{stored}, not of this export's {model}.")
        if stored is None:
            self._set_meta({"model": model})

    # ---------------------------------------------------------------- changes

    @_milvus_call
    def add(self, entries, meta=None):
        """Adds (or replaces, by id) `entries` in one upsert; returns once Milvus acknowledged
        it. GalleryError names a bad entry; nothing is written then."""
        checked = check_entries(entries, self.dimension)
        rows, now = [], time.time_ns()
        for i, entry in enumerate(checked):
            thumbnail = entry["thumbnail"]
            if thumbnail is not None and len(thumbnail) > MAX_THUMBNAIL_BYTES:
                raise GalleryError(f"entries[{i}].thumbnail", f"{len(thumbnail)} bytes; the "
                                   f"Milvus gallery keeps at most {MAX_THUMBNAIL_BYTES}.")
            rows.append({"id": entry["id"], "embedding": entry["embedding"].tolist(),
                         **self.columns.row(entry), "added": now + i})
        with self._lock:
            if rows:
                self.client.upsert(self.collection, rows)
                self._level = "Session"
            if meta:
                self._set_meta(meta)
        return len(rows)

    @_milvus_call
    def remove(self, ids):
        """Removes the entries with these ids; returns how many existed."""
        check_ids(ids)
        if not ids:
            return 0
        with self._lock:
            existing = [row["id"] for row in self._by_key(self.collection, "id", list(set(ids)),
                                                          ["id"])]
            if existing:
                self.client.delete(self.collection, filter=in_expression("id", existing))
                self._level = "Strong"
        return len(existing)

    @_milvus_call
    def import_progress(self):
        value = self._meta("import")
        return None if value is None else json.loads(value)

    # ---------------------------------------------------------------- reads

    @_milvus_call
    def count(self):
        return int(self.client.query(self.collection, filter="", output_fields=["count(*)"],
                                     **self._read())[0]["count(*)"])

    @_milvus_call
    def search(self, queries, k=10, exclude_camera=None, time_range=None, report=False):
        """Top-k entries per query among those passing the filters, nearest first (the filters
        go to Milvus as an expression; a query an approximate index left short is searched
        exactly when few entries pass, else flagged incomplete)."""
        queries = unit_rows(np.atleast_2d(np.asarray(queries, np.float32)))
        if queries.shape[1] != self.dimension:
            raise GalleryError("queries", f"width {queries.shape[1]}, gallery {self.dimension}.")
        expression = self.columns.filter(exclude_camera, no_filter(time_range))
        hits = self.client.search(
            self.collection, data=queries.tolist(), limit=k, filter=expression,
            output_fields=list(self.columns.scalars), search_params=self.search_params, **self._read())
        results = [[self._entry({"id": hit["id"], **hit["entity"]}, 1.0 - hit["distance"])
                    for hit in matches] for matches in hits]
        incomplete = [False] * len(results)
        short = [q for q, matches in enumerate(results) if len(matches) < k]
        if short:
            passing = int(self.client.query(self.collection, filter=expression,
                                            output_fields=["count(*)"], **self._read())[0]["count(*)"])
            if passing <= EXACT_FILTER_LIMIT:
                for q, matches in zip(short, self._exact(queries[short], k, expression)):
                    results[q] = matches
            else:
                for q in short:
                    incomplete[q] = len(results[q]) < min(k, passing)
        return (results, incomplete) if report else results

    def _exact(self, queries, k, expression):
        """Exact top-k among the (few) entries passing `expression`."""
        rows = self.client.query(self.collection, filter=expression, limit=EXACT_FILTER_LIMIT,
                                 output_fields=["id", "embedding", *self.columns.scalars],
                                 **self._read())  # one call: an iterator took 600 ms a query
        if not rows:
            return [[] for _ in queries]
        similarity = queries @ np.asarray([row["embedding"] for row in rows], np.float32).T
        order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
        return [[self._entry(rows[i], 1.0 - similarity[q, i]) for i in order[q]]
                for q in range(len(queries))]

    @_milvus_call
    def get(self, entry_id):
        found = self._by_key(self.collection, "id", [entry_id], ["id", "embedding", *self.columns.scalars])
        if not found:
            return None
        return {**self._entry(found[0]), "embedding": np.asarray(found[0]["embedding"], np.float32)}

    @_milvus_call
    def thumbnail(self, entry_id):
        found = self._by_key(self.collection, "id", [entry_id], ["thumbnail"])
        if not found or not found[0].get("thumbnail"):
            return None
        return base64.b64decode(found[0]["thumbnail"])

    def _scan(self, fields, expression="", batch=4096):
        """The `fields` of every entry passing `expression` (a query iterator: what browse,
        stats and the exact fallback read)."""
        iterator = self.client.query_iterator(self.collection, batch_size=batch,
                                              filter=expression, output_fields=fields, **self._read())
        try:
            while True:
                rows = iterator.next()
                if not rows:
                    return
                yield from rows
        finally:
            iterator.close()

    @_milvus_call
    def browse(self, offset=0, limit=50):
        """A page of entries, newest first. It reads every id and time added (Milvus has no
        ordered scan): fine for the page's use up to a few hundred thousand entries."""
        order = sorted(((row["added"], row["id"]) for row in self._scan(["id", "added"])),
                       reverse=True)
        chosen = [entry_id for _, entry_id in order[offset:offset + limit]]
        found = {row["id"]: row for row in self._by_key(self.collection, "id", chosen,
                                                        ["id", *self.columns.scalars])}
        return [self._entry(found[i]) for i in chosen if i in found], len(order)

    @_milvus_call
    def stats(self):
        """Size, entries per camera, time span, thumbnails, index; reads every entry's scalars
        (as `browse`)."""
        cameras, thumbnails, first, last, size = {}, 0, None, None, 0
        for row in self._scan([*self.columns.fields_of("camera_id", "timestamp"),
                               "has_thumbnail"]):
            size += 1
            camera = self.columns.value(row, "camera_id")
            cameras[camera] = cameras.get(camera, 0) + 1
            thumbnails += bool(row["has_thumbnail"])
            t = self.columns.value(row, "timestamp")
            if t is not None:
                first, last = (t, t) if first is None else (min(first, t), max(last, t))
        return {"size": size, "dimension": self.dimension,
                "cameras": [{"camera_id": c, "entries": n} for c, n in
                            sorted(cameras.items(), key=lambda item: (item[0] is not None,
                                                                      item[0] or 0))],
                "time_span": None if first is None else [first, last],
                "thumbnails": thumbnails,
                "index": {"spec": self.index_spec, "kind": f"Milvus ({self.uri})",
                          "entries": size, "trained_on": size, "stale": False,
                          "changes_not_persisted": 0}}

    def close(self):
        self.client.close()
        if self.local:  # Milvus Lite's embedded server holds the file's lock until released
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.uri)

    def _entry(self, row, distance=None):
        entry = {"id": row.get("id"),
                 **{name: self.columns.value(row, name) for name in self.columns.OPTIONAL}}
        entry["thumbnail"] = bool(row.get("has_thumbnail"))
        if distance is not None:
            entry["distance"] = float(distance)
        return entry
