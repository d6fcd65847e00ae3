"""Read the artifacts of analyze / place / simulate: the one place that knows their JSON layout.

``report``, ``check`` and ``diff`` ask this module for numbers ("imbalance per layer at batch 64,
p90") and get plain values or :class:`Unavailable` with the reason the artifact gives. When the
layout of ``summary.json`` or of a ``--compare`` result changes, only this module changes.

Inputs are found by :func:`discover`: a trace directory (has ``manifest.json``), an analyze output
directory (has ``summary.json``), a ``summary.json`` file, a placement file or a simulate
``--compare`` output; a directory is also searched one level down, so ``moeprof report moeprof-demo``
finds the demo's trace, analysis and placement together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moeprof.errors import UsageError

if TYPE_CHECKING:
    import numpy as np
    import polars as pl


class Unavailable(Exception):
    """A statistic the inputs do not hold; the message says why (from the artifact when it says)."""


@dataclass(frozen=True)
class Value:
    value: float
    layer: int | None = None
    where: str | None = None  # e.g. "batch 64, p90" or "code vs math"


SUMMARY = "summary.json"
COMPARE_NAMES = ("compare.json", "simulate_compare.json", "comparison.json")
PLACEMENT = "placement.json"
TIMELINE = "timeline.json"  # `moeprof simulate --timeline`


@dataclass
class Inputs:
    """What a report / check / diff works from. ``summary`` is the analyze result as a dict."""

    summary: dict[str, Any] | None = None
    summary_path: Path | None = None
    trace_path: Path | None = None
    compare: dict[str, Any] | None = None
    compare_path: Path | None = None
    placement: dict[str, Any] | None = None
    placement_path: Path | None = None
    timeline: dict[str, Any] | None = None
    timeline_path: Path | None = None
    figure_dirs: list[Path] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); is it a moeprof {what}?") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text file; is it a moeprof {what}?") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{path}: a JSON {type(doc).__name__}, not the object of a moeprof {what}")
    return doc


def read_summary(path: Path) -> dict[str, Any]:
    """An analyze ``summary.json``, checked against its format version and JSON Schema."""
    from moeprof.analysis.run import SUMMARY_FORMAT

    doc = read_json(path, "analyze summary")
    if "summary_format" not in doc:
        raise UsageError(f"{path}: not a summary.json of `moeprof analyze` (it has no summary_format)")
    found = str(doc["summary_format"])
    if found.split(".")[0] != SUMMARY_FORMAT.split(".")[0]:
        raise UsageError(
            f"{path}: summary format {found}, this moeprof reads format {SUMMARY_FORMAT}; "
            "re-run `moeprof analyze` with this version"
        )
    try:
        import jsonschema
        from importlib.resources import files

        schema = json.loads(files("moeprof.schemas").joinpath("summary.schema.json").read_text())
        jsonschema.validate(doc, schema)
    except FileNotFoundError:
        pass
    except jsonschema.ValidationError as exc:
        where = "/".join(str(x) for x in exc.absolute_path) or "(top level)"
        raise UsageError(f"{path}: not a valid analyze summary at {where}: {exc.message}") from None
    return doc


def classify(path: Path) -> str | None:
    """``trace``, ``summary``, ``compare``, ``placement`` or ``None`` for a path that is none of these."""
    if path.is_dir():
        if (path / "manifest.json").exists():
            return "trace"
        return None
    name = path.name
    if name == SUMMARY:
        return "summary"
    if name in COMPARE_NAMES:
        return "compare"
    if name == TIMELINE:
        return "timeline"
    if name == PLACEMENT or name.endswith(".placement.json") or name.startswith("placement-"):
        return "placement"
    if path.suffix == ".json" and path.exists():
        return _sniff(path)
    return None


def _sniff(path: Path) -> str | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    if "physical_to_logical_map" in doc and "policy" in doc:
        return "placement"
    if "rows" in doc and "time_order" in doc:
        return "timeline"
    if "rows" in doc and "topology" in doc:
        return "compare"
    if "summary_format" in doc:
        return "summary"
    return None


def discover(paths: list[Path]) -> Inputs:
    """Find a trace / summary / compare result / placement in ``paths`` (and one level below dirs)."""
    found: dict[str, list[Path]] = {"trace": [], "summary": [], "compare": [], "placement": [], "timeline": []}
    figure_dirs: list[Path] = []
    from moeprof.trace.fs import is_uri

    for given in paths:
        if is_uri(str(given)):  # a trace on object storage: opening it checks its manifest
            found["trace"].append(str(given))
            continue
        given = Path(given)
        if not given.exists():
            raise UsageError(f"{given}: no such file or directory")
        candidates = [given]
        if given.is_dir() and classify(given) != "trace":
            candidates = sorted(given.iterdir())
            candidates += [c for d in list(candidates) if d.is_dir() and classify(d) != "trace" for c in sorted(d.iterdir())]
        hits = 0
        for c in candidates:
            kind = classify(c)
            if kind is not None:
                found[kind].append(c)
                hits += 1
                if kind == "summary":
                    figure_dirs.append(c.parent)
        if not hits:
            raise UsageError(
                f"{given}: not a trace, an analyze output (summary.json), a placement or a compare result; "
                "give a trace directory or the --out directory of `moeprof analyze` / `moeprof simulate --compare`"
            )
    if found["compare"]:
        # a --compare output directory also holds one placement-<policy>.json per policy it fitted
        beside = {p.parent for p in found["compare"]}
        found["placement"] = [p for p in found["placement"] if p.parent not in beside]
    for kind in ("summary", "compare", "placement", "timeline"):
        if len(found[kind]) > 1:
            listed = ", ".join(str(p) for p in found[kind])
            raise UsageError(f"more than one {kind} in the inputs ({listed}); give one (use `moeprof diff` to compare two)")
    if len(found["trace"]) > 1:
        listed = ", ".join(str(p) for p in found["trace"])
        raise UsageError(f"more than one trace in the inputs ({listed}); use `moeprof diff A B` to compare two")
    inputs = Inputs(figure_dirs=figure_dirs, sources=[str(p) for p in paths])
    if found["trace"]:
        inputs.trace_path = found["trace"][0]
    if found["summary"]:
        inputs.summary_path = found["summary"][0]
        inputs.summary = read_summary(inputs.summary_path)
    if found["compare"]:
        inputs.compare_path = found["compare"][0]
        inputs.compare = read_json(inputs.compare_path, "simulate --compare result")
        figure_dirs.append(inputs.compare_path.parent)
    if found["placement"]:
        inputs.placement_path = found["placement"][0]
        inputs.placement = read_json(inputs.placement_path, "placement")
    if found["timeline"]:
        inputs.timeline_path = found["timeline"][0]
        inputs.timeline = read_json(inputs.timeline_path, "simulate --timeline result")
        figure_dirs.append(inputs.timeline_path.parent)
    return inputs


# -- accessors over summary.json ------------------------------------------------------------------
# summary.json (``moeprof analyze``): each statistic is a block with ``available`` and, when false, a
# ``reason``; per-layer detail beyond the summary lives in ``tables/*.parquet`` next to it.
def need(inputs: Inputs, key: str) -> dict[str, Any]:
    """The summary block ``key``, or :class:`Unavailable` with analyze's reason."""
    s = inputs.summary
    if s is None:
        raise Unavailable("no analysis among the inputs (give a trace or an analyze output directory)")
    node = s.get(key)
    if node is None:
        raise Unavailable(f"{inputs.summary_path} has no '{key}' block (written by another moeprof version?)")
    if node.get("available") is False:
        raise Unavailable(node.get("reason") or "not available")
    return node


