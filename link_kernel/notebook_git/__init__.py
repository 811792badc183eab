"""Notebooks in git: a cell-level merge driver, a diff, and a log of components
(DESIGN.md "Sharing").

- :mod:`.cells`: notebooks as JSON text, cell sources, routing lines by key; pure;
- :mod:`.textmerge`: a cell's text merged three ways by ``git merge-file``;
- :mod:`.merge`: the three-way, cell-level merge of notebooks; pure but for the text merge;
- :mod:`.check`: the merged pipeline checked as the kernel would; pure;
- :mod:`.textconv`: a notebook as text for ``git diff``; pure;
- :mod:`.driver`: what git runs (merge driver, textconv), with git's exit statuses;
- :mod:`.install`: registering them with git (install, uninstall, status);
- :mod:`.history`: ``link-kernel git log``, what each commit did to the components.

The kernel refuses a cell that still holds conflict markers (``routing.conflict_line``).
"""
