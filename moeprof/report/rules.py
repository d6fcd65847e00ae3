"""Rules for `moeprof check`: thresholds on the numbers of a summary, read from TOML or options.

A rules file is a list of ``[[rule]]`` tables::

    [[rule]]
    metric = "imbalance"        # a name from METRICS
    max = 4.0                   # and/or min = ...
    batch_size = 64             # metric parameters (see METRICS[...].params)
    stat = "p90"
    layers = [3, 5]             # optional: only these MoE layers

Every rule is checked against every value the metric has (one per MoE layer, or one for the whole
trace); a rule holds when every value is within its limits. Errors in the file name ``file:line``.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from moeprof.errors import UsageError
from moeprof.report import view
from moeprof.report.view import Unavailable

COMMON_KEYS = {"metric", "max", "min", "layers", "name"}


@dataclass(frozen=True)
class Metric:
    """A number (or one per layer) that a rule can bound."""

    description: str
    extract: Callable[[view.Inputs, dict[str, Any]], list[view.Value]]
    params: dict[str, tuple[type, Any, str]] = field(default_factory=dict)  # name -> (type, default, help)
    bound: str = "max"  # the natural side of the limit, for --max-*/--min-* options and docs
    range: tuple[float, float] = (0.0, math.inf)  # every value the metric can take; a limit outside is a mistake


METRICS: dict[str, Metric] = {
    "imbalance": Metric(
        "busiest expert's load / mean expert load, per MoE layer (1.0 = perfect balance)",
        lambda i, p: view.imbalance(i, p["batch_size"], p["stat"]),
        {
            "batch_size": (int, None, "over batches of this many tokens instead of the whole trace"),
            "stat": (str, "median", "with batch_size: median or p90 over batches"),
        },
        range=(1.0, math.inf),
    ),
    "dead_experts": Metric(
        "experts that received no token in a layer", lambda i, p: view.per_layer_stat(i, "dead"),
        range=(0.0, math.inf),
    ),
    "gini": Metric(
        "Gini coefficient of expert load, per layer", lambda i, p: view.per_layer_stat(i, "gini"), range=(0.0, 1.0)
    ),
    "entropy": Metric(
        "normalised entropy H / ln E of expert load, per layer (1.0 = uniform)",
        lambda i, p: view.per_layer_stat(i, "entropy"),
        bound="min",
        range=(0.0, 1.0),
    ),
    "domain_js": Metric(
        "largest Jensen-Shannon divergence (base 2) between two domains' expert popularity, per layer",
        lambda i, p: view.domain_js_max(i),
        range=(0.0, 1.0),
    ),
    "domain_accuracy": Metric(
        "accuracy of predicting a request's domain from its prefill routing (held-out split)",
        lambda i, p: view.domain_accuracy(i),
        bound="min",
        range=(0.0, 1.0),
    ),
    "prefill_decode_corr": Metric(
        "aggregate correlation of prefill and decode expert counts, per layer",
        lambda i, p: view.prefill_decode(i, p["method"]),
        {"method": (str, "pearson", "pearson or spearman")},
        bound="min",
        range=(-1.0, 1.0),
    ),
    "cross_node_bytes": Metric(
        "cross-node bytes per token of a placement on held-out requests",
        lambda i, p: view.placement_metric(i, "cross_node_bytes", p["policy"]),
        {"policy": (str, None, "which policy of a --compare result (default: the placement's own)")},
        range=(0.0, math.inf),
    ),
    "gpu_imbalance": Metric(
        "busiest GPU's load / mean GPU load of a placement, per micro-batch (p90 over layers and batches)",
        lambda i, p: view.placement_metric(i, "gpu_imbalance", p["policy"]),
        {"policy": (str, None, "which policy of a --compare result (default: the placement's own)")},
        range=(1.0, math.inf),
    ),
    "local_share": Metric(
        "share of token-routes served on the token's own node under a placement",
        lambda i, p: view.placement_metric(i, "local_share", p["policy"]),
        {"policy": (str, None, "which policy of a --compare result (default: the placement's own)")},
        bound="min",
        range=(0.0, 1.0),
    ),
}


@dataclass
class Rule:
    metric: str
    max: float | None = None
    min: float | None = None
    layers: list[int] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    origin: str = ""  # "rules.toml:3" or "--max-imbalance"
    name: str | None = None

    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.params.items() if v is not None and v != _default(self, k))
        return self.name or (self.metric + (f" ({extra})" if extra else ""))


def _default(rule: Rule, key: str) -> Any:
    return METRICS[rule.metric].params[key][1]


@dataclass
class Failure:
    rule: Rule
    value: float
    limit: float
    side: str  # "max" or "min"
    layer: int | None
    where: str | None = None

    def message(self) -> str:
        op = ">" if self.side == "max" else "<"
        at = f" at layer {self.layer}" if self.layer is not None else ""
        where = f" [{self.where}]" if self.where else ""
        return (
            f"{self.rule.label()}{at}: {_num(self.value)} {op} {self.side} {_num(self.limit)}{where} "
            f"({self.rule.origin})"
        )


@dataclass
class Outcome:
    """One rule's result: the worst value seen and every value outside the limits."""

    rule: Rule
    worst: view.Value | None
    failures: list[Failure]

    @property
    def ok(self) -> bool:
        return not self.failures


