"""Dependency graphs of jobs (pure, iterative, deterministic).

A graph is a mapping from each node to the nodes it *needs* (its dependencies): ``{"unit":
["build"]}`` means ``build`` runs before ``unit``. Names that are only needed, never keys, are
nodes without needs of their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def _nodes(edges: Mapping[str, Sequence[str]]) -> list[str]:
    """Every node: the keys in order, then needed names that are not keys, in order of use."""
    nodes = list(edges)
    known = set(nodes)
    for needs in edges.values():
        for need in needs:
            if need not in known:
                known.add(need)
                nodes.append(need)
    return nodes


def find_cycle(edges: Mapping[str, Sequence[str]]) -> list[str] | None:
    """One dependency cycle, if there is any.

    Depth-first search from each node in mapping order, following needs in the order given, so
    the same graph always yields the same cycle.

    Args:
        edges: Each node's needs.

    Returns:
        The cycle as a closed path (``["a", "b", "c", "a"]``: ``a`` needs ``b``, ``b`` needs
        ``c``, ``c`` needs ``a``), or ``None`` if the graph is acyclic.
    """
    done: set[str] = set()
    for start in _nodes(edges):
        if start in done:
            continue
        path: list[str] = [start]
        on_path: dict[str, int] = {start: 0}
        iterators = [iter(edges.get(start, ()))]
        while iterators:
            need = next(iterators[-1], None)
            if need is None:
                iterators.pop()
                finished = path.pop()
                del on_path[finished]
                done.add(finished)
                continue
            if need in on_path:
                return [*path[on_path[need] :], need]
            if need in done:
                continue
            on_path[need] = len(path)
            path.append(need)
            iterators.append(iter(edges.get(need, ())))
    return None


def find_cycles(edges: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """One cycle in each group of nodes that need each other (strongly connected component),
    in the order of the groups' first nodes: every independent mistake is reported once.

    Args:
        edges: Each node's needs.

    Returns:
        Closed paths as :func:`find_cycle` gives them; empty if the graph is acyclic.
    """
    cycles: list[list[str]] = []
    for group in _components(edges):
        members = set(group)
        if len(group) == 1 and group[0] not in edges.get(group[0], ()):
            continue  # a single node that does not need itself
        inside = {node: [n for n in edges.get(node, ()) if n in members] for node in group}
        cycle = find_cycle(inside)
        if cycle is not None:
            cycles.append(cycle)
    return cycles


def _components(edges: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan's algorithm, iterative), each in node order,
    ordered by their first node."""
    order = {node: i for i, node in enumerate(_nodes(edges))}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in order:
        if root in index:
            continue
        work = [(root, iter(edges.get(root, ())))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, needs = work[-1]
            need = next(needs, None)
            if need is not None:
                if need not in index:
                    index[need] = low[need] = len(index)
                    stack.append(need)
                    on_stack.add(need)
                    work.append((need, iter(edges.get(need, ()))))
                elif need in on_stack:
                    low[node] = min(low[node], index[need])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                found.append(sorted(group, key=order.__getitem__))
    return sorted(found, key=lambda group: order[group[0]])


def dag_levels(edges: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Kahn layering: level 0 holds the nodes without needs, level n those whose deepest need
    is on level n - 1.

    Args:
        edges: Each node's needs; the graph must be acyclic.

    Returns:
        The levels, names sorted within each level.

    Raises:
        ValueError: If the graph has a cycle.
    """
    nodes = _nodes(edges)
    waiting = {node: len(set(edges.get(node, ()))) for node in nodes}
    needed_by: dict[str, list[str]] = {node: [] for node in nodes}
    for node in nodes:
        for need in set(edges.get(node, ())):
            needed_by[need].append(node)
    level = sorted(node for node, count in waiting.items() if count == 0)
    levels: list[list[str]] = []
    placed = 0
    while level:
        levels.append(level)
        placed += len(level)
        following: list[str] = []
        for node in level:
            for user in needed_by[node]:
                waiting[user] -= 1
                if waiting[user] == 0:
                    following.append(user)
        level = sorted(following)
    if placed != len(nodes):
        cycle = find_cycle(edges) or []
        raise ValueError("dependency cycle: " + " -> ".join(cycle))
    return levels


def topological_order(edges: Mapping[str, Sequence[str]]) -> list[str]:
    """Every node after all of its needs: the levels of :func:`dag_levels`, one after another.

    Args:
        edges: Each node's needs; the graph must be acyclic.

    Returns:
        The nodes in a deterministic dependency order.

    Raises:
        ValueError: If the graph has a cycle.
    """
    return [node for level in dag_levels(edges) for node in level]
