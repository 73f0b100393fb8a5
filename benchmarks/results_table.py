"""The table every benchmark prints: measurement, value, target, PASS/FAIL."""
from __future__ import annotations


def print_results(rows: list[tuple], heading: str) -> None:
    """``rows``: (measurement, value, target, ok) with ``ok`` None for an informational row."""
    print(f"\n{heading}\n")
    print("| measurement | value | target | result |\n|---|---|---|---|")
    for name, value, target, ok in rows:
        val = value if isinstance(value, str) else f"{value:.4g}"
        print(f"| {name} | {val} | {target} | {'' if ok is None else ('PASS' if ok else 'FAIL')} |")