def _num(x: float) -> str:
    if float(x).is_integer() and abs(x) < 1e15:
        return f"{int(x)}"
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:,.0f}"


# -- building rules -------------------------------------------------------------------------------
def load_rules(path: str | Path) -> list[Rule]:
    """Parse a rules file; raise :class:`UsageError` naming ``file:line`` for anything wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is not TOML
    except FileNotFoundError:
        raise UsageError(f"{path}: rules file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the rules file ({exc})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None) or _line_from_message(str(exc))
        msg = getattr(exc, "msg", None) or re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise UsageError(f"{path}:{line}: not valid TOML: {msg}") from None
    unknown_top = [k for k in doc if k != "rule"]
    if unknown_top:
        key = unknown_top[0]
        raise UsageError(
            f"{path}:{_find_line(text, key, 0, top=True)}: unknown table or key '{key}'; "
            "a rules file holds only [[rule]] tables"
        )
    tables = doc.get("rule", [])
    if not isinstance(tables, list) or not tables:
        raise UsageError(f"{path}: no [[rule]] table; see `moeprof check --help` for the format")
    blocks = _rule_blocks(text)
    rules = []
    for i, table in enumerate(tables):
        start = blocks[i] if i < len(blocks) else 1
        rules.append(_rule_from_table(table, path, text, start))
    return rules


def _rule_from_table(table: dict[str, Any], path: Path, text: str, start: int) -> Rule:
    def at(key: str | None = None) -> str:
        return f"{path}:{_find_line(text, key, start) if key else start}"

    metric = table.get("metric")
    if metric is None:
        raise UsageError(f"{at()}: [[rule]] without 'metric'; one of: {', '.join(METRICS)}")
    if metric not in METRICS:
        raise UsageError(f"{at('metric')}: unknown metric '{metric}'; known metrics: {', '.join(METRICS)}")
    spec = METRICS[metric]
    for key in table:
        if key not in COMMON_KEYS and key not in spec.params:
            allowed = sorted(COMMON_KEYS | set(spec.params))
            raise UsageError(f"{at(key)}: unknown key '{key}' for metric '{metric}'; allowed: {', '.join(allowed)}")
    limits = {}
    for side in ("max", "min"):
        if side in table:
            v = table[side]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UsageError(f"{at(side)}: '{side}' must be a finite number, got {v!r}")
            limits[side] = float(v)
            _check_limit(metric, float(v), at(side))
    if not limits:
        raise UsageError(f"{at('metric')}: rule on '{metric}' has neither 'max' nor 'min'")
    if limits.get("min", -math.inf) > limits.get("max", math.inf):
        raise UsageError(f"{at('min')}: min {limits['min']:g} is above max {limits['max']:g}: no value can hold")
    layers = table.get("layers")
    if layers is not None and (
        not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
    ):
        raise UsageError(f"{at('layers')}: 'layers' must be a list of layer numbers, got {layers!r}")
    if layers == []:  # a rule over no layer checks nothing, and would always hold
        raise UsageError(f"{at('layers')}: 'layers' is empty; name at least one MoE layer, or leave 'layers' out")
    name = table.get("name")
    if name is not None and not isinstance(name, str):
        raise UsageError(f"{at('name')}: 'name' must be a string, got {name!r}")
    params = {}
    for key, (typ, default, _help) in spec.params.items():
        value = table.get(key, default)
        if value is not None and not isinstance(value, typ) or isinstance(value, bool):
            raise UsageError(f"{at(key)}: '{key}' must be {typ.__name__}, got {value!r}")
        params[key] = value
    try:
        _check_params(metric, params)
    except UsageError as exc:
        bad = next(iter(k for k in params if k in str(exc)), None)
        raise UsageError(f"{at(bad)}: {exc}") from None
    if "stat" in table and table.get("batch_size") is None:
        # Without batch_size the metric is the whole run's one value per layer: no median or p90 to take.
        raise UsageError(f"{at('stat')}: 'stat' needs 'batch_size' (median or p90 over batches of that size)")
    return Rule(
        metric=metric, max=limits.get("max"), min=limits.get("min"), layers=layers, params=params,
        origin=at(), name=table.get("name"),
    )


def _check_params(metric: str, params: dict[str, Any]) -> None:
    if "stat" in params and params["stat"] not in ("median", "p90"):
        raise UsageError(f"stat must be 'median' or 'p90', got '{params['stat']}'")
    if "method" in params and params["method"] not in ("pearson", "spearman"):
        raise UsageError(f"method must be 'pearson' or 'spearman', got '{params['method']}'")
    if params.get("batch_size") is not None and params["batch_size"] < 1:
        raise UsageError(f"batch_size must be >= 1, got {params['batch_size']}")


def _check_limit(metric: str, value: float, where: str) -> None:
    """A limit outside every value the metric can take never fails (or never holds): a mistake."""
    lo, hi = METRICS[metric].range
    if not lo <= value <= hi:
        span = f"{lo:g} and up" if hi == math.inf else f"{lo:g} to {hi:g}"
        raise UsageError(f"{where}: {value:g} is out of range: {metric} takes values from {span}")


def rule_from_option(metric: str, side: str, limit: float, option: str, **params: Any) -> Rule:
    """A rule given on the command line, e.g. ``--max-imbalance 4``."""
    if not math.isfinite(limit):
        raise UsageError(f"{option}: give a finite number, got {limit}")
    _check_limit(metric, float(limit), option)
    spec = METRICS[metric]
    full = {k: params.get(k, default) for k, (_t, default, _h) in spec.params.items()}
    _check_params(metric, full)
    return Rule(metric=metric, params=full, origin=option, **{side: float(limit)})


def _rule_blocks(text: str) -> list[int]:
    """1-based line numbers of every ``[[rule]]`` header, in order."""
    return [n for n, line in enumerate(text.splitlines(), 1) if re.match(r"\s*\[\[\s*rule\s*\]\]", line)]


def _find_line(text: str, key: str | None, start: int, *, top: bool = False) -> int:
    """Line of ``key = ...`` (or ``[key]``) at or after line ``start``, inside the same table."""
    lines = text.splitlines()
    pattern = re.compile(rf"\s*(\[+\s*)?[\"']?{re.escape(key or '')}[\"']?\s*(=|\]|\.)")
    for n in range(max(start, 1), len(lines) + 1):
        line = lines[n - 1]
        if n > start and not top and re.match(r"\s*\[", line):
            break
        if pattern.match(line):
            return n
    return start


def _line_from_message(message: str) -> int | str:
    m = re.search(r"line (\d+)", message)
    return int(m.group(1)) if m else "?"


# -- checking -------------------------------------------------------------------------------------
def evaluate(rules: list[Rule], inputs: view.Inputs) -> list[Outcome]:
    """Check every rule; raise :class:`UsageError` when a rule's metric is not in the inputs."""
    outcomes = []
    for rule in rules:
        try:
            values = METRICS[rule.metric].extract(inputs, rule.params)
        except Unavailable as exc:
            raise UsageError(f"{rule.origin}: cannot check '{rule.label()}': {exc}") from None
        if rule.layers is not None:
            known = {v.layer for v in values}
            missing = [x for x in rule.layers if x not in known]
            if missing:
                raise UsageError(
                    f"{rule.origin}: layers {missing} have no '{rule.metric}' value; "
                    f"layers with one: {sorted(x for x in known if x is not None)}"
                )
            values = [v for v in values if v.layer in rule.layers]
        defined = [v for v in values if v.value is not None and not math.isnan(v.value)]
        if not defined:  # a rule that checked nothing must not pass
            why = f"all {len(values)} of its values are undefined (NaN)" if values else "the inputs hold no value of it"
            raise UsageError(f"{rule.origin}: cannot check '{rule.label()}': {why}")
        values = defined
        failures = []
        for v in values:
            if rule.max is not None and v.value > rule.max:
                failures.append(Failure(rule, v.value, rule.max, "max", v.layer, v.where))
            if rule.min is not None and v.value < rule.min:
                failures.append(Failure(rule, v.value, rule.min, "min", v.layer, v.where))
        worst = None
        if values:
            side = "max" if rule.max is not None else "min"
            worst = max(values, key=lambda v: v.value) if side == "max" else min(values, key=lambda v: v.value)
        outcomes.append(Outcome(rule, worst, failures))
    return outcomes


