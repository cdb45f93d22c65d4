"""cgflow: active learning of coarse-grained free-energy surfaces with conditional normalizing flows."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cgflow")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