def table(inputs: Inputs, name: str) -> "pl.DataFrame | None":
    """An analyze table (``tables/NAME.parquet`` next to summary.json), or None if it is not there."""
    if inputs.summary_path is None:
        return None
    path = inputs.summary_path.parent / "tables" / f"{name}.parquet"
    if not path.exists():
        return None
    import polars as pl

    return pl.read_parquet(path)


def imbalance(inputs: Inputs, batch_size: int | None = None, stat: str = "median") -> list[Value]:
    """Straggler factor per layer: whole trace, or ``stat`` over batches of ``batch_size`` tokens
    (per layer from analyze's batch table; pooled over layers when only the summary is at hand)."""
    if batch_size is None:
        return [Value(r["max_over_mean"], r["layer"]) for r in need(inputs, "imbalance")["per_layer"]]
    node = need(inputs, "batch_imbalance")
    row = next((b for b in node.get("batches", []) if b["batch_size"] == batch_size), None)
    if row is None:
        sizes = [b["batch_size"] for b in node.get("batches", [])]
        raise Unavailable(f"analyze computed no batch size {batch_size} (it has {sizes}; see analyze --batch-sizes)")
    if row.get("available") is False:
        raise Unavailable(row.get("reason") or f"no batch of {batch_size} tokens")
    where = f"batch {batch_size}, {stat}"
    per_layer = table(inputs, "batch_imbalance")
    if per_layer is not None:
        rows = per_layer.filter(per_layer["batch_size"] == batch_size).sort("layer").to_dicts()
        if rows:
            return [Value(r[stat], r["layer"], where) for r in rows]
    return [Value(row[stat], None, where + ", all layers")]


def per_layer_stat(inputs: Inputs, key: str) -> list[Value]:
    return [Value(r[key], r["layer"]) for r in need(inputs, "imbalance")["per_layer"] if key in r]


