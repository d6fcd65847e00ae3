"""Co-activation tables: ``top`` (the default) against ``full``, and the outputs downstream commands read."""

from __future__ import annotations

import polars as pl
import pytest

from moeprof.analysis.run import analyze_trace
from moeprof.synthetic import generate_trace


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    # 32 experts, top-4, 4 layers: most pairs are seen, few are anyone's most frequent partner
    return generate_trace(tmp_path_factory.mktemp("co") / "trace", num_requests=60, seed=3).path


@pytest.fixture(scope="module")
def both(trace):
    return analyze_trace(trace, coactivation_tables="top"), analyze_trace(trace, coactivation_tables="full")


def test_the_summary_does_not_depend_on_the_tables(both):
    top, full = both
    assert top.summary == full.summary
    pairs = full.tables["coactivation_pairs"]
    assert top.summary["coactivation"]["pairs"]["nonzero_pairs"] == pairs.height
    # the top pairs by lift, as computed from the whole table
    want = pairs.filter(pl.col("count") >= 10).sort("lift", descending=True, maintain_order=True).head(10)
    assert top.summary["coactivation"]["pairs"]["top_by_lift"] == want.to_dicts()


def test_top_tables_are_the_full_rows_of_each_experts_most_frequent_partner(both):
    top, full = both
    assert set(top.tables) - set(full.tables) == {"coactivation_pairs_top", "transitions_top"}
    assert set(full.tables) - set(top.tables) == {"coactivation_pairs", "transitions"}
    pairs = full.tables["coactivation_pairs"]
    # each expert's largest count over the pairs it is in, either side
    sides = pl.concat([pairs.select("layer", pl.col("expert_a").alias("e"), "count"),
                       pairs.select("layer", pl.col("expert_b").alias("e"), "count")])
    best = sides.group_by("layer", "e").agg(best=pl.col("count").max())
    want = (pairs.join(best, left_on=["layer", "expert_a"], right_on=["layer", "e"])
            .join(best, left_on=["layer", "expert_b"], right_on=["layer", "e"], suffix="_b")
            .filter((pl.col("count") == pl.col("best")) | (pl.col("count") == pl.col("best_b")))
            .select(pairs.columns).sort("layer", "expert_a", "expert_b"))
    got = top.tables["coactivation_pairs_top"]
    assert got.equals(want)
    assert 0 < got.height < pairs.height / 4
    trans = full.tables["transitions"]
    want_t = trans.filter(pl.col("count") == pl.col("count").max().over("layer", "next_layer", "expert"))
    got_t = top.tables["transitions_top"]
    assert got_t.equals(want_t)
    # every expert with a token in a layer followed by another has at least one row, and its P(e'|e) is the max
    assert got_t.select("layer", "expert").unique().height == trans.select("layer", "expert").unique().height
    assert 0 < got_t.height < trans.height / 4


def test_cli_writes_top_tables_by_default_and_full_on_request(cli, trace, tmp_path):
    r = cli("analyze", trace, "--out", tmp_path / "top", "--json")
    assert r.exit_code == 0, r.stderr
    names = {p.stem for p in (tmp_path / "top" / "tables").glob("*.parquet")}
    assert {"coactivation_pairs_top", "transitions_top"} <= names
    assert not {"coactivation_pairs", "transitions"} & names
    r = cli("analyze", trace, "--out", tmp_path / "full", "--coactivation-tables", "full", "--json")
    assert r.exit_code == 0, r.stderr
    names = {p.stem for p in (tmp_path / "full" / "tables").glob("*.parquet")}
    assert {"coactivation_pairs", "transitions"} <= names and not {"coactivation_pairs_top", "transitions_top"} & names
    top = pl.read_parquet(tmp_path / "top" / "tables" / "transitions_top.parquet")
    assert top.columns == pl.read_parquet(tmp_path / "full" / "tables" / "transitions.parquet").columns
    r = cli("analyze", trace, "--coactivation-tables", "all")
    assert r.exit_code == 2 and "--coactivation-tables" in r.stderr and "Traceback" not in r.stderr


def test_report_check_and_diff_read_either_output(cli, trace, tmp_path):
    for mode in ("top", "full"):
        assert cli("analyze", trace, "--out", tmp_path / mode, "--coactivation-tables", mode, "--json").exit_code == 0
        r = cli("report", tmp_path / mode, "--out", tmp_path / f"report-{mode}")
        assert r.exit_code == 0, r.stderr
        html = next((tmp_path / f"report-{mode}").glob("*.html")).read_text()
        assert "Co-activation" in html
        r = cli("check", tmp_path / mode, "--max-imbalance", "100")
        assert r.exit_code == 0, r.stderr
    r = cli("diff", tmp_path / "top", tmp_path / "full", "--json")
    assert r.exit_code == 0, r.stderr


def test_bad_value_in_the_library_is_a_usage_error(trace):
    from moeprof.errors import UsageError

    with pytest.raises(UsageError, match="--coactivation-tables must be one of top, full"):
        analyze_trace(trace, coactivation_tables="all")
