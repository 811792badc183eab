"""Three-way merge of notebooks, cell by cell (DESIGN.md "Sharing").

Pure but for the text merge of a cell's body, which :mod:`.textmerge` hands to git
(``text_merge`` swaps it). The git merge driver (:mod:`.driver`) calls
:func:`merge_notebooks` and writes what it returns.

1. **Matching.** Each side's cells are matched to the base's by component name (``name=``,
   when one cell has it on each side), then by cell id, then by identical source, then (for
   cells with a routing line, as in a notebook without ids) by identical body. A base
   cell a side does not match was deleted there; a side's cell no base cell matches was
   inserted there. Identical inserts on both sides are one cell.
2. **Order.** The base order stays, with each side's changes applied: a cell a side moved
   (not in the longest run of its cells that kept their base order) and a cell a side
   inserted go after the cell that precedes them on that side (their anchor). Both sides
   inserting at one anchor keep both: ours, then theirs. A cell moved on one side and
   edited on the other appears once, moved, with the edit.
3. **Cells.** The routing line merges key by key: target, name and each option as values
   (changed on one side: that side's; differently on both: a conflict), ``after=`` as a set
   (each side's additions, minus each side's removals). The body merges as text. Conflict
   markers go below the routing line, which stays the cell's first line. Outputs,
   execution count and metadata are ours unless only theirs changed; a cell in conflict
   loses its outputs. Deleting a cell the other side edited is a conflict: the edited cell
   stays, its body between markers whose other half says it was deleted.
4. **Renames.** A component renamed on one side (its cell matched, its name changed) is
   followed: a parent that names the old name, which no cell declares any more, names the
   new one, so the other side's new child of the old name joins the renamed component.
5. **The pipeline.** The result is checked as the kernel would (:mod:`.check`): a merge that
   breaks the pipeline is a conflict that says why.
"""

from __future__ import annotations

import copy
import uuid
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .cells import NbCell, Notebook, RouteLine, join_route, route_of, source_of, split_route
from .check import pipeline_problems
from .textmerge import Merged, merge3

TextMerge = Callable[[str, str, str, tuple[str, str, str]], Merged]
LABELS = ("ours", "base", "theirs")

_START = -1


@dataclass
class MergeResult:
    """The merged notebook and its conflicts (empty: a clean merge), one sentence each."""

    notebook: Notebook
    conflicts: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.conflicts


@dataclass
class _Slot:
    """One cell of the result: its versions in base, ours and theirs (None: absent)."""

    base: NbCell | None
    ours: NbCell | None
    theirs: NbCell | None
    base_index: int | None = None


def merge_notebooks(
    base: Notebook, ours: Notebook, theirs: Notebook, *, text_merge: TextMerge = merge3
) -> MergeResult:
    """``ours`` and ``theirs`` merged against ``base`` (see the module docstring)."""
    slots, ours_seq, theirs_seq = _slots(base["cells"], ours["cells"], theirs["cells"])
    order = _order(slots, ours_seq, theirs_seq)
    conflicts: list[str] = []
    cells: list[NbCell] = []
    renames: dict[str, str] = {}
    for slot in order:
        cell = _merge_cell(slot, text_merge, conflicts)
        if cell is None:
            continue
        old, new = route_of(slot.base or {}).name, route_of(cell).name
        if old and new and old != new:
            renames[old] = new
        cells.append(cell)
    _follow_renames(cells, renames)
    result = _notebook(base, ours, theirs)
    _unique_ids(cells, every=result["nbformat_minor"] >= 5)
    result["cells"] = cells
    conflicts.extend(pipeline_problems(result))
    return MergeResult(result, conflicts)


# -- matching ------------------------------------------------------------------------


