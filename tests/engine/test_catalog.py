"""The catalog's estimates of what a conversion needs."""

from __future__ import annotations

from engine import catalog


def test_conversion_space_counts_float32_graphs_only_where_they_are_built():
    """A model whose float32 weights fit the memory writes its fp32 graphs, then the quantised ones beside
    them; one larger than memory (a 7B model on a 24 GB machine) writes only the quantised ones."""
    big, small = catalog.find("dream-coder-7b"), catalog.find("open-dcoder-0.5b")
    laptop, server = 24 * 10**9, 256 * 10**9
    assert catalog.conversion_space(big, "auto", laptop) == big.graph_bytes("int8")
    assert catalog.conversion_space(big, "int4", laptop) == big.graph_bytes("int4")
    assert catalog.conversion_space(big, "auto", server) == big.graph_bytes("fp32") + big.graph_bytes("int8")
    assert catalog.conversion_space(small, "int8", laptop) == small.graph_bytes("fp32") + small.graph_bytes("int8")
    assert catalog.conversion_space(small, "fp32", laptop) == small.graph_bytes("fp32")
    assert catalog.conversion_space(big, "auto", None) == catalog.conversion_space(big, "auto", server)  # unknown: the most
