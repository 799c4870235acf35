"""The console scripts: thin absl mains that parse flags, build a config and call the library
(reid-train, reid-eval, reid-export, reid-extract, reid-serve, reid-demo)."""
