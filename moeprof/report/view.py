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
from typing import Any

from moeprof.errors import UsageError


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
    figure_dirs: list[Path] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); is it a moeprof {what}?") from None


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
    if name == PLACEMENT or name.endswith(".placement.json"):
        return "placement"
    if path.suffix == ".json" and path.exists():
        return _sniff(path)
    return None


def _sniff(path: Path) -> str | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    if "physical_to_logical_map" in json.dumps(doc)[:100000] and "policy" in doc:
        return "placement"
    if "policies" in doc or "comparison" in doc:
        return "compare"
    if "imbalance" in doc or "layers" in doc and "model" in doc:
        return "summary"
    return None


def discover(paths: list[Path]) -> Inputs:
    """Find a trace / summary / compare result / placement in ``paths`` (and one level below dirs)."""
    found: dict[str, list[Path]] = {"trace": [], "summary": [], "compare": [], "placement": []}
    figure_dirs: list[Path] = []
    for given in paths:
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
    for kind in ("summary", "compare", "placement"):
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
        inputs.summary = read_json(inputs.summary_path, "analyze summary")
    if found["compare"]:
        inputs.compare_path = found["compare"][0]
        inputs.compare = read_json(inputs.compare_path, "simulate --compare result")
        figure_dirs.append(inputs.compare_path.parent)
    if found["placement"]:
        inputs.placement_path = found["placement"][0]
        inputs.placement = read_json(inputs.placement_path, "placement")
    return inputs


# -- accessors over summary.json ------------------------------------------------------------------
def _need(summary: dict[str, Any] | None, key: str, what: str) -> Any:
    if summary is None:
        raise Unavailable(f"no analysis in the inputs (give a trace or a summary.json) for {what}")
    why = (summary.get("unavailable") or {}).get(key)
    if why:
        raise Unavailable(why)
    node = summary.get(key)
    if node is None:
        raise Unavailable(f"the summary has no '{key}' section")
    return node


def imbalance(summary: dict[str, Any] | None, batch_size: int | None = None, stat: str = "median") -> list[Value]:
    """Straggler factor per layer: whole trace, or ``stat`` over batches of ``batch_size`` tokens."""
    node = _need(summary, "imbalance", "imbalance")
    if batch_size is None:
        return [Value(r["max_over_mean"], r["layer"]) for r in node["per_layer"]]
    rows = [r for r in node.get("batches", []) if r["batch_size"] == batch_size]
    if not rows:
        sizes = sorted({r["batch_size"] for r in node.get("batches", [])})
        raise Unavailable(f"no batch size {batch_size} in the summary (it has {sizes}; see analyze --batch-sizes)")
    return [Value(r[stat], r["layer"], f"batch {batch_size}, {stat}") for r in rows]


def per_layer_stat(summary: dict[str, Any] | None, key: str) -> list[Value]:
    node = _need(summary, "imbalance", key)
    return [Value(r[key], r["layer"]) for r in node["per_layer"] if key in r]


def domain_js_max(summary: dict[str, Any] | None) -> list[Value]:
    node = _need(summary, "domain", "domain shift")
    best: dict[int, Value] = {}
    for r in node.get("pairs", []):
        if r["layer"] not in best or r["js"] > best[r["layer"]].value:
            best[r["layer"]] = Value(r["js"], r["layer"], f"{r['a']} vs {r['b']}")
    if not best:
        raise Unavailable("fewer than two domains in the trace")
    return [best[k] for k in sorted(best)]


def domain_accuracy(summary: dict[str, Any] | None) -> list[Value]:
    node = _need(summary, "domain", "domain classification")
    acc = node.get("accuracy")
    if not acc or acc.get("value") is None:
        raise Unavailable((acc or {}).get("reason") or "no domain classification in the summary")
    return [Value(acc["value"], None, f"{acc.get('test_requests', '?')} held-out requests")]


def prefill_decode(summary: dict[str, Any] | None, method: str = "pearson") -> list[Value]:
    node = _need(summary, "prefill_decode", "prefill→decode correlation")
    return [Value(r[f"aggregate_{method}"], r["layer"]) for r in node["per_layer"]]


def placement_metric(inputs: Inputs, key: str, policy: str | None) -> list[Value]:
    """A simulated metric of one policy, from a --compare result or a placement's own figures."""
    if inputs.compare is not None:
        rows = {r["policy"]: r for r in inputs.compare.get("policies", [])}
        name = policy or (inputs.placement or {}).get("policy") or next(iter(rows), None)
        if name not in rows:
            raise Unavailable(f"no policy '{name}' in {inputs.compare_path} (it has {sorted(rows)})")
        return [Value(rows[name][key], None, name)]
    if inputs.placement is not None:
        metrics = inputs.placement.get("metrics") or {}
        name = inputs.placement.get("policy")
        if policy and policy != name:
            raise Unavailable(f"{inputs.placement_path} holds policy '{name}', not '{policy}'")
        if key not in metrics:
            raise Unavailable(f"{inputs.placement_path} has no simulated '{key}' (run moeprof simulate)")
        return [Value(metrics[key], None, name)]
    raise Unavailable("no placement or simulate --compare result in the inputs")