def domain_js_max(inputs: Inputs) -> list[Value]:
    """Per layer, the largest JS divergence over domain pairs (from analyze's domain_shift table)."""
    node = need(inputs, "domain_shift")
    shift = table(inputs, "domain_shift")
    if shift is None:
        best = max(node["pairs"], key=lambda r: r["js_max"])
        return [Value(best["js_max"], None, f"{best['domain_a']} vs {best['domain_b']}, max over layers")]
    out = []
    for layer in sorted(set(shift["layer"].to_list())):
        rows = shift.filter(shift["layer"] == layer).sort("js", descending=True).to_dicts()
        out.append(Value(rows[0]["js"], layer, f"{rows[0]['domain_a']} vs {rows[0]['domain_b']}"))
    return out


def domain_accuracy(inputs: Inputs) -> list[Value]:
    node = need(inputs, "classification")
    return [Value(node["accuracy"], None, f"{node.get('test_requests', '?')} held-out requests")]


def prefill_decode(inputs: Inputs, method: str = "pearson") -> list[Value]:
    node = need(inputs, "prefill_decode")
    return [Value(r[f"aggregate_{method}"], r["layer"]) for r in node["per_layer"]]


def expert_counts(path: Path | str, engine: Any = "local") -> tuple[list[int], "np.ndarray", int]:
    """MoE layers, token-routes per (layer, expert) ``(L, E)`` and E of a run: a trace (analysed now,
    on ``engine``; a directory or a URI), an analyze output directory or its summary.json."""
    import numpy as np

    from moeprof.trace.fs import is_uri

    uri = is_uri(str(path))
    path = str(path) if uri else Path(path)
    if uri or (path.is_dir() and (path / "manifest.json").exists()):
        from moeprof.analysis.run import analyze_trace

        a = analyze_trace(path, batch_sizes=(1,), engine=engine)
        return list(a.arrays["layers"]), np.asarray(a.arrays["load"], np.int64), int(a.arrays["num_experts"])
    summary_path = path / SUMMARY if path.is_dir() else path
    if not summary_path.exists():
        raise UsageError(f"{path}: neither a trace (manifest.json) nor an analyze output ({SUMMARY})")
    inputs = Inputs(summary=read_summary(summary_path), summary_path=summary_path)
    loads = table(inputs, "expert_loads")
    if loads is None:
        raise UsageError(
            f"{summary_path.parent / 'tables' / 'expert_loads.parquet'}: not found; diff needs the per-expert "
            "table that `moeprof analyze --out` writes next to summary.json (or give the trace itself)"
        )
    layers = sorted(set(loads["layer"].to_list()))
    E = int(inputs.summary["trace"]["model"]["num_experts"])
    counts = np.zeros((len(layers), E), np.int64)
    li = {x: i for i, x in enumerate(layers)}
    for layer, expert, count in loads.select(["layer", "expert", "count"]).iter_rows():
        counts[li[layer], expert] = count
    return layers, counts, E


PLACEMENT_KEYS = {
    "cross_node_bytes": "cross_node_bytes_per_token",
    "intra_node_bytes": "intra_node_bytes_per_token",
    "local_share": "local_node_share",
}


def placement_value(metrics: dict[str, Any], key: str, stat: str = "p90") -> float | None:
    """One number from a simulated metrics block (``placement.json`` metrics or a --compare row)."""
    if key == "gpu_imbalance":
        return (metrics.get("gpu_load_max_mean") or {}).get(stat)
    return metrics.get(PLACEMENT_KEYS.get(key, key))


def compare_rows(inputs: Inputs) -> list[dict[str, Any]]:
    """Rows of a simulate --compare result: one per fitted policy (``key`` = policy[+grouping])."""
    rows = (inputs.compare or {}).get("rows") or []
    return [dict(r, key=r.get("key") or r.get("policy")) for r in rows]


def placement_metric(inputs: Inputs, key: str, policy: str | None, stat: str = "p90") -> list[Value]:
    """A simulated metric of one policy, from a --compare result or a placement's own figures."""
    if inputs.compare is not None:
        rows = {r["key"]: r for r in compare_rows(inputs)}
        name = policy or (inputs.placement or {}).get("policy") or next(iter(rows), None)
        if name not in rows:
            raise Unavailable(f"no policy '{name}' in {inputs.compare_path} (it has {', '.join(rows)})")
        value = placement_value(rows[name], key, stat)
        if value is None:
            raise Unavailable(f"{inputs.compare_path}: policy '{name}' has no simulated '{key}'")
        return [Value(value, None, name)]
    if inputs.placement is not None:
        metrics = inputs.placement.get("metrics") or {}
        name = (inputs.placement.get("policy") or {})
        name = name.get("name") if isinstance(name, dict) else name
        if policy and policy != name:
            raise Unavailable(f"{inputs.placement_path} holds policy '{name}', not '{policy}'")
        value = placement_value(metrics, key, stat)
        if value is None:
            raise Unavailable(f"{inputs.placement_path} has no simulated '{key}' (run moeprof simulate)")
        return [Value(value, None, name)]
    raise Unavailable("no placement or simulate --compare result among the inputs")
