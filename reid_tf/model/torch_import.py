"""Reads PyTorch checkpoints (state dicts) into NumPy arrays, with no PyTorch and no code execution.

A `.pth` file is a pickle, and unpickling runs whatever the file names. `load_state_dict` uses a
restricted unpickler that rebuilds only tensors, their storages and plain containers; any other
global the file refers to is refused with `UnsafeCheckpointError` before it is imported.

Both formats torch has written are read:
- legacy (before torch 1.6): magic number, protocol, sys info and the object pickle, then the list
  of storage keys and each storage's raw bytes (an int64 element count, then the elements);
- zip (torch >= 1.6): `<archive>/data.pkl` and one raw file per storage under `<archive>/data/`.

    >>> state = load_state_dict("mobilenet_v2-b0353104.pth")  # doctest: +SKIP
    >>> state["features.0.0.weight"].shape                     # doctest: +SKIP
    (32, 3, 3, 3)
"""

import collections
import io
import pickle
import struct
import sys
import zipfile

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# torch storage class name -> numpy dtype (little-endian, as torch writes them).
_STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "LongStorage": "<i8",
    "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
    "BoolStorage": "?",
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint refers to something other than tensors and containers."""


class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A storage whose bytes may arrive after the pickle that refers to it (legacy format)."""

    def __init__(self, dtype, numel):
        self.dtype = dtype
        self.numel = numel
        self.array = None


class _Tensor:
    """A strided view of a storage, made into an array once every storage is read."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def to_numpy(self):
        base = self.storage.array
        if base is None:
            raise pickle.UnpicklingError("checkpoint: a tensor refers to a storage with no data.")
        if not self.size:
            return base[self.offset].copy()
        itemsize = base.dtype.itemsize
        needed = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
        if min(self.size) > 0 and needed > base.size:
            raise pickle.UnpicklingError("checkpoint: a tensor reaches past the end of its storage.")
        view = np.lib.stride_tricks.as_strided(
            base[self.offset:], shape=self.size, strides=[s * itemsize for s in self.stride]
        )
        return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
    return data


# The only globals a state dict needs. Everything else is refused.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path, persistent_load):
        super().__init__(file)
        self._path = path
        self._persistent_load = persistent_load

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._path}: refers to {module}.{name}, which is not a tensor, storage or "
                f"container; refusing to load it (a checkpoint must never run code)."
            ) from None

    def persistent_load(self, pid):
        return self._persistent_load(pid)


def _storage_type(value, path):
    if not isinstance(value, _StorageType):
        raise UnsafeCheckpointError(f"{path}: a storage of unexpected type {value!r}.")
    return value


def _load_legacy(file, path):
    def no_persistent(pid):
        raise UnsafeCheckpointError(f"{path}: unexpected persistent id in the header.")

    def load(persistent_load=no_persistent):
        return _RestrictedUnpickler(file, path, persistent_load).load()

    if load() != _LEGACY_MAGIC:
        raise pickle.UnpicklingError(f"{path}: not a PyTorch checkpoint (bad magic number).")
    load()  # protocol version
    sys_info = load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise pickle.UnpicklingError(f"{path}: big-endian checkpoints are not supported.")

    storages = {}

    def persistent_load(pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise UnsafeCheckpointError(f"{path}: unexpected persistent id {pid!r}.")
        storage_type, key, _location, numel, view_metadata = pid[1:6]
        if key not in storages:
            storages[key] = _Storage(_storage_type(storage_type, path).dtype, numel)
        if view_metadata is not None:
            raise pickle.UnpicklingError(f"{path}: storage views are not supported.")
        return storages[key]

    result = load(persistent_load)
    for key in load():
        storage = storages[key]
        (numel,) = struct.unpack("<q", file.read(8))
        data = file.read(numel * storage.dtype.itemsize)
        if len(data) != numel * storage.dtype.itemsize:
            raise pickle.UnpicklingError(f"{path}: truncated (storage {key} is incomplete).")
        storage.array = np.frombuffer(data, storage.dtype)
    return result


def _load_zip(archive, path):
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pickles:
        raise pickle.UnpicklingError(f"{path}: a zip file with no data.pkl; not a PyTorch checkpoint.")
    prefix = pickles[0][: -len("data.pkl")]
    if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder") != b"little":
        raise pickle.UnpicklingError(f"{path}: big-endian checkpoints are not supported.")
    storages = {}

    def persistent_load(pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise UnsafeCheckpointError(f"{path}: unexpected persistent id {pid!r}.")
        storage_type, key, _location, numel = pid[1:5]
        if key not in storages:
            dtype = _storage_type(storage_type, path).dtype
            storage = _Storage(dtype, numel)
            storage.array = np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype)
            storages[key] = storage
        return storages[key]

    with archive.open(pickles[0]) as data:
        return _RestrictedUnpickler(io.BytesIO(data.read()), path, persistent_load).load()


def _to_numpy(value):
    if isinstance(value, _Tensor):
        return value.to_numpy()
    if isinstance(value, dict):
        return collections.OrderedDict((k, _to_numpy(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_to_numpy(v) for v in value)
    return value


def load_state_dict(path):
    """Reads a PyTorch checkpoint as an ordered `{name: np.ndarray}`.

    Args:
        path: a `.pth`/`.pt` file written by `torch.save` (legacy or zip format). A checkpoint that
            wraps its state dict (`{"state_dict": ...}` or `{"model": ...}`) is unwrapped.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file refers to anything but tensors and containers.
        pickle.UnpicklingError: not a PyTorch checkpoint, or a damaged one.
    """
    path = str(path)
    with open(path, "rb") as file:
        if zipfile.is_zipfile(file):
            file.seek(0)
            with zipfile.ZipFile(file) as archive:
                result = _load_zip(archive, path)
        else:
            file.seek(0)
            try:
                result = _load_legacy(file, path)
            except (EOFError, struct.error) as error:
                raise pickle.UnpicklingError(f"{path}: truncated or not a PyTorch checkpoint "
                                             f"({error}).") from None
    for key in ("state_dict", "model"):
        if isinstance(result, dict) and isinstance(result.get(key), dict):
            result = result[key]
    if not isinstance(result, dict):
        raise pickle.UnpicklingError(f"{path}: holds a {type(result).__name__}, not a state dict.")
    return _to_numpy(result)


if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("reid_tf.torch_checkpoint reads little-endian data on little-endian hosts.")
