"""The gallery's SQLite side: its tables, an entry as a table row, the search filters in SQL,
and the reads the store makes of embeddings (a training sample, rows by id, an exact top-k
streamed in chunks). Plain functions over a `sqlite3` connection; `store.GalleryStore` holds
the connection, its lock and the transactions."""

import json

import numpy as np

from reid_tf.deploy.gallery.contract import FIELDS

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    person_id INTEGER,
    camera_id INTEGER,
    timestamp REAL,
    metadata TEXT,
    embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_camera ON entries (camera_id);
CREATE INDEX IF NOT EXISTS entries_timestamp ON entries (timestamp);
CREATE TABLE IF NOT EXISTS thumbnails (row INTEGER PRIMARY KEY, jpeg BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL CHECK (op IN ('add', 'remove')),
    row INTEGER NOT NULL
);
"""
ENTRY_COLUMNS = "e.row, e.id, e.person_id, e.camera_id, e.timestamp, e.metadata, t.row IS NOT NULL"
ENTRIES = "entries e LEFT JOIN thumbnails t ON t.row = e.row"
MAX_PARAMETERS = 900  # rows per `IN (...)`: under SQLite's bound-parameter limit


def meta(db, key):
    """The meta table's value of `key`, or None."""
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def last_seq(db):
    """The last change ever logged (the log is trimmed; its AUTOINCREMENT counter is not)."""
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
    return row[0] if row else 0


def as_row(entry):
    """A checked entry (`contract.check_entries`) as `(table values, thumbnail)`."""
    return ((entry["id"], entry["person_id"], entry["camera_id"], entry["timestamp"],
             None if entry["metadata"] is None else json.dumps(entry["metadata"]),
             entry["embedding"].tobytes()), entry["thumbnail"])


def as_entry(values):
    """A table row `(id, person_id, camera_id, timestamp, metadata JSON, has thumbnail)` as a
    dict."""
    entry = dict(zip(FIELDS, values))
    entry["metadata"] = None if entry["metadata"] is None else json.loads(entry["metadata"])
    entry["thumbnail"] = bool(entry["thumbnail"])
    return entry


def entries(db, rows):
    """`{row: entry}` of these rows (those still in the table)."""
    rows = list(rows)
    found = {}
    for start in range(0, len(rows), MAX_PARAMETERS):
        chunk = rows[start:start + MAX_PARAMETERS]
        marks = ",".join("?" * len(chunk))
        for row, *values in db.execute(
                f"SELECT {ENTRY_COLUMNS} FROM {ENTRIES} WHERE e.row IN ({marks})", chunk):
            found[row] = as_entry(values)
    return found


def embeddings(db, rows):
    """`(embeddings, rows)` of these rows that are still in the table (a row removed by a later
    change of the same batch is gone), or None when none is."""
    found = []
    for start in range(0, len(rows), MAX_PARAMETERS):
        chunk = rows[start:start + MAX_PARAMETERS]
        marks = ",".join("?" * len(chunk))
        found += db.execute(f"SELECT row, embedding FROM entries WHERE row IN ({marks})",
                            chunk).fetchall()
    if not found:
        return None
    return (np.stack([np.frombuffer(blob, np.float32) for _, blob in found]),
            np.array([row for row, _ in found], np.int64))


def all_embeddings(db, chunk=65536):
    """Every entry's `(embeddings, rows)`, in row order, `chunk` at a time."""
    rows, vectors = [], []
    for row, blob in db.execute("SELECT row, embedding FROM entries ORDER BY row"):
        rows.append(row)
        vectors.append(np.frombuffer(blob, np.float32))
        if len(rows) == chunk:
            yield np.stack(vectors), np.array(rows, np.int64)
            rows, vectors = [], []
    if rows:
        yield np.stack(vectors), np.array(rows, np.int64)


def sample(db, limit, dimension):
    """At most `limit` embeddings drawn at random; reads only the rows drawn (a million
    embeddings would not fit in memory as floats next to their index)."""
    rows = np.array([r for (r,) in db.execute("SELECT row FROM entries")], np.int64)
    if len(rows) > limit:
        rows = np.sort(np.random.default_rng(len(rows)).choice(rows, limit, replace=False))
    drawn = np.zeros([len(rows), dimension], np.float32)
    for start in range(0, len(rows), 512):
        chunk = rows[start:start + 512].tolist()
        marks = ",".join("?" * len(chunk))
        found = dict(db.execute(
            f"SELECT row, embedding FROM entries WHERE row IN ({marks})", chunk))
        for i, row in enumerate(chunk):
            drawn[start + i] = np.frombuffer(found[row], np.float32)
    return drawn


def exact_top_k(db, queries, k, where, values, chunk=4096):
    """`(similarities, rows)`, each `[queries, <= k]`, best first: the exact top-k among the
    rows passing `where`, streamed in chunks (memory bounded by the chunk and k, not by how
    many rows pass)."""
    best_similarity = np.full((len(queries), 0), -np.inf, np.float32)
    best_row = np.zeros((len(queries), 0), np.int64)
    cursor = db.execute(f"SELECT row, embedding FROM entries WHERE {where}", values)
    while True:
        fetched = cursor.fetchmany(chunk)
        if not fetched:
            break
        rows = np.array([row for row, _ in fetched], np.int64)
        vectors = np.frombuffer(b"".join(blob for _, blob in fetched),
                                np.float32).reshape(len(fetched), queries.shape[1])
        similarity = np.concatenate([best_similarity, queries @ vectors.T], axis=1)
        candidates = np.concatenate(
            [best_row, np.broadcast_to(rows, (len(queries), len(rows)))], axis=1)
        keep = min(k, similarity.shape[1])
        top = np.argpartition(-similarity, keep - 1, axis=1)[:, :keep]
        best_similarity = np.take_along_axis(similarity, top, axis=1)
        best_row = np.take_along_axis(candidates, top, axis=1)
    order = np.argsort(-best_similarity, axis=1, kind="stable")
    return (np.take_along_axis(best_similarity, order, axis=1),
            np.take_along_axis(best_row, order, axis=1))


def filter_sql(exclude_camera, time_range):
    """The SQL `WHERE` clause and its values of the search filters (the same test as
    `passes`)."""
    clauses, values = [], []
    if exclude_camera is not None:
        clauses.append("(camera_id IS NULL OR camera_id != ?)")
        values.append(exclude_camera)
    if time_range is not None:
        start, end = time_range
        clauses.append("timestamp IS NOT NULL")
        if start is not None:
            clauses.append("timestamp >= ?")
            values.append(start)
        if end is not None:
            clauses.append("timestamp <= ?")
            values.append(end)
    return " AND ".join(clauses) or "1", values


def passes(entry, exclude_camera, time_range):
    """Whether an entry passes the search filters (the same test as `filter_sql`)."""
    if exclude_camera is not None and entry["camera_id"] == exclude_camera:
        return False
    if time_range is not None:
        start, end = time_range
        timestamp = entry["timestamp"]
        if timestamp is None:
            return False
        if (start is not None and timestamp < start) or (end is not None and timestamp > end):
            return False
    return True
