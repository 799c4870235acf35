"""The live gallery: SQLite (WAL) source of truth and a derived faiss index (store), and how
reid-serve opens and seeds it (seed)."""
