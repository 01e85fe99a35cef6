"""difflab's version, in a module of its own: the modules that record it import this rather than the package, whose
__init__ offers the API and so sits above them."""

__version__ = "0.1.0"