def _match(base: list[NbCell], side: list[NbCell]) -> dict[int, int]:
    """``{base index: side index}``: by component name, then cell id, then source."""
    pairs: dict[int, int] = {}
    used: set[int] = set()
    base_names = Counter(n for n in map(_name, base) if n)
    side_names = Counter(n for n in map(_name, side) if n)
    where = {_name(c): j for j, c in enumerate(side) if _name(c)}
    for i, cell in enumerate(base):
        name = _name(cell)
        if name and base_names[name] == 1 and side_names[name] == 1:
            pairs[i] = where[name]
            used.add(where[name])
    ids = {c.get("id"): j for j, c in enumerate(side) if c.get("id")}
    for i, cell in enumerate(base):
        j = ids.get(cell.get("id")) if cell.get("id") else None
        if i not in pairs and j is not None and j not in used:
            pairs[i] = j
            used.add(j)
    by_source: dict[tuple[str, str], list[int]] = {}
    for j, cell in enumerate(side):
        if j not in used:
            by_source.setdefault(_content(cell), []).append(j)
    for i, cell in enumerate(base):
        if i in pairs:
            continue
        free = by_source.get(_content(cell))
        if free:
            pairs[i] = used_j = free.pop(0)
            used.add(used_j)
    # a cell without an id whose routing line alone changed (a rename, a new target)
    by_body: dict[str, list[int]] = {}
    for j, cell in enumerate(side):
        if j not in used and route_of(cell).keys and _body(cell).strip():
            by_body.setdefault(_body(cell), []).append(j)
    for i, cell in enumerate(base):
        if i not in pairs and route_of(cell).keys and _body(cell).strip():
            free = by_body.get(_body(cell))
            if free:
                pairs[i] = free.pop(0)
    return pairs


def _slots(
    base: list[NbCell], ours: list[NbCell], theirs: list[NbCell]
) -> tuple[list[_Slot], list[_Slot], list[_Slot]]:
    """The result's cells, and each side's cells as slots in that side's order."""
    to_ours, to_theirs = _match(base, ours), _match(base, theirs)
    ours_seq: list[_Slot | None] = [None] * len(ours)
    theirs_seq: list[_Slot | None] = [None] * len(theirs)
    slots = []
    for i, cell in enumerate(base):
        j, k = to_ours.get(i), to_theirs.get(i)
        slot = _Slot(cell, ours[j] if j is not None else None, theirs[k] if k is not None else None, i)
        slots.append(slot)
        if j is not None:
            ours_seq[j] = slot
        if k is not None:
            theirs_seq[k] = slot
    inserted: dict[tuple[str, str], list[_Slot]] = {}
    for j, cell in enumerate(ours):
        if ours_seq[j] is None:
            ours_seq[j] = slot = _Slot(None, cell, None)
            inserted.setdefault(_content(cell), []).append(slot)
            slots.append(slot)
    for k, cell in enumerate(theirs):
        if theirs_seq[k] is None:
            same = inserted.get(_content(cell))
            if same:  # both sides inserted this very cell: once
                theirs_seq[k] = slot = same.pop(0)
                slot.theirs = cell
            else:
                theirs_seq[k] = slot = _Slot(None, None, cell)
                slots.append(slot)
    return slots, ours_seq, theirs_seq  # type: ignore[return-value]


def _name(cell: NbCell) -> str | None:
    return route_of(cell).name


def _body(cell: NbCell) -> str:
    return split_route(source_of(cell))[1]


def _content(cell: NbCell) -> tuple[str, str]:
    return cell.get("cell_type", ""), source_of(cell)


# -- order ---------------------------------------------------------------------------


def _order(slots: list[_Slot], ours_seq: list[_Slot], theirs_seq: list[_Slot]) -> list[_Slot]:
    """The slots in the result's order (see the module docstring, 2.)."""
    ident = {id(slot): n for n, slot in enumerate(slots)}
    moved_ours = _moved(ours_seq)
    moved_theirs = _moved(theirs_seq)
    children: dict[int, list[int]] = {}
    floating: set[int] = set()
    for seq, moved, side in ((ours_seq, moved_ours, "ours"), (theirs_seq, moved_theirs, "theirs")):
        for position, slot in enumerate(seq):
            n = ident[id(slot)]
            if n in floating:
                continue  # placed by ours already (moved on both sides, or inserted on both)
            new = slot.base is None and (side == "ours" or slot.ours is None)
            if new or id(slot) in moved:
                anchor = ident[id(seq[position - 1])] if position else _START
                children.setdefault(anchor, []).append(n)
                floating.add(n)
    order: list[int] = []
    seen: set[int] = set()

    def emit(start: int) -> None:
        stack = [start]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n != _START:
                order.append(n)
            stack.extend(reversed(children.get(n, [])))

    emit(_START)
    for n, slot in enumerate(slots):
        if slot.base is not None and n not in floating:
            emit(n)
    for n in range(len(slots)):  # anchors that went round in a circle: keep the cells
        emit(n)
    return [slots[n] for n in order]


