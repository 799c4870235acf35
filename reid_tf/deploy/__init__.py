"""Stage 4, deploy: the export (SavedModel, TF Serving layout), runtimes that turn images into
embeddings, the HTTP server (serving/) and the live gallery (gallery/)."""
