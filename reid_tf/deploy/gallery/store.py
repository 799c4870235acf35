"""A live gallery: SQLite (WAL) is the source of truth, a faiss index is derived from it.

    store = GalleryStore("gallery.sqlite", index="Flat")       # or "IVF1024,SQ8", "HNSW32"
    store.add([{"id": "cam3/000123", "embedding": vector, "camera_id": 3, "timestamp": t}])
    store.search(queries, k=10, exclude_camera=3, time_range=(t0, t1))
    store.remove(["cam3/000123"])

Every change is one SQLite transaction that writes the entries and a row of the `changes` log;
`add`/`remove` return only after it has committed (that is the acknowledgement), then apply it
to the in-memory index under a lock, so a search sees a change entirely or not at all, and only
committed entries. The index is written (`faiss.write_index`) as `<db>.index-<seq>.faiss`, `seq`
being the last change it holds, on `persist()` (every `persist_every` changes and at close); on
open the newest such file is loaded and the changes after its `seq` are replayed, so a restart
after a crash loses nothing that was acknowledged and rebuilds only what the file lacks. A
persisted index makes the change-log rows it holds redundant: they are trimmed.

The index only claims what it holds: an update of the index that fails after the commit (the
change is durable: the caller is told so) marks it stale, and it is rebuilt from the database
before the next search, never written to a file; on open, an index file beyond the database's
last change (a restored backup) is ignored, and one that holds other entries, or another kind
of index than the spec, is rebuilt. HNSW and refined indexes cannot remove: a removed row is
marked deleted, filtered out at search, and the index rebuilt once they pass a tenth of it.
The SQLite side is `tables`, the faiss side `faiss_index`; this class holds the connection, the
lock and the index, and decides when each is used.
"""

import json
import os
import sqlite3
import threading
import time

import numpy as np

from reid_tf.deploy.gallery import faiss_index
from reid_tf.deploy.gallery import tables
from reid_tf.deploy.gallery.contract import Gallery
from reid_tf.deploy.gallery.contract import GalleryError  # noqa: F401 - the store's errors
from reid_tf.deploy.gallery.contract import GalleryFull
from reid_tf.deploy.gallery.contract import GalleryUnavailable
from reid_tf.deploy.gallery.contract import check_entries
from reid_tf.deploy.gallery.contract import check_ids
from reid_tf.model.descriptors import unit_rows

EXACT_FILTER_LIMIT = 50_000  # a filter passing at most this many entries is searched exactly


