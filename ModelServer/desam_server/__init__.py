"""DeSAM inference service and command-line tools for SlicerDeSAM."""

__version__ = "0.1.0"
