"""Stage 5, training: the options (config), the optimizer (optim), the step (step), the loop and
its hooks (loop, hooks), distribution (distribute) and the run folder (workdir).

Training sits above evaluation and deployment: its hooks evaluate and export."""
