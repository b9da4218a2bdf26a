"""The docs' tables that come from benchmarks show what their committed JSON holds."""

import pytest

from benchmarks.tables import TABLES, regenerated, stale


def test_generated_tables_match_their_committed_json():
    assert stale() == [], "a table differs from its JSON: run python -m benchmarks.tables"
    assert all(t.document.is_file() and t.source.is_file() for t in TABLES)


def test_only_the_block_between_the_markers_is_replaced():
    text = (
        "# Title\n\nBefore.\n\n<!-- BEGIN GENERATED demo (from x.json) -->\n| old |\n"
        "<!-- END GENERATED demo -->\n\nAfter.\n"
    )
    new = regenerated(text, "demo", "| new |\n")
    assert new == text.replace("| old |", "| new |")
    with pytest.raises(ValueError, match="found 0"):
        regenerated(text, "other", "| new |\n")
    with pytest.raises(ValueError, match="found 2"):
        regenerated(text + text, "demo", "| new |\n")
