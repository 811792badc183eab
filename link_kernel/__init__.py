"""Link (hybrid): a Jupyter kernel that runs each cell locally or on a remote host."""

__version__ = "0.1.0"
