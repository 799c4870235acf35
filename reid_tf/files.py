"""Writing files so that a failure never leaves half of one: atomic writes, and the check that a
path can be created before any work starts."""

import os
import shutil
import tempfile


def write_atomically(path, text):
    """Writes `text` to `path` through a temporary file and a rename: never half a file."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, path)


def save_npz_atomically(path, arrays, compressed=False):
    """Writes `arrays` as an .npz at `path` through a temporary file in the same folder, renamed
    when complete (never half a file, never an orphan temporary file), with the mode the umask
    gives any file the user creates (not tempfile's 0600)."""
    import numpy as np

    save = np.savez_compressed if compressed else np.savez
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(os.path.abspath(path)),
                                     suffix=".npz.tmp", delete=False) as file:
        try:
            save(file, **arrays)
            file.close()
            os.chmod(file.name, umask_mode())
            os.replace(file.name, path)
        except BaseException:
            os.unlink(file.name)
            raise


def umask_mode(mode=0o666):
    """`mode` as the process's umask leaves it: what `open()` would have created (a
    `tempfile` file is always 0600, whatever the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def check_can_create(path, flag):
    """Refuses, with one line naming `flag`, a path under which nothing can be created: the
    nearest existing folder above it must be a folder and take a real write (permission bits do
    not stop root; a read-only file system does)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag}={path}: {existing} is a file, not a folder.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(f"{flag}={path}: {existing} is not writable "
                         f"({error.strerror or error}).") from None


def check_free_space(path, needed_bytes, flag):
    """Refuses, with one line naming `flag`, a path whose file system has less than
    `needed_bytes` free (an estimate of what the work will write)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise ValueError(f"{flag}={path}: {free / 2**20:.1f} MiB free on its disk, about "
                         f"{needed_bytes / 2**20:.1f} MiB needed.")