class GalleryStore(Gallery):
    """Entries (id, embedding, optional person id, camera, timestamp, JSON metadata) in SQLite,
    searched through a derived faiss index (inner product of L2-normalised embeddings).

    Args:
        path: the SQLite file (":memory:" for a gallery that lives only in this process).
        dimension: embedding width; taken from the database when it already holds one.
        index: a faiss `index_factory` string ("Flat", "IVF4096,SQ8", "HNSW32",
            "IVF1024,PQ320x4fs,Refine(SQ8)", ...).
        nprobe / ef_search: search parameters of IVF / HNSW indexes.
        persist_every: write the index file after this many changes (0: only at close).
        log: where the retraining and recovery lines go.
        model: the identity of the model whose embeddings the gallery holds (an export's
            `model_id`); recorded on first use, and a different one is refused: embeddings of
            two models are not comparable, even at the same width.
    """

    def __init__(self, path, dimension=None, index="Flat", nprobe=16, ef_search=64,
                 persist_every=1000, log=print, training_sample=200_000, model=None):
        self.path = path
        self.index_spec = index
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.persist_every = persist_every
        self.training_sample = training_sample  # most entries an index is trained on
        self.log = log
        self._lock = threading.Lock()  # the index and the connection
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        if path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged add survives power loss
        self._db.executescript(tables.SCHEMA)
        stored = self._meta("dimension")
        if stored is not None and dimension is not None and int(stored) != dimension:
            raise ValueError(f"{path}: holds embeddings of {stored}, not {dimension}.")
        self.dimension = int(stored) if stored is not None else dimension
        if self.dimension is None:
            raise ValueError(f"{path}: an empty gallery needs its embedding dimension.")
        if stored is None:
            self._db.execute("INSERT INTO meta VALUES ('dimension', ?)", (str(self.dimension),))
        self._check_model(model)
        # Entries an untrained index_factory spec needs before it can be trained (0: none).
        probe = faiss_index.empty(self.dimension, index)
        self.needed_for_training = 0 if probe.is_trained else faiss_index.training_size(probe)
        self.applied_seq = 0  # the last change in the in-memory index
        self.persisted_seq = 0  # the last change in the newest index file
        self.trained_size = 0  # the gallery's size when the index was trained (0: untrained)
        self.stale = False  # an index update failed and the rebuild is still owed
        self._deleted = set()  # rows removed from the database but still in an HNSW graph
        self.size = self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        self._open_index()

    def _check_model(self, model):
        if model is None:
            return
        stored = self._meta("model")
        if stored is not None and stored != model:
            raise ValueError(
                f"{self.path}: holds embeddings of model {stored}, not of this export's {model}:"
                " serve it with the export that built it, or seed a new database from this "
                "model (--gallery or --gallery_images with another --gallery_db).")
        if stored is None:
            if self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]:
                self.log(f"gallery: {self.path} records no model (built before models were "
                         f"recorded); recording {model}")
            self._db.execute("INSERT INTO meta VALUES ('model', ?)", (model,))

    # ------------------------------------------------------------------ index upkeep

    def _meta(self, key):
        return tables.meta(self._db, key)

    def _new_index(self):
        """An empty index of `index_spec`, trained on a sample of the gallery if it needs
        training (a Flat index while the gallery is too small to train it)."""
        inner = faiss_index.empty(self.dimension, self.index_spec)
        if not inner.is_trained:
            needed = self.needed_for_training
            size = self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
            if size < needed:
                self.log(f"gallery: {size} entries, fewer than the {needed} that "
                         f"{self.index_spec} needs to train; exact search until then")
                inner = faiss_index.empty(self.dimension, "Flat")
                self.trained_size = 0
            else:
                start = time.perf_counter()
                sample = tables.sample(self._db, self.training_sample, self.dimension)
                inner.train(sample)
                self.trained_size = size
                self.log(f"gallery: trained {self.index_spec} on {len(sample)} of {size} "
                         f"entries in {time.perf_counter() - start:.1f} s")
        faiss_index.set_search_parameters(inner, self.nprobe, self.ef_search)
        return faiss_index.with_ids(inner)

    def _index_add(self, embeddings, rows):
        self.index.add_with_ids(embeddings, rows)

    def _index_remove(self, rows):
        self.index.remove_ids(rows)

    def _open_index(self):
        last_seq = tables.last_seq(self._db)
        files = faiss_index.files(self.path)
        for seq, path in [f for f in files if f[0] > last_seq]:
            self.log(f"gallery: {path} is newer than {self.path} (its last change is {last_seq}:"
                     f" a restored backup?); ignored, the index is rebuilt from the database")
            os.remove(path)
        files = [f for f in files if f[0] <= last_seq]
        spec = self._meta("index")
        if files and spec == self.index_spec:
            seq, path = files[-1]
            try:
                self.index = faiss_index.load(path, self.dimension, self.index_spec,
                                              self.nprobe, self.ef_search)
                self.applied_seq = self.persisted_seq = seq
                self.trained_size = int(self._meta("trained_size") or 0)
                self._deleted = self._stale_rows()
                replayed = self._replay(seq)
                held = int(self.index.ntotal) - len(self._deleted)
                if held == self.size:
                    self.log(f"gallery: loaded {path} ({held} entries)"
                             + (f", replayed {replayed} later change(s)" if replayed else ""))
                    return
                self.log(f"gallery: {path} holds {held} entries after replaying, the database "
                         f"{self.size}; rebuilding from {self.path}")
            except RuntimeError as error:  # an unreadable file: rebuild from the database
                self.log(f"gallery: {path} unreadable ({error}); rebuilding from {self.path}")
        self._rebuild(last_seq)

    def _stale_rows(self):
        """Rows an HNSW index file holds that the database no longer does (removed after it
        was marked deleted, then persisted)."""
        if faiss_index.can_remove(self.index):
            return set()
        live = {row for (row,) in self._db.execute("SELECT row FROM entries")}
        return faiss_index.ids(self.index) - live

    def _rebuild(self, last_seq=None):
        """The index from every entry of the database (under the lock or at open)."""
        last_seq = tables.last_seq(self._db) if last_seq is None else last_seq
        start = time.perf_counter()
        self.stale = True  # until the new index holds every entry
        self.index = self._new_index()
        self._deleted = set()
        for embeddings, rows in tables.all_embeddings(self._db):
            self.index.add_with_ids(embeddings, rows)
        self.applied_seq = last_seq
        self.stale = False
        if self._meta("index") != self.index_spec:  # the files hold another spec's index
            faiss_index.remove_files(self.path)
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('index', ?)", (self.index_spec,))
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('trained_size', ?)",
                         (str(self.trained_size),))
        if self.index.ntotal:
            self.log(f"gallery: built {self.index_spec} over {self.index.ntotal} entries in "
                     f"{time.perf_counter() - start:.1f} s")

    def _replay(self, after_seq):
        """Applies the logged changes after `after_seq` to the index; returns how many."""
        changes = self._db.execute("SELECT seq, op, row FROM changes WHERE seq > ? ORDER BY seq",
                                   (after_seq,)).fetchall()
        self._apply(changes)
        return len(changes)

    def _apply(self, changes):
        """Changes `[(seq, op, row)]`, in order, to the in-memory index."""
        if not changes:
            return
        removed = [row for _, op, row in changes if op == "remove"]
        if removed and faiss_index.can_remove(self.index):
            self._index_remove(np.array(removed, np.int64))
        elif removed:  # HNSW, refined: marked deleted, filtered at search
            self._deleted.update(removed)
        added = [row for _, op, row in changes if op == "add"]
        found = tables.embeddings(self._db, added) if added else None
        if found is not None:
            self._index_add(*found)
        self.applied_seq = changes[-1][0]
        if self._deleted and len(self._deleted) > max(64, self.index.ntotal // 10):
            self._rebuild()
        elif self.trained_size and self.index.ntotal > 2 * self.trained_size:
            self.log(f"gallery: {self.index.ntotal} entries, over twice the {self.trained_size} "
                     f"there were when {self.index_spec} was trained; retraining")
            self._rebuild()
        elif (not self.trained_size and self.needed_for_training
              and self.index.ntotal >= self.needed_for_training):
            self._rebuild()
        if self.persist_every and self.applied_seq - self.persisted_seq >= self.persist_every:
            self._persist_or_log()

    def _persist(self):
        if self.path == ":memory:" or self.applied_seq == self.persisted_seq or self.stale:
            return None
        final = faiss_index.write(self.index, self.path, self.applied_seq)
        self.persisted_seq = self.applied_seq
        # The file holds every change up to its seq: their log rows are not needed to restart.
        self._db.execute("DELETE FROM changes WHERE seq <= ?", (self.persisted_seq,))
        return final

    def persist(self):
        """Writes the index file now (also done every `persist_every` changes and at close)."""
        with self._lock:
            return self._persist()

    def _persist_or_log(self):
        """`_persist`; a failure (a full disk) costs the file only: the log is replayed at start."""
        try:
            return self._persist()
        except (OSError, RuntimeError, sqlite3.Error) as error:
            reason = (str(error).strip().splitlines() or [""])[0]
            self.log(f"gallery: the index file was not written ({type(error).__name__}: {reason});"
                     " the next start rebuilds it from the change log")

    def close(self):
        with self._lock:
            self._persist_or_log()
            self._db.close()

    # ------------------------------------------------------------------ changes

    def _check_entries(self, entries):
        """Checked entries (`contract.check_entries`) as table rows and thumbnails."""
        return [tables.as_row(e) for e in check_entries(entries, self.dimension)]

    def _commit(self, write):
        """Runs `write(db) -> [(op, row)]` in one transaction with its change-log rows; after
        the commit (the acknowledgement) applies the changes to the index. Returns them."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                logged = []
                for op, row in write(db):
                    cursor = db.execute("INSERT INTO changes (op, row) VALUES (?, ?)", (op, row))
                    logged.append((cursor.lastrowid, op, row))
                db.execute("COMMIT")
            except BaseException as error:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if isinstance(error, sqlite3.OperationalError) and "full" in str(error):
                    raise GalleryFull(f"the gallery's disk is full ({error}): nothing was "
                                      "written; free some space and retry") from None
                raise
            self.size += sum(1 if op == "add" else -1 for _, op, _ in logged)
            try:
                self._apply(logged)
            except Exception as error:  # committed all the same: the index is rebuilt
                self.stale = True
                self.log(f"gallery: updating the index after change {logged[-1][0]} failed "
                         f"({type(error).__name__}: {error}); the change is committed; "
                         f"rebuilding the index from {self.path}")
                self._recover()
        return logged

    def _recover(self):
        """Rebuilds a stale index (under the lock); False when that fails too (the next search
        tries again)."""
        try:
            self._rebuild()
            return True
        except Exception as error:
            self.log(f"gallery: rebuilding the index failed ({type(error).__name__}: {error}); "
                     "searches are refused until it succeeds")
            return False

    @staticmethod
    def _delete(db, entry_id):
        """Deletes the entry with this id; its change, or nothing if there was none."""
        found = db.execute("SELECT row FROM entries WHERE id = ?", (entry_id,)).fetchone()
        if not found:
            return []
        db.execute("DELETE FROM entries WHERE row = ?", found)
        db.execute("DELETE FROM thumbnails WHERE row = ?", found)
        return [("remove", found[0])]

    def add(self, entries, meta=None):
        """Adds (or replaces, by id) `entries` in one transaction; returns once committed and
        applied. GalleryError names a bad entry; nothing is written then. An entry's
        `thumbnail` (JPEG bytes) is written in the same transaction: no entry is ever found
        without the thumbnail it was added with. `meta`: `{key: value}` written to the meta
        table in the same transaction."""
        rows = self._check_entries(entries)

        def write(db):
            for key, value in (meta or {}).items():
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
            changes = []
            for values, thumbnail in rows:
                changes += self._delete(db, values[0])
                cursor = db.execute(
                    "INSERT INTO entries (id, person_id, camera_id, timestamp, metadata, "
                    "embedding) VALUES (?, ?, ?, ?, ?, ?)", values)
                if thumbnail is not None:
                    db.execute("INSERT INTO thumbnails VALUES (?, ?)",
                               (cursor.lastrowid, thumbnail))
                changes.append(("add", cursor.lastrowid))
            return changes

        self._commit(write)
        return len(rows)

    def remove(self, ids):
        """Removes the entries with these ids in one transaction; returns how many existed."""
        check_ids(ids)
        return len(self._commit(lambda db: [c for i in ids for c in self._delete(db, i)]))

    def import_progress(self):
        """`{"source", "total", "done"}` of the last seed import, or None."""
        with self._lock:
            value = self._meta("import")
        return None if value is None else json.loads(value)

    # ------------------------------------------------------------------ reads

    def __len__(self):
        """Entries searchable (the committed entries, read without the lock: `size`)."""
        return self.size

    def count(self):
        """Entries in the database (the source of truth; `size` is its running count, read
        without waiting for the lock)."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def staleness(self):
        """Changes applied in memory but not yet in the index file."""
        return self.applied_seq - self.persisted_seq

    def search(self, queries, k=10, exclude_camera=None, time_range=None, report=False):
        """Top-k entries for each query, nearest first, among committed entries passing the
        filters (`exclude_camera`: leave that camera out; `time_range`: (start, end) seconds,
        either None). Each match: id, person_id, camera_id, timestamp, metadata, distance
        (1 - cosine similarity).

        A filter's work is bounded whatever it matches. The entries passing it are counted in
        SQLite (indexed on camera and timestamp): up to `EXACT_FILTER_LIMIT` of them are
        searched exactly, streamed from the database in chunks; a filter passing more is
        applied to the index's nearest candidates, fetching at most 16x the expected need
        (at least 1,024). Only then can a query end with fewer than k matches although more
        entries pass: with `report=True` the call returns `(results, incomplete)`, one flag per
        query saying so.
        """
        queries = unit_rows(np.atleast_2d(queries))
        if queries.shape[1] != self.dimension:
            raise GalleryError("queries", f"width {queries.shape[1]}, gallery {self.dimension}.")
        if time_range is not None and tuple(time_range) == (None, None):
            time_range = None  # bounds nothing
        filtered = exclude_camera is not None or time_range is not None
        with self._lock:
            if self.stale and not self._recover():
                raise GalleryUnavailable("the gallery index is being rebuilt after a failure; "
                                         "retry shortly (nothing committed was lost)")
            total = int(self.index.ntotal)
            results = [[] for _ in queries]
            incomplete = [False] * len(queries)
            if total:
                if not filtered:
                    self._nearest(queries, k, min(total, k + len(self._deleted)), results,
                                  incomplete, None, None)
                else:
                    where, values = tables.filter_sql(exclude_camera, time_range)
                    passing = self._db.execute(
                        f"SELECT COUNT(*) FROM entries WHERE {where}", values).fetchone()[0]
                    if passing <= EXACT_FILTER_LIMIT:
                        similarities, rows = tables.exact_top_k(self._db, queries, k, where,
                                                                values)
                        entries = tables.entries(self._db, set(rows.ravel().tolist()))
                        for query, (near, found) in enumerate(zip(similarities, rows)):
                            results[query] = [{**entries[int(row)], "distance": float(1 - s)}
                                              for s, row in zip(near, found)]
                    else:
                        limit = min(total, max(1024, -(-16 * k * total // passing))
                                    + len(self._deleted))
                        self._nearest(queries, k, limit, results, incomplete, exclude_camera,
                                      time_range)
        return (results, incomplete) if report else results

    def _nearest(self, queries, k, limit, results, incomplete, exclude_camera, time_range):
        """Fills `results` from the index: k candidates (4k with a filter), x4 while a query
        lacks matches, up to `limit`."""
        total = int(self.index.ntotal)
        filtered = exclude_camera is not None or time_range is not None
        fetch = min(limit, k * 4 if filtered else k + len(self._deleted))
        pending = list(range(len(queries)))
        while pending:
            similarities, rows = self._index_search(queries[pending], fetch)
            entries = tables.entries(self._db, {int(r) for r in rows.ravel() if r >= 0})
            retry = []
            for position, query in enumerate(pending):
                matches = []
                for similarity, row in zip(similarities[position], rows[position]):
                    entry = entries.get(int(row))  # None: removed (HNSW) or no row
                    if entry is None or not tables.passes(entry, exclude_camera, time_range):
                        continue
                    matches.append({**entry, "distance": float(1.0 - similarity)})
                    if len(matches) == k:
                        break
                results[query] = matches
                if len(matches) < k and fetch < min(limit, total):
                    retry.append(query)
                elif len(matches) < k and fetch < total:
                    incomplete[query] = True  # the bound stopped it, not the gallery
            pending, fetch = retry, min(limit, fetch * 4)

    def _index_search(self, queries, k):
        return faiss_index.search(self.index, queries, k)

    def get(self, entry_id):
        """The entry with this id (with its embedding), or None."""
        with self._lock:
            row = self._db.execute(f"SELECT {tables.ENTRY_COLUMNS}, e.embedding "
                                   f"FROM {tables.ENTRIES} "
                                   "WHERE e.id = ?",
                                   (entry_id,)).fetchone()
        if row is None:
            return None
        return {**tables.as_entry(row[1:7]), "embedding": np.frombuffer(row[7], np.float32)}

    def thumbnail(self, entry_id):
        """The JPEG thumbnail stored with this entry, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT t.jpeg FROM entries e JOIN thumbnails t ON t.row = e.row WHERE e.id = ?",
                (entry_id,)).fetchone()
        return row[0] if row else None

    def browse(self, offset=0, limit=50):
        """`(entries, total)`: a page of entries, newest first (without embeddings)."""
        with self._lock:
            rows = self._db.execute(f"SELECT {tables.ENTRY_COLUMNS} FROM {tables.ENTRIES} "
                                    "ORDER BY e.row "
                                    "DESC LIMIT ? OFFSET ?", (limit, offset)).fetchall()
        return [tables.as_entry(values) for _, *values in rows], self.size

    def stats(self):
        """What an operator sees of the gallery: size, entries per camera, time span,
        thumbnails, and the index's state."""
        with self._lock:
            cameras = self._db.execute("SELECT camera_id, COUNT(*) FROM entries GROUP BY "
                                       "camera_id ORDER BY camera_id").fetchall()
            first, last = self._db.execute(
                "SELECT MIN(timestamp), MAX(timestamp) FROM entries").fetchone()
            thumbnails = self._db.execute("SELECT COUNT(*) FROM thumbnails").fetchone()[0]
            kind = type(faiss_index.inner_of(self.index)).__name__
            index = {"spec": self.index_spec, "kind": kind,
                     "entries": int(self.index.ntotal) - len(self._deleted),
                     "trained_on": self.trained_size, "stale": self.stale,
                     "changes_not_persisted": self.staleness()}
        return {"size": self.size, "dimension": self.dimension,
                "cameras": [{"camera_id": c, "entries": n} for c, n in cameras],
                "time_span": None if first is None else [first, last],
                "thumbnails": thumbnails, "index": index}

