"""Check that two `moeprof analyze` outputs hold the same results, up to float rounding.

    moeprof analyze TRACE --out before/      # on the old code
    moeprof analyze TRACE --out after/       # on the new code
    python bench/same_analysis.py before/ after/

Compares summary.json (every key, every number to a relative 1e-9) and every table under tables/
(same columns, same rows in the same order). Keys that name the run (moeprof_version, outputs) are
left out. Exits 1 and lists the differences when the results differ. Against an output of a version
before ``--coactivation-tables`` (which wrote every co-activation row), write the new one with
``--coactivation-tables full``: the default ``top`` tables have other names.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Iterator

RTOL = 1e-9
SKIP = {"moeprof_version", "outputs"}


def differences(a: Any, b: Any, where: str = "") -> Iterator[str]:
    """Every place where ``a`` and ``b`` (JSON-like values) differ beyond float rounding."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k in SKIP:
                continue
            if k not in a or k not in b:
                yield f"{where}/{k}: only in {'second' if k in b else 'first'}"
            else:
                yield from differences(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            yield f"{where}: length {len(a)} != {len(b)}"
        else:
            for i, (x, y) in enumerate(zip(a, b)):
                yield from differences(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            if a is not b:
                yield f"{where}: {a!r} != {b!r}"
        elif math.isnan(a) or math.isnan(b):
            if not (math.isnan(a) and math.isnan(b)):
                yield f"{where}: {a!r} != {b!r}"
        elif not math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-12):
            yield f"{where}: {a!r} != {b!r}"
    elif a != b:
        yield f"{where}: {a!r} != {b!r}"


def load_output(path: Path) -> dict[str, Any]:
    import polars as pl

    out: dict[str, Any] = {"summary": json.loads((path / "summary.json").read_text())}
    out["tables"] = {p.stem: pl.read_parquet(p).to_dict(as_series=False) for p in sorted((path / "tables").glob("*.parquet"))}
    return out


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    first, second = (load_output(Path(p)) for p in sys.argv[1:])
    diff = list(differences(first, second))
    for line in diff[:50]:
        print(line)
    print(f"{len(diff)} difference(s)" if diff else "same results (summary.json and every table)")
    sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
