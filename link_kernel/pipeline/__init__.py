"""Pipelines: named cells with parents (DESIGN.md "Pipelines").

One concern per module, as marimo's ``_runtime/dataflow/`` does it:

- :mod:`.component`: one cell as a component (name, parents, code, target), pure;
- :mod:`.graph`: the components together: order, cycles, cache keys, staleness, pure;
- :mod:`.cache`: cached results on disk, an index over the variable sync's blob store;
- :mod:`.runner`: brings a component's ancestors up to date through callables the
  kernel supplies, and knows each component's state;
- :mod:`.cells`: the runner's hashing and restoring through the local kernel's agent;
- :mod:`.notebook`: the components a saved notebook declares (after a restart);
- :mod:`.exchange`: the pipeline as a JSON file (``link-kernel pipeline export|import``);
- :mod:`.archive`: cache entries as a verified ``.tar.gz`` (``link-kernel cache export|import``);
- :mod:`.picture`: ``%link pipeline``'s Mermaid picture and text list, pure;
- :mod:`.units`: sizes, ages and durations as people read them.

Nothing here imports the kernel or a backend: the kernel calls the runner and hands it
the ways to run a cell and to restore a result.
"""
