"""What cuts analyze's fixed cost, against the plain computation: the co-activation tables (``top``, the default,
against ``full``) and the outputs downstream commands read; the token matrix over row groups' samples; one row
group counted in slices; the radix sort of count vectors."""

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


def test_token_matrix_over_several_parts_by_hand():
    """Rows of the sample spread over row groups: tokens ordered by (hash, token), a layer a token lacks
    is -1, a token with two rows in one layer is flagged, rows of tokens past max_tokens are left out."""
    import numpy as np

    from moeprof.analysis import load
    from moeprof.analysis.aggregate import Aggregates, Selection, TokenSample

    sel = Selection(layers=[0, 1, 2], domains=["d"], request_ids=np.array([0]), request_domain=np.array([0]),
                    num_experts=8, top_k=2)
    agg = Aggregates.empty(sel)
    # (hash, token, layer, experts) rows; tokens by (hash, token): 10 (h 1), 11 (h 2), 12 (h 2), 13 (h 5)
    rows = [(2, 12, 0, (1, 2)), (1, 10, 2, (5, 6)), (5, 13, 0, (7, 0)), (2, 11, 1, (3, 4)),
            (1, 10, 0, (0, 1)), (2, 12, 1, (2, 3)), (2, 12, 1, (4, 5)), (5, 13, 1, (1, 1))]
    for chunk in (rows[:3], rows[3:5], rows[5:]):
        h, t, lay, ex = zip(*chunk)
        agg.sample_parts.append(TokenSample(np.array(h, np.uint64), np.array(t, np.uint64),
                                            np.array(lay, np.int16), np.array(ex, np.int16)))
    m, dup = load.token_matrix(agg, 3)
    assert m.shape == (3, 3, 2)
    assert m[0].tolist() == [[0, 1], [-1, -1], [5, 6]]  # token 10
    assert m[1].tolist() == [[-1, -1], [3, 4], [-1, -1]]  # token 11
    assert m[2, 0].tolist() == [1, 2] and m[2, 2].tolist() == [-1, -1]  # token 12: two rows in layer 1
    assert dup.tolist() == [False, False, True]
    m4, dup4 = load.token_matrix(agg, 10)
    assert m4.shape == (4, 3, 2) and m4[3].tolist() == [[7, 0], [1, 1], [-1, -1]] and not dup4[3]


def test_token_matrix_duplicates_are_told_from_a_row_that_holds_a_negative_id():
    """Without duplicates the matrix is checked by counting the cells written; a row whose first id is -1
    (which the pass refuses, but a sample built otherwise may hold) is not a duplicate, two rows in one cell are."""
    import numpy as np

    from moeprof.analysis import load
    from moeprof.analysis.aggregate import Aggregates, Selection, TokenSample

    sel = Selection(layers=[0, 1], domains=["d"], request_ids=np.array([0]), request_domain=np.array([0]),
                    num_experts=8, top_k=2)
    for rows, want in (([(1, 10, 0, (0, 1)), (1, 10, 1, (-1, 3)), (2, 11, 0, (4, 5))], [False, False]),
                       ([(1, 10, 0, (0, 1)), (1, 10, 0, (2, 3)), (2, 11, 0, (4, 5))], [True, False]),
                       ([(1, 10, 0, (0, 1)), (1, 10, 1, (2, 3)), (2, 11, 1, (4, 5))], [False, False])):
        agg = Aggregates.empty(sel)
        h, t, lay, ex = zip(*rows)
        agg.sample_parts.append(TokenSample(np.array(h, np.uint64), np.array(t, np.uint64), np.array(lay, np.int16),
                                            np.array(ex, np.int16)))
        m, dup = load.token_matrix(agg, 10)
        assert dup.tolist() == want
        assert m.shape == (2, 2, 2) and m[1, 0 if rows[2][2] == 0 else 1].tolist() == [4, 5]


def test_one_row_group_counted_in_slices_gives_the_same_aggregates(trace, monkeypatch):
    import numpy as np

    from moeprof.analysis import aggregate, load
    from moeprof.analysis.run import build_selection
    from moeprof.trace import Trace

    t = Trace.open(trace)
    assert len(aggregate.row_groups(t)) == 1
    sel = build_selection(t, None, None, 0, 1 << 17, 4096)
    whole = aggregate.aggregate_routing(t, sel, threads=1)
    monkeypatch.setattr(aggregate, "MIN_SLICE_ROWS", 1000)
    sliced = aggregate.aggregate_routing(t, sel, threads=3)
    # read in batches of MIN_SLICE_ROWS rows, counted on two threads while the next is decoded
    assert len(sliced.sample_parts) == -(-t.num_routing_rows // 1000) > 3 and len(whole.sample_parts) == 1
    for name in ("domains", "sampled", "seen", "phases_seen"):
        assert np.array_equal(getattr(whole, name), getattr(sliced, name)), name
    assert whole.rows == sliced.rows
    for x, y in zip(load.token_matrix(whole, 1 << 17), load.token_matrix(sliced, 1 << 17)):
        assert np.array_equal(x, y)


def test_a_page_that_cannot_be_decoded_names_the_shard(trace, tmp_path, monkeypatch):
    """Read in batches (and counted on threads), a row group whose pages cannot be decoded is still a
    TraceIntegrityError naming the shard and row group (reads not checked against the sha256 here)."""
    import shutil

    import pyarrow.parquet as pq

    from moeprof.analysis import aggregate
    from moeprof.errors import TraceIntegrityError

    copy = tmp_path / "t"
    shutil.copytree(trace, copy)
    shard = next((copy / "routing").glob("*.parquet"))
    chunk = next(c for c in (pq.ParquetFile(shard).metadata.row_group(0).column(i) for i in range(9))
                 if c.path_in_schema.startswith("experts"))
    data = bytearray(shard.read_bytes())
    end = chunk.data_page_offset + chunk.total_compressed_size
    data[end - 200 : end - 8] = bytes(192)  # the last page's compressed bytes zeroed: zstd refuses them
    shard.write_bytes(bytes(data))
    monkeypatch.setattr(aggregate, "MIN_SLICE_ROWS", 1000)  # batches of 1,000 rows, two counting threads
    for threads in (1, 3):
        with pytest.raises(TraceIntegrityError, match=r"row group 0\): cannot be decoded"):
            analyze_trace(copy, verify_reads=False, threads=threads)


@pytest.mark.parametrize("high", [3, 200, 60_000, 1 << 20])
def test_order_desc_is_the_stable_argsort_of_minus_the_counts(high):
    import numpy as np

    from moeprof.analysis.phase import order_desc

    rng = np.random.default_rng(high)
    for dtype in (np.int32, np.int64):
        a = rng.integers(0, high, size=(7, 5, 256)).astype(dtype)
        assert np.array_equal(order_desc(a), np.argsort(-a, axis=-1, kind="stable"))
    f = rng.random((4, 32))  # floats and negative counts keep the plain sort
    assert np.array_equal(order_desc(f), np.argsort(-f, axis=-1, kind="stable"))
    assert np.array_equal(order_desc(-a), np.argsort(a, axis=-1, kind="stable"))
