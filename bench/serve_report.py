"""Statistics, tables and plots of `splitserve bench serve` (the definitions of `vllm bench serve`).

    TTFT   send -> first content chunk
    TPOT   (latency - TTFT) / (output tokens - 1), per request (0 for a one-token reply)
    ITL    every gap between successive content chunks, pooled over all requests
    E2EL   send -> end of stream
    goodput  requests/s that met every SLO given (TTFT <= --ttft-slo-ms and TPOT <= --tpot-slo-ms)

`slo_grid_table` recomputes goodput from the kept per-request records for several TPOT targets at once (the
"SLO scale" view of DistServe): for each target, the rate at which the baseline config's p99 TPOT first breaks
it, and every config's goodput there as a multiple of the baseline's. `capacity_table` gives DistServe's own
figure of merit for the same targets: the highest rate a config sustains with at least 90% of its requests
meeting both targets, interpolated linearly between the two swept rates around the 90% crossing.

Throughputs divide by the run's wall time (first send to last byte). Failed requests count in `failed` and
their first distinct errors are kept; they are in no latency and no throughput.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from .serve_load import RequestResult

PERCENTILES = (50, 90, 99)


def latency_stats(seconds: list[float]) -> dict:
    """mean and percentiles, in milliseconds (NaN when there is no sample)."""
    if not seconds:
        return {"mean": math.nan, **{f"p{p}": math.nan for p in PERCENTILES}}
    ms = np.asarray(seconds, dtype=float) * 1000.0
    return {"mean": float(ms.mean()), **{f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES}}


def tpot(r: RequestResult) -> float:
    return (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0


def meets_slo(r: RequestResult, ttft_slo_ms: float | None, tpot_slo_ms: float | None) -> bool:
    return (r.ok and (ttft_slo_ms is None or r.ttft * 1000 <= ttft_slo_ms)
            and (tpot_slo_ms is None or tpot(r) * 1000 <= tpot_slo_ms))


def summarize(results: list[RequestResult], duration: float, ttft_slo_ms: float | None = None,
              tpot_slo_ms: float | None = None) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    duration = max(duration, 1e-9)
    has_slo = ttft_slo_ms is not None or tpot_slo_ms is not None
    good = sum(meets_slo(r, ttft_slo_ms, tpot_slo_ms) for r in ok)
    errors = Counter(r.error for r in results if not r.ok)
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "mean_input_tokens": in_tokens / len(ok) if ok else math.nan,
        "mean_output_tokens": out_tokens / len(ok) if ok else math.nan,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": latency_stats([r.ttft for r in ok]),
        "tpot_ms": latency_stats([tpot(r) for r in ok if r.output_tokens > 1]),
        "itl_ms": latency_stats([gap for r in ok for gap in r.itl]),
        "e2el_ms": latency_stats([r.latency for r in ok]),
        "ttft_slo_ms": ttft_slo_ms, "tpot_slo_ms": tpot_slo_ms,
        "goodput": good / duration if has_slo else None,
        "slo_attainment": good / len(results) if has_slo and results else None,
        "errors": [{"count": n, "error": e} for e, n in errors.most_common(5)],
        "requests": [{"ok": r.ok, "start_s": r.start, "prompt_tokens": r.prompt_tokens,
                      "output_tokens": r.output_tokens, "ttft_ms": r.ttft * 1000, "tpot_ms": tpot(r) * 1000,
                      "e2el_ms": r.latency * 1000} for r in results],
    }


def _num_good(s: dict, ttft_slo_ms: float | None, tpot_slo_ms: float | None) -> int:
    return sum(r["ok"] and (ttft_slo_ms is None or r["ttft_ms"] <= ttft_slo_ms)
               and (tpot_slo_ms is None or r["tpot_ms"] <= tpot_slo_ms) for r in s["requests"])


def goodput_at(s: dict, ttft_slo_ms: float | None, tpot_slo_ms: float | None) -> float:
    """A summarized run's goodput (req/s) for other targets, from its per-request records."""
    return _num_good(s, ttft_slo_ms, tpot_slo_ms) / s["duration_s"]


def attainment_at(s: dict, ttft_slo_ms: float | None, tpot_slo_ms: float | None) -> float:
    """The fraction of a run's requests (failed ones included) that met both targets."""
    return _num_good(s, ttft_slo_ms, tpot_slo_ms) / max(1, len(s["requests"]))


