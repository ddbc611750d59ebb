"""The best skinny cut per shape and row count from ``gemv_sweep.py --skinny`` output, beside cuBLAS.

    python bench/gemv_sweep.py --config CONFIG --skinny > sweep.jsonl
    python bench/skinny_best.py sweep.jsonl

Prints, per (shape, rows): cuBLAS, the GEMV, the default skinny cut and the fastest invariant
cut with its tiles; then the sum over a layer's four shapes of cuBLAS's and the best cuts' times
(what a per-shape rule could reach before kernel boundaries), and the measured layer chains.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

LAYER = ("qkv", "o", "gate_up", "down")


def main() -> None:
    rows = []
    with open(sys.argv[1]) as f:
        for line in f:
            if line.startswith("{"):
                rows.append(json.loads(line))
    by_case: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        if "us" in r:
            by_case[(r["shape"], r["rows"])].append(r)
    sums: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    print(f"{'shape':<12}{'rows':>5}{'cublas':>9}{'gemv':>9}{'default':>9}{'best':>9}  best cut")
    for (shape, m), case in sorted(by_case.items()):
        named = {r["variant"]: r["us"] for r in case}
        if shape == "layer_chain":
            continue
        cuts = [r for r in case if r["variant"].startswith("skinny") and r.get("invariant")]
        best = min(cuts, key=lambda r: r["us"]) if cuts else None
        if shape in LAYER:
            sums[m]["cublas"] += named.get("cublas", float("nan"))
            sums[m]["default"] += named.get("skinny", float("nan"))
            sums[m]["best"] += best["us"] if best else float("nan")
        print(
            f"{shape:<12}{m:>5}{named.get('cublas', float('nan')):>9}"
            f"{named.get('gemv', float('nan')):>9}{named.get('skinny', float('nan')):>9}"
            f"{best['us'] if best else float('nan'):>9}  "
            f"{(best['variant'] + ' ' + best.get('tiles', '')) if best else '-'}"
        )
    print("\nper layer (sum of the four shapes, us):")
    for m, s in sorted(sums.items()):
        print(
            f"rows {m:>2}: cublas {s['cublas']:.1f}  skinny default {s['default']:.1f}  "
            f"best cuts {s['best']:.1f}"
        )
    print("\nlayer chains (16 layers, us per layer):")
    for r in rows:
        if r.get("shape") == "layer_chain" and "us" in r:
            print(f"rows {r['rows']:>2} {r['variant']:<10} {r['us']:.1f}")


if __name__ == "__main__":
    main()
