"""difflab: a Hydra-composed experiment runner for diffusion models.

From Python: `difflab.load(path).sample(16)`, `difflab.export(ckpt, out)`, `difflab.run([...overrides])` (difflab.api).
"""

from difflab.version import __version__

API = ("Pipeline", "Run", "Samples", "export", "load", "run")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    """The API on first use: it imports torch, Hydra and the runner, which `import difflab` (and every command-line
    start, which imports the package first) should not pay for."""
    if name in API:
        from difflab import api

        return getattr(api, name)
    raise AttributeError(f"module 'difflab' has no attribute {name!r}")
