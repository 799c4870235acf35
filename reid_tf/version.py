"""What code this is: the package version and, for a git checkout, its commit.

Every results.json (and every export's model card) records `code()`, so a table can check that
its runs share one commit.
"""

import os
import subprocess

from reid_tf import __version__

SOURCE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Records, not code: what a queue writes into its own pinned clone as it runs (the search's
# export, each finished run's JSON). Changing them does not change what a run computes.
RECORDS = ("experiments/search", "experiments/results")


def commit(source_dir=SOURCE_DIR):
    """The 40-hex commit of the git checkout holding reid_tf, with `+dirty` when tracked files
    other than the `RECORDS` differ from it; None when reid_tf is not in a git checkout (an
    installed wheel) or git is missing."""
    def git(*args):
        return subprocess.run(["git", "-C", source_dir, *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()

    try:
        if not os.path.exists(os.path.join(source_dir, ".git")):
            return None
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                    *(f":(exclude){path}" for path in RECORDS))
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def code():
    """`{"version": ..., "commit": ...}` of the running reid_tf."""
    return {"version": __version__, "commit": commit()}