# -- the library entry point of `moeprof check` ----------------------------------------------------
@dataclass
class CheckResult:
    outcomes: list[Outcome]
    inputs: view.Inputs

    @property
    def failures(self) -> list[Failure]:
        return [f for o in self.outcomes for f in o.failures]

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "rules": [
                {
                    "rule": o.rule.label(), "metric": o.rule.metric, "origin": o.rule.origin,
                    "max": o.rule.max, "min": o.rule.min, "params": o.rule.params, "ok": o.ok,
                    "worst": None if o.worst is None else {"value": o.worst.value, "layer": o.worst.layer},
                }
                for o in self.outcomes
            ],
            "failures": [
                {"rule": f.rule.label(), "origin": f.rule.origin, "value": f.value, "limit": f.limit,
                 "side": f.side, "layer": f.layer, "message": f.message()}
                for f in self.failures
            ],
        }


def check(paths: list[Path], rules: list[Rule]) -> CheckResult:
    """Find the summary / placement among ``paths`` (analysing a trace if that is what was given) and
    check ``rules`` against it."""
    from moeprof.report.build import resolve_inputs

    if not rules:
        raise UsageError("no rules to check: give --rules FILE or a limit such as --max-imbalance 4")
    inputs = resolve_inputs(paths, figures=False)  # rules read numbers only
    return CheckResult(evaluate(rules, inputs), inputs)