def sustained_rate(points: list[tuple[float, float]], attainment: float = 0.9) -> tuple[float | None, str]:
    """[(rate, attainment)] sorted by rate -> (the rate where attainment first falls below `attainment`,
    interpolated, or the last rate if it never does; None if the first rate already misses it) and a note."""
    for i, (rate, att) in enumerate(points):
        if att < attainment:
            if i == 0:
                return None, f"< {rate:g}"
            r0, a0 = points[i - 1]
            x = r0 + (rate - r0) * (a0 - attainment) / (a0 - att)
            return x, f"{x:.2f}"
    return points[-1][0], f">= {points[-1][0]:g}"


def capacity_table(runs: list[dict], ttft_slo_ms: float | None, tpot_slos: list[float], baseline: str,
                   attainment: float = 0.9) -> str:
    """One row per TPOT target: each config's highest sustained rate (>= `attainment` of requests meeting both
    targets) and its multiple of the baseline's; '<'/'>=' mark a rate outside the swept range."""
    labels = list(dict.fromkeys(r["label"] for r in runs))
    head = ["TPOT target (ms)"] + [f"{label}: req/s at >= {attainment:.0%} met" + (
        "" if label == baseline else f", x {baseline}") for label in labels]
    rows = [head, ["---"] * len(head)]
    for slo in tpot_slos:
        got = {}
        for label in labels:
            mine = sorted((r for r in runs if r["label"] == label and not math.isinf(r["rate"])),
                          key=lambda r: r["rate"])
            got[label] = sustained_rate([(r["rate"], attainment_at(r["summary"], ttft_slo_ms, slo)) for r in mine],
                                        attainment) if mine else (None, "-")
        base = got[baseline][0]
        cells = []
        for label in labels:
            rate, text = got[label]
            exact = not text.startswith(("<", ">")) and not got[baseline][1].startswith(("<", ">"))
            if label != baseline and exact:        # a bound (outside the swept rates) has no ratio
                text += f", {rate / base:.2f}x"
            cells.append(text)
        rows.append([f"{slo:g}"] + cells)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _p99_tpot(s: dict) -> float:
    tpots = [r["tpot_ms"] for r in s["requests"] if r["ok"] and r["output_tokens"] > 1]
    return float(np.percentile(tpots, 99)) if tpots else math.nan