def _moved(seq: list[_Slot]) -> set[int]:
    """The ``id()`` of the base cells that ``seq`` moved: those outside its longest run
    of base cells still in base order."""
    placed = [slot for slot in seq if slot.base_index is not None]
    keys = [slot.base_index for slot in placed]
    tails: list[int] = []  # patience sort: the longest increasing subsequence
    tail_at: list[int] = []
    back: list[int] = [-1] * len(keys)
    for position, key in enumerate(keys):
        at = bisect_left(tails, key)
        if at == len(tails):
            tails.append(key)
            tail_at.append(position)
        else:
            tails[at] = key
            tail_at[at] = position
        back[position] = tail_at[at - 1] if at else -1
    keep: set[int] = set()
    position = tail_at[-1] if tail_at else -1
    while position >= 0:
        keep.add(position)
        position = back[position]
    return {id(slot) for position, slot in enumerate(placed) if position not in keep}


# -- cells ---------------------------------------------------------------------------


def _merge_cell(slot: _Slot, text_merge: TextMerge, conflicts: list[str]) -> NbCell | None:
    base, ours, theirs = slot.base, slot.ours, slot.theirs
    if base is None:
        return copy.deepcopy(ours if ours is not None else theirs)
    if ours is None and theirs is None:
        return None
    if ours is None or theirs is None:
        kept = theirs if ours is None else ours
        if _content(kept) == _content(base):
            return None  # deleted on one side, untouched on the other
        return _deleted_against_edit(kept, deleted_by="ours" if ours is None else "theirs",
                                     conflicts=conflicts)
    cell = copy.deepcopy(ours)
    label = _label(base)
    problems: list[str] = []
    cell_type = _pick(base.get("cell_type"), ours.get("cell_type"), theirs.get("cell_type"))
    if cell_type is None:
        problems.append("its type changed differently on both sides (kept ours)")
        cell_type = ours.get("cell_type")
    cell["cell_type"] = cell_type
    source, source_conflict = _merge_source(base, ours, theirs, text_merge, problems)
    cell["source"] = source
    for key in ("metadata", "attachments", "outputs", "execution_count"):
        if key in ours or key in theirs:
            chosen = theirs if ours.get(key) == base.get(key) and theirs.get(key) != base.get(key) else ours
            if key in chosen:
                cell[key] = copy.deepcopy(chosen[key])
    if cell_type == "code":
        cell.setdefault("outputs", [])
        cell.setdefault("execution_count", None)
        if source_conflict:
            cell["outputs"], cell["execution_count"] = [], None
    else:
        cell.pop("outputs", None)
        cell.pop("execution_count", None)
    conflicts.extend(f"{label}: {problem}" for problem in problems)
    return cell


def _merge_source(
    base: NbCell, ours: NbCell, theirs: NbCell, text_merge: TextMerge, problems: list[str]
) -> tuple[str, bool]:
    """The merged source, and whether it holds conflict markers."""
    texts = [source_of(c) for c in (base, ours, theirs)]
    if ours.get("cell_type") != "code" or theirs.get("cell_type") != "code":
        merged = text_merge(texts[0], texts[1], texts[2], LABELS)
        if merged.conflicts:
            problems.append("both sides changed the same lines")
        return merged.text, bool(merged.conflicts)
    (lb, bb), (lo, bo), (lt, bt) = (split_route(text) for text in texts)
    route, clashes = _merge_route(RouteLine.of(lb), RouteLine.of(lo), RouteLine.of(lt))
    merged = text_merge(bb, bo, bt, LABELS)
    body = merged.text
    if clashes:
        problems.append(
            "both sides changed the routing line's " + ", ".join(clashes) + " (kept ours above, "
            "both between markers)"
        )
        block = "".join(
            f"{marker}\n{line or '# (no routing line)'}\n"
            for marker, line in (("<<<<<<< ours", lo), ("||||||| base", lb), ("=======", lt))
        )
        body = f"{block}>>>>>>> theirs\n{body}"
    if merged.conflicts:
        problems.append("both sides changed the same lines")
    return join_route(route.render(), body), bool(clashes or merged.conflicts)


