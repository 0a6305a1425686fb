"""Dependency graphs: cycles, levels and order."""

from __future__ import annotations

import pytest

from conveyor.spec.graph import dag_levels, find_cycle, topological_order


def test_no_cycle_in_a_dag() -> None:
    assert find_cycle({}) is None
    assert find_cycle({"a": [], "b": ["a"], "c": ["a", "b"]}) is None


def test_self_loop() -> None:
    assert find_cycle({"a": ["a"]}) == ["a", "a"]


def test_cycle_is_a_closed_path() -> None:
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]


def test_cycle_is_found_behind_an_acyclic_part() -> None:
    edges = {"start": [], "x": ["start", "y"], "y": ["z"], "z": ["y"]}
    assert find_cycle(edges) == ["y", "z", "y"]


def test_cycle_is_deterministic() -> None:
    edges = {"a": ["b", "c"], "b": ["a"], "c": ["a"]}
    assert find_cycle(edges) == ["a", "b", "a"]
    assert all(find_cycle(edges) == ["a", "b", "a"] for _ in range(5))


def test_needs_that_are_not_keys_are_leaves() -> None:
    assert find_cycle({"a": ["outside"]}) is None
    assert dag_levels({"a": ["outside"]}) == [["outside"], ["a"]]


def test_long_chain_is_handled_iteratively() -> None:
    edges = {f"n{i}": [f"n{i + 1}"] for i in range(50_000)}
    assert find_cycle(edges) is None
    edges["n50000"] = ["n0"]
    cycle = find_cycle(edges)
    assert cycle is not None and len(cycle) == 50_002 and cycle[0] == cycle[-1] == "n0"
    assert len(dag_levels({f"n{i}": [f"n{i + 1}"] for i in range(50_000)})) == 50_001


def test_levels_are_kahn_layers_sorted_by_name() -> None:
    edges = {
        "unit": ["build"],
        "build": [],
        "lint": [],
        "package": ["unit", "lint"],
        "docs": ["build"],
    }
    assert dag_levels(edges) == [["build", "lint"], ["docs", "unit"], ["package"]]


def test_level_is_one_past_the_deepest_need() -> None:
    edges = {"a": [], "b": ["a"], "c": ["b"], "d": ["a", "c"]}
    assert dag_levels(edges) == [["a"], ["b"], ["c"], ["d"]]


def test_duplicate_needs_count_once() -> None:
    assert dag_levels({"a": [], "b": ["a", "a"]}) == [["a"], ["b"]]


def test_empty_graph() -> None:
    assert dag_levels({}) == []
    assert topological_order({}) == []


def test_topological_order_puts_needs_first() -> None:
    edges = {"package": ["unit", "lint"], "unit": ["build"], "lint": [], "build": []}
    order = topological_order(edges)
    assert order == ["build", "lint", "unit", "package"]
    for node, needs in edges.items():
        assert all(order.index(need) < order.index(node) for need in needs)


def test_levels_refuse_a_cycle() -> None:
    with pytest.raises(ValueError, match="dependency cycle: a -> b -> a"):
        dag_levels({"a": ["b"], "b": ["a"], "c": []})


def test_find_cycles_reports_one_cycle_per_tangle() -> None:
    from conveyor.spec.graph import find_cycles

    assert find_cycles({"a": [], "b": ["a"]}) == []
    edges = {"a": ["b"], "b": ["a"], "c": [], "e": ["f"], "f": ["e"], "g": ["g"]}
    assert find_cycles(edges) == [["a", "b", "a"], ["e", "f", "e"], ["g", "g"]]
    # Two loops sharing a node are one tangle: one cycle is enough to show it.
    assert find_cycles({"a": ["b"], "b": ["a", "c"], "c": ["b"]}) == [["a", "b", "a"]]
    long_chain = {f"n{i}": [f"n{i + 1}"] for i in range(5000)}
    long_chain["n5000"] = ["n0"]
    assert len(find_cycles(long_chain)[0]) == 5002  # no recursion limit