def slo_grid_table(runs: list[dict], ttft_slo_ms: float | None, tpot_slos: list[float], baseline: str) -> str:
    """One row per TPOT target: the lowest swept rate at which `baseline`'s p99 TPOT breaks it, and at that rate
    every config's p99 TPOT and goodput (TTFT target `ttft_slo_ms` as well), with its multiple of the baseline's."""
    labels = list(dict.fromkeys(r["label"] for r in runs))
    if baseline not in labels:
        raise ValueError(f"--baseline {baseline!r} is not one of the configs run ({', '.join(labels)})")
    by = {(r["label"], r["rate"]): r["summary"] for r in runs}
    rates = sorted({r["rate"] for r in runs if r["label"] == baseline})
    head = ["TPOT target (ms)", f"{baseline} breaks at (req/s)"] + [
        f"{label}: p99 TPOT (ms), goodput (req/s)" + ("" if label == baseline else f", x {baseline}")
        for label in labels]
    rows = [head, ["---"] * len(head)]
    for slo in tpot_slos:
        broke = next((rate for rate in rates if _p99_tpot(by[(baseline, rate)]) > slo), None)
        if broke is None:
            rows.append([f"{slo:g}", "never (in the swept rates)"] + ["-"] * len(labels))
            continue
        base = goodput_at(by[(baseline, broke)], ttft_slo_ms, slo)
        cells = []
        for label in labels:
            s = by.get((label, broke))
            if s is None:
                cells.append("not run")
                continue
            g = goodput_at(s, ttft_slo_ms, slo)
            ratio = "" if label == baseline else (f", {g / base:.2f}x" if base > 0 else ", inf")
            cells.append(f"{_p99_tpot(s):.0f}, {g:.3f}{ratio}")
        rows.append([f"{slo:g}", f"{broke:g}"] + cells)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _num(x, fmt: str = "{:.1f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return fmt.format(x)


def format_run(s: dict) -> str:
    """One run in the layout of `vllm bench serve`."""
    lines = [f"{'Successful requests:':<40}{s['completed']:>12}", f"{'Failed requests:':<40}{s['failed']:>12}",
             f"{'Benchmark duration (s):':<40}{s['duration_s']:>12.2f}",
             f"{'Total input tokens:':<40}{s['total_input_tokens']:>12}",
             f"{'Total generated tokens:':<40}{s['total_output_tokens']:>12}",
             f"{'Request throughput (req/s):':<40}{s['request_throughput']:>12.3f}",
             f"{'Output token throughput (tok/s):':<40}{s['output_throughput']:>12.2f}",
             f"{'Total token throughput (tok/s):':<40}{s['total_token_throughput']:>12.2f}"]
    if s["goodput"] is not None:
        slo = ", ".join(f"{k} <= {s[k + '_slo_ms']:g} ms" for k in ("ttft", "tpot") if s[k + "_slo_ms"] is not None)
        lines.append(f"{'Goodput (req/s):':<40}{s['goodput']:>12.3f}   ({slo}; "
                     f"{100 * s['slo_attainment']:.0f}% of requests)")
    for key, name in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                      ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        short = key.split("_")[0].upper()
        lines.append(f"{'-' * 16}{name}{'-' * max(0, 36 - len(name))}")
        lines += [f"{label + ' ' + short + ' (ms):':<40}{_num(s[key][stat], '{:.2f}'):>12}"
                  for stat, label in (("mean", "Mean"), ("p50", "P50"), ("p90", "P90"), ("p99", "P99"))]
    for e in s["errors"]:
        lines.append(f"error x{e['count']}: {e['error']}")
    return "\n".join(lines)


TABLE_COLUMNS = ("config", "rate (req/s)", "ok/failed", "req/s", "out tok/s", "goodput (req/s)", "SLO met",
                 "TTFT p50/p99 (ms)", "TPOT mean/p99 (ms)", "ITL p99 (ms)", "E2E p50/p99 (ms)")


def table_row(label: str, rate: float, s: dict) -> list[str]:
    slo_met = "-" if s["slo_attainment"] is None else f"{100 * s['slo_attainment']:.0f}%"
    return [label, "inf" if math.isinf(rate) else f"{rate:g}", f"{s['completed']}/{s['failed']}",
            f"{s['request_throughput']:.3f}", f"{s['output_throughput']:.1f}", _num(s["goodput"], "{:.3f}"), slo_met,
            f"{_num(s['ttft_ms']['p50'], '{:.0f}')} / {_num(s['ttft_ms']['p99'], '{:.0f}')}",
            f"{_num(s['tpot_ms']['mean'], '{:.0f}')} / {_num(s['tpot_ms']['p99'], '{:.0f}')}",
            _num(s["itl_ms"]["p99"], "{:.0f}"),
            f"{_num(s['e2el_ms']['p50'], '{:.0f}')} / {_num(s['e2el_ms']['p99'], '{:.0f}')}"]


def markdown_table(runs: list[dict]) -> str:
    """`runs`: [{"label", "rate", "summary"}] -> a markdown table, one row per (config, rate)."""
    rows = [TABLE_COLUMNS, ["---"] * len(TABLE_COLUMNS)]
    rows += [table_row(r["label"], r["rate"], r["summary"]) for r in runs]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def plot(runs: list[dict], path: Path, title: str = "", styles: dict[str, dict] | None = None) -> Path:
    """Goodput and p99 TPOT against request rate, one line per config (runs at rate inf are left out);
    `styles` maps a label to matplotlib line options (colour, linestyle, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_good, ax_tpot) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = list(dict.fromkeys(r["label"] for r in runs))
    slo = next((r["summary"]["tpot_slo_ms"] for r in runs if r["summary"]["tpot_slo_ms"] is not None), None)
    for label in labels:
        mine = sorted((r for r in runs if r["label"] == label and not math.isinf(r["rate"])), key=lambda r: r["rate"])
        rates, style = [r["rate"] for r in mine], {"marker": "o", **(styles or {}).get(label, {})}
        ax_good.plot(rates, [r["summary"]["goodput"] or 0.0 for r in mine], label=label, **style)
        ax_tpot.plot(rates, [r["summary"]["tpot_ms"]["p99"] for r in mine], label=label, **style)
    if rates_all := [r["rate"] for r in runs if not math.isinf(r["rate"])]:
        ax_good.plot([0, max(rates_all)], [0, max(rates_all)], color="grey", linestyle=":", linewidth=1,
                     label="nominal offered rate")
    if slo is not None:
        ax_tpot.axhline(slo, color="red", linestyle="--", linewidth=1, label=f"TPOT target {slo:g} ms")
    ax_good.set(xlabel="request rate (req/s)", ylabel="goodput (req/s)", title="goodput (TTFT and TPOT met)")
    ax_tpot.set(xlabel="request rate (req/s)", ylabel="p99 TPOT (ms)", title="p99 time per output token")
    for ax in (ax_good, ax_tpot):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