def _merge_route(base: RouteLine, ours: RouteLine, theirs: RouteLine) -> tuple[RouteLine, list[str]]:
    """The routing keys merged (see the module docstring, 3.); the keys in conflict."""
    keys: dict[str, Any] = {}
    clashes: list[str] = []
    for key in dict.fromkeys([*ours.keys, *theirs.keys, *base.keys]):
        vb, vo, vt = base.keys.get(key), ours.keys.get(key), theirs.keys.get(key)
        if key == "after":
            value: Any = _merge_set(vb or [], vo or [], vt or [])
        elif vo == vt or vt == vb:
            value = vo
        elif vo == vb:
            value = vt
        else:  # None is absent: a side that removed the key changed it too
            clashes.append(key)
            value = vo
        if value not in (None, []):
            keys[key] = value
    merged = RouteLine(keys, ours.line)
    if merged.render() != ours.line and keys == theirs.keys:
        merged = RouteLine(keys, theirs.line)
    return merged, clashes


def _pick(base: Any, ours: Any, theirs: Any) -> Any:
    """The 3-way value: a side's change, or None when both changed it differently."""
    if ours == theirs or theirs == base:
        return ours
    if ours == base:
        return theirs
    return None


def _merge_set(base: list[str], ours: list[str], theirs: list[str]) -> list[str]:
    removed = (set(base) - set(ours)) | (set(base) - set(theirs))
    return [p for p in dict.fromkeys([*ours, *theirs]) if p not in removed]


def _deleted_against_edit(kept: NbCell, *, deleted_by: str, conflicts: list[str]) -> NbCell:
    """The cell one side edited and the other deleted: kept, its body between markers."""
    cell = copy.deepcopy(kept)
    line, body = split_route(source_of(cell)) if cell.get("cell_type") == "code" else (None, source_of(cell))
    note = f"# (this cell was deleted on {deleted_by}: delete it, or keep the other half)\n"
    ended = body if not body or body.endswith("\n") else body + "\n"
    if deleted_by == "ours":
        block = f"<<<<<<< ours\n{note}=======\n{ended}>>>>>>> theirs\n"
    else:
        block = f"<<<<<<< ours\n{ended}=======\n{note}>>>>>>> theirs\n"
    cell["source"] = join_route(line, block)
    if cell.get("cell_type") == "code":
        cell["outputs"], cell["execution_count"] = [], None
    edited_by = "theirs" if deleted_by == "ours" else "ours"
    conflicts.append(f"{_label(kept)}: deleted on {deleted_by}, edited on {edited_by}")
    return cell


def _label(cell: NbCell) -> str:
    name = route_of(cell).name
    if name:
        return f"component {name!r}"
    first = next((line.strip() for line in source_of(cell).splitlines() if line.strip()), "")
    return f"cell {cell.get('id') or repr(first[:40])}"


# -- the notebook --------------------------------------------------------------------


def _follow_renames(cells: list[NbCell], renames: dict[str, str]) -> None:
    """A parent that names a renamed component's old name follows it to the new one."""
    if not renames:
        return
    declared = {route_of(cell).name for cell in cells}
    for cell in cells:
        route = route_of(cell)
        parents = route.parents
        followed = [renames.get(p, p) if p not in declared else p for p in parents]
        if followed != parents:
            route.keys["after"] = list(dict.fromkeys(followed))
            _, body = split_route(source_of(cell))
            cell["source"] = join_route(route.render(), body)


def _unique_ids(cells: list[NbCell], *, every: bool) -> None:
    """Two sides can bring one id (a cell copied on both): the later one gets a new id;
    with ``every`` (nbformat 4.5), a cell without one gets one."""
    seen: set[str] = set()
    for cell in cells:
        cell_id = cell.get("id")
        if cell_id is None and not every:
            continue
        cell_id = cell_id or uuid.uuid4().hex[:8]
        while cell_id in seen:
            cell_id = uuid.uuid4().hex[:8]
        cell["id"] = cell_id
        seen.add(cell_id)


def _notebook(base: Notebook, ours: Notebook, theirs: Notebook) -> Notebook:
    """The notebook's own fields: each metadata key is ours unless only theirs changed it."""
    result = {key: copy.deepcopy(value) for key, value in ours.items() if key != "cells"}
    metadata: dict[str, Any] = {}
    mb, mo, mt = (nb.get("metadata") or {} for nb in (base, ours, theirs))
    for key in dict.fromkeys([*mo, *mt]):
        vb, vo, vt = mb.get(key), mo.get(key), mt.get(key)
        value = vt if vo == vb and vt != vb else vo
        if value is not None:
            metadata[key] = copy.deepcopy(value)
    result["metadata"] = metadata
    result["nbformat"] = 4
    result["nbformat_minor"] = max(ours.get("nbformat_minor", 0), theirs.get("nbformat_minor", 0))
    return result
