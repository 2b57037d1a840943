"""Turn the raw per-rank results of ``benchmarks/run.py`` into RESULTS.md, PNG plots and a summary."""

from __future__ import annotations

import copy
import json
import math
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks import models
from benchmarks.analytic import minimum, received_bytes

MiB = 2**20

TARGETS = {
    "comm": "communication within 1.10x of the analytical minimum for every method",
    "ulysses": "2-rank Ulysses speedup >= 1.7x on the 4,096-token shape (PixArt)",
    "peer": "at least as fast as diffusers' native context parallel on the same model and plan",
    "compile": "our passes add < 10% to inductor's compile time",
}


# ---------------------------------------------------------------------------------- collecting
def _merge(raw: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """key -> list of per-rank results (rank order), over every group and the peers."""
    merged: dict[str, list[dict[str, Any]]] = {}
    groups = list(raw["groups"].values())
    peers = raw.get("peers", {})
    if "results" in peers:
        groups.append(peers["results"])
    for per_rank in groups:
        for rank_results in per_rank:
            for res in rank_results:
                if "skipped" in res:
                    continue
                merged.setdefault(res["key"], []).append(res)
    return merged


def _method(name: str):
    from benchmarks.run import methods

    for m in methods(False) + methods(True):
        if m.name == name:
            return m
    return None


def _err(res: list[dict[str, Any]], base: list[dict[str, Any]] | None) -> float:
    if not res or not base:
        return float("nan")
    a, b = res[0].get("out"), base[0].get("out")
    if a is None or b is None or a.shape != b.shape:
        return float("nan")
    return float((a.float() - b.float()).abs().max() / max(b.float().abs().max(), 1e-12))


def _div(a: float, b: float) -> float:
    """a / b, NaN when b is 0 (os.times ticks at 10 ms: tiny --quick calls can read 0 CPU seconds)."""
    return a / b if b else float("nan")


def _f(x: float, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- sections
def analyse(raw: dict[str, Any], quick: bool) -> dict[str, Any]:
    merged = _merge(raw)
    shapes = {}
    for res in merged.values():
        for r in res:
            if "shape" in r:
                shapes[r["key"].split("|")[0]] = models.Shape(**r["shape"])
    # The 1-rank baseline ran twice (start and end of its process set): pool the timed calls.
    for key in [k for k in merged if "|1 rank (again)|" in k]:
        again = merged.pop(key)
        first = merged.get(key.replace(" (again)", ""))
        if first and not any("error" in r for r in first + again):
            times = first[0]["times"] + again[0]["times"]
            first[0]["median_s"] = statistics.median(times)
            first[0]["min_s"] = min(times)
            first[0]["times"] = times
            if "cpu_s" in first[0] and "cpu_s" in again[0]:
                first[0]["cpu_s"] = (first[0]["cpu_s"] + again[0]["cpu_s"]) / 2
    a: dict[str, Any] = {"comm": [], "speed": [], "peers": [], "compile": [], "memory": [], "errors": []}
    for key, res in merged.items():
        errs = [r["error"] for r in res if "error" in r]
        if errs:
            a["errors"].append((key, errs[0]))
    # 1. communication
    for key, res in merged.items():
        model, mname, inner = key.split("|")
        m = _method(mname)
        if m is None or inner != "eager" or model not in shapes or any("error" in r for r in res):
            continue
        mins = minimum(m, shapes[model])
        handed = max(sum(b for _, b, _ in r["records"]) for r in res)
        recv = max(sum(received_bytes(*rec) for rec in r["records"]) for r in res)
        calls: dict[str, int] = {}
        for kind, _, _ in res[0]["records"]:
            calls[kind] = calls.get(kind, 0) + 1
        a["comm"].append(dict(model=model, method=mname, world=m.world, handed=handed, min_handed=mins["handed"],
                              recv=recv, min_recv=mins["received"], calls=calls,
                              fallback="; ".join(f for r in res for f in r.get("fallbacks", [])[:1]) or ""))
    # 2. speed (+ 5. memory)
    for key, res in merged.items():
        model, mname, inner = key.split("|")
        if model not in shapes or any("error" in r for r in res) or "median_s" not in res[0]:
            continue
        base = merged.get(f"{model}|1 rank|{inner}")
        if not base or any("error" in r for r in base):
            continue
        t1 = base[0]["median_s"]
        tn = max(r["median_s"] for r in res)  # the slowest rank finishes the step
        world = res[0].get("world", len(res))
        speedup = _div(t1, tn)
        cpu1 = base[0].get("cpu_s", float("nan"))
        cpun = max(r.get("cpu_s", float("nan")) for r in res)
        cores = _div(sum(r.get("cpu_s", float("nan")) for r in res), tn)
        best = _div(base[0].get("min_s", t1), max(r.get("min_s", r["median_s"]) for r in res))
        row = dict(model=model, method=mname, inner=inner, world=world, t=tn, t1=t1, speedup=speedup, best=best,
                   eff=speedup / world, err=_err(res, base), cpu=cpun, cpu1=cpu1, cpu_speedup=_div(cpu1, cpun), cores=cores,
                   load=max(r.get("load", float("nan")) for r in res + base),
                   peer=not mname.startswith(("1 rank", "Ulysses", "Ring", "CFG", "USP")))
        (a["peers"] if row["peer"] else a["speed"]).append(row)
        mem = [r.get("memory") or {} for r in res]
        bmem = base[0].get("memory") or {}
        if mem and all("forward_mib" in x for x in mem) and "forward_mib" in bmem:
            a["memory"].append(dict(model=model, method=mname, inner=inner, world=world,
                                    fwd=max(x["forward_mib"] for x in mem), fwd1=bmem["forward_mib"],
                                    peak=max(x["peak_mib"] for x in mem), peak1=bmem["peak_mib"]))
    # 4. compile time: plain inductor (1 process) against xdit inductor (2 processes, per rank)
    for model in shapes:
        plain = merged.get(f"{model}|1 rank|inductor")
        ours = merged.get(f"{model}|Ulysses 2|inductor")
        if not plain or not ours or any("error" in r for r in plain + ours):
            continue
        c_plain = plain[0]["first_s"] - plain[0]["median_s"]
        c_ours = max(r["first_s"] - r["median_s"] for r in ours)
        passes = max(r["pass_seconds"] for r in ours)
        nan = float("nan")
        cpu_plain = plain[0].get("first_cpu_s", nan) - plain[0].get("cpu_s", nan)
        cpu_ours = max(r.get("first_cpu_s", nan) - r.get("cpu_s", nan) for r in ours)
        # Pass times are wall clock; scale them by the rank's CPU/wall ratio during its compile.
        # Pass times are wall clock; scale them by the share of a core the rank got in its steady calls.
        passes_cpu = passes * min(1.0, max(r.get("cpu_s", nan) / r["median_s"] for r in ours))
        a["compile"].append(dict(model=model, plain=c_plain, ours=c_ours, passes=passes, cpu_plain=cpu_plain,
                                 cpu_ours=cpu_ours, passes_cpu=passes_cpu, pass_pct_cpu=100 * _div(passes_cpu, cpu_plain),
                                 pass_pct=100 * passes / c_plain, overhead_pct=100 * (c_ours - c_plain) / c_plain,
                                 detail=ours[0].get("pass_detail", {})))
    # yunchang / attention layer
    att = merged.get("attention|Ulysses 2|eager")
    a["attention"] = att
    a["shapes"] = shapes
    a["device"] = next((r[0].get("device") for r in merged.values() if r and r[0].get("device")), "unknown")
    a["merged"] = merged
    return a


def _targets(a: dict[str, Any], quick: bool) -> list[tuple[str, str, str]]:
    out = []
    worst = max(a["comm"], key=lambda r: r["handed"] / max(r["min_handed"], 1), default=None)
    if worst:
        ratio = worst["handed"] / worst["min_handed"]
        out.append((TARGETS["comm"], "met" if ratio <= 1.10 else "NOT met",
                    f"worst {ratio:.3f}x ({worst['model']}, {worst['method']}, bytes handed)"))
    uly = [r for r in a["speed"] if r["model"] == "pixart" and r["method"] == "Ulysses 2"]
    for r in uly:
        out.append((TARGETS["ulysses"] + f" [inner {r['inner']}]", "met" if r["speedup"] >= 1.7 else "NOT met",
                    f"{r['speedup']:.2f}x ({r['t1']:.2f} s -> {r['t']:.2f} s)" + (" (quick shapes)" if quick else "")))
    cp = next((r for r in a["peers"] if r["method"] == "diffusers CP Ulysses 2"), None)
    ours = next((r for r in a["speed"] if r["model"] == "flux" and r["method"] == "Ulysses 2" and r["inner"] == "eager"), None)
    if cp and ours:
        out.append((TARGETS["peer"], "met" if ours["t"] <= cp["t"] else "NOT met",
                    f"Flux, Ulysses 2, eager: xdit {ours['t']:.3f} s vs diffusers {cp['t']:.3f} s per forward "
                    f"({cp['t'] / ours['t']:.2f}x)"))
    for c in a["compile"]:
        cpu = "" if math.isnan(c["pass_pct_cpu"]) else (
            f"; in CPU time ~{c['passes_cpu']:.2f} s = {c['pass_pct_cpu']:.1f}% of {c['cpu_plain']:.1f} s")
        out.append((TARGETS["compile"] + f" [{c['model']}]", "met" if c["pass_pct"] < 10 else "NOT met",
                    f"passes {c['passes']:.2f} s = {c['pass_pct']:.1f}% of plain inductor's {c['plain']:.1f} s (wall)"
                    f"{cpu}; whole xdit compile {c['ours']:.1f} s wall ({c['overhead_pct']:+.0f}%)"))
    return out


# ---------------------------------------------------------------------------------- plots
def _plots(a: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)

    def bar(name: str, rows: list[dict], label, value, ylabel: str, title: str, line: float | None = None) -> None:
        if not rows:
            return
        fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows) + 2), 4))
        ax.bar(range(len(rows)), [value(r) for r in rows], color="tab:blue")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([label(r) for r in rows], rotation=40, ha="right", fontsize=8)
        if line is not None:
            ax.axhline(line, color="tab:red", ls="--", lw=1)
        ax.set_ylabel(ylabel)
        ax.set_title(title + f"\n{a['device']}", fontsize=9)
        save(fig, name)

    bar("comm_ratio.png", a["comm"], lambda r: f"{r['model']}\n{r['method']}", lambda r: r["handed"] / max(r["min_handed"], 1),
        "measured / analytical minimum (bytes handed)", "Communication per rank per forward", 1.10)
    speed = a["speed"] + a["peers"]
    speed = [r for r in speed if r["method"] != "1 rank"]
    if speed:
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(speed) + 2), 4))
        xs = list(range(len(speed)))
        ax.bar([x - 0.2 for x in xs], [r["speedup"] for r in speed], 0.4, label="wall-clock speedup (median)")
        ax.bar([x + 0.2 for x in xs], [r.get("cpu_speedup", float("nan")) for r in speed], 0.4,
               label="work split (1-rank CPU s / per-rank CPU s)")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{r['model']} {r['method']}\n{r['inner']}, {r['world']} proc" for r in speed],
                           rotation=40, ha="right", fontsize=8)
        ax.axhline(1.7, color="tab:red", ls="--", lw=1)
        ax.set_ylabel("over 1 process x 1 thread")
        ax.set_title(f"Speedup (CPU ranks, gloo; shared machine, see RESULTS.md)\n{a['device']}", fontsize=9)
        ax.legend(fontsize=8)
        save(fig, "speedup.png")
    bar("memory.png", [r for r in a["memory"] if r["method"] != "1 rank"],
        lambda r: f"{r['model']} {r['method']}\n{r['inner']}, {r['world']} proc", lambda r: r["fwd"] / max(r["fwd1"], 1e-9),
        "forward peak per rank / 1 rank", "Forward memory per rank (peak above resident)", 1.0)
    if a["compile"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = range(len(a["compile"]))
        ax.bar([x - 0.25 for x in xs], [c["plain"] for c in a["compile"]], 0.25, label="plain inductor (1 proc)")
        ax.bar(list(xs), [c["ours"] for c in a["compile"]], 0.25, label="xdit + inductor (per rank, 2 proc)")
        ax.bar([x + 0.25 for x in xs], [c["passes"] for c in a["compile"]], 0.25, label="xdit passes alone")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([c["model"] for c in a["compile"]])
        ax.set_ylabel("seconds (cold)")
        ax.set_title(f"Compile time\n{a['device']}", fontsize=9)
        ax.legend(fontsize=8)
        save(fig, "compile_time.png")
    return files


# ---------------------------------------------------------------------------------- markdown
def write(raw: dict[str, Any], out: Path, quick: bool) -> str:
    a = analyse(copy.deepcopy(raw), quick)  # analyse pools baseline runs in place; keep raw as measured
    plots = _plots(a, out)
    targets = _targets(a, quick)
    L: list[str] = []
    L.append("# xdit_compile benchmarks" + (" (--quick: tiny shapes, NOT representative)" if quick else ""))
    L.append("")
    L.append(f"Generated by `python benchmarks/run.py{' --quick' if quick else ''}` on {raw['started']}, "
             f"{raw['wall_s']:.0f} s in all.")
    L.append(f"Device: **{a['device']}**; torch {torch.__version__}; Python {platform.python_version()}; "
             f"{'CUDA + nccl' if torch.cuda.is_available() else 'CPU ranks, gloo, 1 intra-op thread per process'}; "
             f"{_cpus()} CPU cores.")
    L.append(f"Load average before/after the run: {_load(raw['load_before'])} / {_load(raw['load_after'])}. "
             "This machine is shared: other processes may have been running during the measurements, "
             "so absolute times and speedups are noisy; communication bytes are exact."
             + ("" if not raw.get("capacity") else " Capacity probe (2 single-thread processes multiplying matrices "
                "for 2 s; CPU seconds they obtained / wall seconds): " + ", ".join(f"{w} {c:.2f} cores"
                                                                                  for w, c in raw["capacity"]) + "."))
    if raw.get("remeasured"):
        L.append("Re-measured later with `--merge` (replacing those process sets' rows; each set still has its own "
                 "1-rank baseline, measured in the same processes): " + "; ".join(f"`{x}`" for x in raw["remeasured"]) + ".")
    L.append("")
    L.append("Models (random weights from diffusers configs):")
    for name, s in a["shapes"].items():
        L.append(f"- `{name}`: {models.describe(name, s)}.")
    L.append("")
    L.append("## Targets")
    L.append(_table(["target", "status", "measured"], [[t, s, m] for t, s, m in targets]))
    L.append("")
    # 1
    L.append("## 1. Communication per rank per forward")
    L.append("Counted by `xdit_compile.runtime.record_collectives()` around the second call of the compiled model "
             "(inner compiler `eager`, so every collective call runs as Python and is intercepted; the plan is "
             "not consulted). The largest rank is shown. *Handed*: bytes of the buffers the rank hands to "
             "collectives (an all-to-all's whole send buffer, an all-gather's local shard, a ring pass's block). "
             "*Received*: what the rank must receive from the others (all-to-all b(n-1)/n, all-gather b(n-1), "
             "ring pass b). Minimum: see the formulas below (`benchmarks/analytic.py`).")
    L.append("")
    rows = []
    for r in a["comm"]:
        rows.append([r["model"], r["method"], r["world"], _f(r["handed"] / MiB, 3), _f(r["min_handed"] / MiB, 3),
                     f"**{_f(r['handed'] / max(r['min_handed'], 1), 3)}**", _f(r["recv"] / MiB, 3),
                     _f(r["min_recv"] / MiB, 3), _f(r["recv"] / max(r["min_recv"], 1), 3),
                     ", ".join(f"{k} x{v}" for k, v in sorted(r["calls"].items())), r["fallback"] or "-"])
    L.append(_table(["model", "method", "ranks", "handed MiB", "min MiB", "ratio", "received MiB", "min MiB",
                     "ratio", "calls", "fallback"], rows))
    L.append("")
    L.append(_FORMULAS)
    L.append("")
    over = [r for r in a["comm"] if r["handed"] / max(r["min_handed"], 1) > 1.10]
    if over:
        L.append("### Where the bytes above the minimum come from")
        L.append("The collectives the plan inserted (rank 0's plan report, `xdit_compile.reports()`), for every "
                 "method above 1.10x:")
        L.append("")
        for r in over:
            res = a["merged"].get(f"{r['model']}|{r['method']}|eager") or []
            text = res[0].get("report", "") if res else ""
            keep = [ln.strip() for ln in text.splitlines()
                    if ln.strip().startswith(("attention", "all_to_all", "all_gather", "ring", "shift", "sharded", "axis"))]
            L.append(f"- **{r['model']}, {r['method']}** ({r['handed'] / r['min_handed']:.3f}x, "
                     f"{(r['handed'] - r['min_handed']) / MiB:.2f} MiB above the minimum per rank per forward):")
            L.append("  ```")
            L.extend("  " + ln for ln in keep[:24])
            L.append("  ```")
        L.append("")
    peer_comm = [(k, r) for k, r in a["merged"].items() if r and ("CP" in k or "para-attn" in k)]
    if peer_comm:
        L.append("Peers' collectives, for comparison (counted by a `TorchDispatchMode` on c10d / functional "
                 "collective ops; our compiled graphs cannot be counted that way, so xdit's column comes from "
                 "`record_collectives()`): bytes handed per rank per forward.")
        L.append("")
        prow = []
        for k, res in peer_comm:
            if any("error" in r for r in res):
                continue
            handed = max(sum(b for _, b, _ in r["records"]) for r in res)
            model, mname, _ = k.split("|")
            ours = next((c for c in a["comm"] if c["model"] == model and c["method"] == "Ulysses 2"), None)
            calls: dict[str, int] = {}
            for kind, _, _ in res[0]["records"]:
                calls[kind] = calls.get(kind, 0) + 1
            prow.append([model, mname, _f(handed / MiB, 3),
                         _f(handed / ours["min_handed"], 3) if ours else "n/a",
                         _f(ours["handed"] / MiB, 3) if ours else "n/a",
                         _f(ours["handed"] / ours["min_handed"], 3) if ours else "n/a",
                         ", ".join(f"{k} x{v}" for k, v in sorted(calls.items()))])
        L.append(_table(["model", "peer", "peer handed MiB", "peer / min", "xdit Ulysses 2 handed MiB", "xdit / min",
                         "peer calls"], prow))
        L.append("")
    # 2
    L.append("## 2. Speed: 1 process x 1 thread against N processes x 1 thread")
    L.append("Median of the timed calls after the compiling call (the slowest rank counts). Speedup = 1-rank time / "
             "N-rank time; efficiency = speedup / N. The 1-rank baseline runs the same model and inputs (batch 2) "
             "in one process: plain eager (`inner=eager` rows) or plain `torch.compile` inductor (`inductor` rows). "
             "Max rel err: max |out - out_1rank| / max |out_1rank|. "
             + ("**4 processes share 2 cores here: their efficiency is bounded by 50%.** "
                if _cpus() < 4 and any(r["world"] == 4 for r in a["speed"]) else "")
             + "Inner `inductor` is measured for the 2-rank Ulysses plan on the models named by `--inductor` "
             "(default: flux; each cold compile takes ~1 min on this machine, PixArt's first inductor run more).")
    L.append("")
    L.append("")
    L.append("*CPU s* is the median CPU time one rank spends per forward (`os.times`, the busiest rank): "
             "unlike wall time it barely moves when other processes share the cores, so *work split* = 1-rank CPU s / "
             "N-rank CPU s shows how evenly the plan divides the work (including the time spent inside collectives). "
             "*cores used* = the ranks' CPU seconds added up / wall seconds: how much of the machine the "
             "configuration actually got (2.00 would be both cores; when other processes hold a core, N processes "
             "share what is left and the wall-clock speedup cannot exceed it). "
             "*load* is the highest 1-minute load average seen when the configuration or its baseline ran. "
             "*best-of speedup* compares the fastest calls instead of the medians.")
    L.append("")
    rows = [[r["model"], r["method"], r["inner"], r["world"], _f(r["t"], 3), _f(r["t1"], 3),
             f"**{_f(r['speedup'])}x**", f"{_f(100 * r['eff'], 0)}%", _f(r["best"]) + "x", _f(r["cpu"], 3),
             _f(r["cpu_speedup"]) + "x", _f(r["cores"]), _f(r["load"], 1), _f(r["err"], 6)]
            for r in sorted(a["speed"], key=lambda r: (r["model"], r["inner"], r["world"]))]
    L.append(_table(["model", "method", "inner", "processes", "s / forward", "1 rank s", "speedup", "efficiency",
                     "best-of speedup", "CPU s / rank", "work split", "cores used", "load", "max rel err"], rows))
    L.append("")
    # 3
    L.append("## 3. Peers, same machine, same models, same run")
    L.append(_peers_text(raw, a))
    L.append("")
    rows = []
    for r in a["peers"]:
        ours = next((s for s in a["speed"] if s["model"] == r["model"] and s["method"] == "Ulysses 2"
                     and s["inner"] == "eager"), None)
        rows.append([r["model"], r["method"], r["world"], _f(r["t"], 3), _f(r["speedup"]) + "x",
                     _f(ours["t"], 3) if ours else "n/a", (_f(r["t"] / ours["t"]) + "x") if ours else "n/a",
                     _f(r["err"], 6)])
    L.append(_table(["model", "peer", "processes", "peer s / forward", "peer speedup", "xdit Ulysses 2 (eager) s",
                     "peer time / xdit time", "max rel err"], rows))
    L.append("")
    for key, err in a["errors"]:
        if "CP" in key or "para-attn" in key:
            L.append(f"- `{key}`: not available: `{err[:300]}`")
    att = a.get("attention")
    if att:
        L.append("")
        L.append(_attention_text(att))
    L.append("")
    # 4
    L.append("## 4. Compile time (cold: fresh inductor cache, FX graph cache off, 1 compile thread)")
    L.append("Compile time = first call - median steady call. Plain inductor: `torch.compile(model)` in 1 process. "
             "xdit: `backend=\"xdit\"`, Ulysses 2, inner inductor, 2 processes compiling at once (one core each), the "
             "slower rank. Passes: the sum of `PlanReport.pass_seconds` (plan, lower, refresh, ...), largest rank.")
    L.append("")
    rows = [[c["model"], _f(c["plain"], 1), _f(c["ours"], 1), _f(c["passes"], 2), f"**{_f(c['pass_pct'], 1)}%**",
             f"{c['overhead_pct']:+.0f}%", _f(c["cpu_plain"], 1), _f(c["cpu_ours"], 1), _f(c["passes_cpu"], 2),
             f"**{_f(c['pass_pct_cpu'], 1)}%**", ", ".join(f"{k} {v:.2f}" for k, v in c["detail"].items())]
            for c in a["compile"]]
    L.append(_table(["model", "plain inductor s", "xdit s (per rank)", "passes s", "passes / plain", "xdit vs plain",
                     "plain CPU s", "xdit CPU s", "passes CPU s (est.)", "passes CPU / plain CPU",
                     "pass detail (wall s, rank 0)"], rows))
    L.append("")
    L.append("Wall seconds suffer from the sharing described in section 2 (two compiling ranks got about one core "
             "between them); the CPU columns are CPU seconds of the compiling call minus a steady call (`os.times`, "
             "including the C++ compiler processes inductor runs), and the passes' CPU seconds are estimated as their "
             "wall seconds x the share of a core the rank got in its steady calls (CPU s / wall s).")
    L.append("")
    # 5
    L.append("## 5. Memory per rank")
    L.append("Forward peak = peak resident memory during one steady forward minus the resident memory just before it "
             "(glibc `malloc_trim(0)`, then `/proc/self/clear_refs` = 5 resets the kernel's high-water mark, then VmHWM "
             "after the call): activations, communication buffers and workspace. Parameters, compiled code and the "
             "Python runtime are resident before and counted in *resident*. On CUDA: `torch.cuda.max_memory_allocated`. "
             "The largest rank is shown.")
    L.append("")
    rows = [[m["model"], m["method"], m["inner"], m["world"], _f(m["fwd"], 1), _f(m["fwd1"], 1),
             _f(m["fwd"] / max(m["fwd1"], 1e-9), 2), _f(m["peak"], 0), _f(m["peak1"], 0)]
            for m in sorted(a["memory"], key=lambda m: (m["model"], m["inner"], m["world"]))]
    L.append(_table(["model", "method", "inner", "processes", "forward peak MiB / rank", "1 rank MiB", "ratio",
                     "resident+forward MiB / rank", "1 rank"], rows))
    L.append("")
    # 6
    L.append("## 6. GPU")
    if torch.cuda.is_available():
        L.append(f"Measured on {torch.cuda.get_device_name()} with nccl.")
    else:
        L.append("No GPU in this run. On a machine with >= 2 CUDA devices the same command uses nccl, puts rank r on "
                 "`cuda:r`, synchronises around timings, measures memory with `torch.cuda.max_memory_allocated`, and "
                 "xdit's attention uses flash-attn when it is installed (`pip install flash-attn`); the device is "
                 "named at the top of this file. Not yet run on a GPU.")
    L.append("")
    if a["errors"]:
        L.append("## Errors")
        for key, err in a["errors"]:
            L.append(f"- `{key}`: `{err[:400]}`")
        L.append("")
    if plots:
        L.append("## Plots")
        for p in plots:
            L.append(f"![{p}]({p})")
        L.append("")
    (out / "RESULTS.md").write_text("\n".join(L))
    torch.save(raw, out / "results.pt")
    (out / "summary.json").write_text(json.dumps(_json(a, targets, raw), indent=1))
    return _summary(a, targets)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _load(x: Any) -> str:
    return "/".join(f"{v:.1f}" for v in x)


def _peers_text(raw: dict[str, Any], a: dict[str, Any]) -> str:
    peers = raw.get("peers", {})
    lines = []
    if "versions" in peers:
        lines.append("Peers ran in `benchmarks/.venv-peers` (" + ", ".join(f"{k} {v}" for k, v in peers["versions"].items())
                     + "), through the same harness and timing loop, on 2 processes.")
        if peers.get("measured_separately"):
            lines.append(f"(para-attn and yunchang were measured on {peers['measured_separately']}, after the rest of "
                         "the run, with `--peers-only`: their venv had been removed from disk during the run.)")
    elif "absent" in peers:
        lines.append(f"para-attn and yunchang: skipped: {peers['absent']}.")
    elif "failed" in peers:
        lines.append(f"para-attn and yunchang: the peers run failed: `{peers['failed'][-500:]}`")
    lines.append("- diffusers' native context parallel (`ContextParallelConfig`, `model.enable_parallelism`) runs in the "
                 "main environment (it is part of diffusers 0.42.1) on Flux, the model here that ships a `_cp_plan` "
                 "(PixArt and CogVideoX have none). On CPU it computes `rank % torch.accelerator.device_count()`, "
                 "which is 0 without an accelerator (ZeroDivisionError); the benchmark process patches "
                 "`torch.accelerator.device_count` to return 1 (in the benchmark processes only). Its Ring needs an "
                 "attention backend that returns the log-sum-exp, which only CUDA backends provide: recorded as "
                 "not available on CPU (error below).")
    lines.append("- para-attn 0.3.38: `parallelize_transformer` from its diffusers adapter with an "
                 "`init_context_parallel_mesh(max_ulysses_dim_size=2)` mesh (Ulysses).")
    lines.append("- yunchang 0.6.4 ships attention layers, not model integrations: compared on one attention layer below.")
    lines.append("- xfuser 0.7.0: not measured: it does not import without an accelerator (it first requires triton, "
                 "then fails with \"No Accelerators available\"); see shared/FACTS.md. Not installed here.")
    return "\n".join(lines)


def _attention_text(att: list[dict[str, Any]]) -> str:
    r0 = att[0]
    if "error" in r0:
        return f"Attention layer comparison failed: `{r0['error'][:300]}`"
    rows = []
    single = r0.get("single")
    for name in ("single", "xdit", "yunchang"):
        t = max((r.get(name) for r in att if r.get(name) is not None), default=None)
        if t is None:
            rows.append([name, "n/a", "n/a", "n/a", r0["errors"].get(name, "")[:200]])
            continue
        err = r0.get("max_err", {}).get(name)
        rows.append([name, "1" if name == "single" else str(r0["world"]), _f(t * 1e3, 1),
                     _f(single / t) + "x" if single else "n/a", _f(err, 6) if err is not None else "-"])
    return ("One self-attention layer at PixArt-alpha 1024px shape (q, k, v: batch 2 x 16 heads x 4,096 tokens x 72; "
            "quick: tiny), median of timed calls: `single` = `F.scaled_dot_product_attention` on one process; `xdit` = "
            "`xdit_compile.runtime.ulysses_attention` (what the backend inserts: one all-to-all for stacked q/k/v, one "
            "for the output); `yunchang` = `yunchang.UlyssesAttention` (three all-to-alls in, one out) with its "
            "kernel set to the same SDPA call (its TORCH_FLASH/EFFICIENT kernels are CUDA-only ops and TORCH_MATH forces "
            "the slower math backend). Ranks hold the same sequence shards.\n\n"
            + _table(["attention", "processes", "ms", "speedup", "max abs err vs single"], rows))


_FORMULAS = """Analytical minimum per rank per forward (`benchmarks/analytic.py`; B batch, G cfg degree, N = U x R
sequence ranks, S tokens in self/joint attention (image, plus text for joint models, sharded with it), C hidden,
L self/joint attention layers, S_img image tokens, O output values per image token, e = 4 bytes;
b = (B/G)(S/N)C e is one local q/k/v/out shard and o = (B/G)(S_img/N)O e the local output shard):

| method | handed | received |
|---|---|---|
| Ulysses U | 4 L b + o | 4 L b (U-1)/U + o (U-1) |
| Ring R | 2 L b (R-1) + o | 2 L b (R-1) + o (R-1) |
| USP U x R | 4 L b + 2 L b (R-1) + o | 4 L b (U-1)/U + 2 L b (R-1) + o (N-1) |
| CFG G | (B/G) S_img O e | (G-1) (B/G) S_img O e |
| CFG G x Ulysses U | 4 L b + o | 4 L b (U-1)/U + o (G U - 1) |

Ulysses moves q, k, v and the attention output through all-to-alls (xDiT's cost table); cross-attention
against replicated text needs no communication; the output is gathered once over every rank holding a piece.
Ring passes the local K and V blocks R-1 times. In USP the ring runs after the Ulysses all-to-all, on blocks
of S/R tokens x C/U channels, i.e. the same b. A plan that kept text replicated in joint attention could move
fewer bytes but would compute the text stream on every rank; the minimum here assumes the text is sharded
like the image (as xDiT does)."""


def _summary(a: dict[str, Any], targets: list[tuple[str, str, str]]) -> str:
    lines = ["", "=== xdit_compile benchmark summary ===", f"device: {a['device']}"]
    for r in a["comm"]:
        lines.append(f"comm  {r['model']:<8} {r['method']:<18} measured/min = {r['handed'] / max(r['min_handed'], 1):.3f} "
                     f"({r['handed'] / MiB:.2f} MiB handed per rank)")
    for r in sorted(a["speed"] + a["peers"], key=lambda r: (r["model"], r["inner"], r["world"])):
        lines.append(f"speed {r['model']:<8} {r['method']:<24} {r['inner']:<8} {r['world']} proc  {r['t']:.3f} s  "
                     f"speedup {r['speedup']:.2f}x  eff {100 * r['eff']:.0f}%")
    for c in a["compile"]:
        lines.append(f"compile {c['model']}: plain inductor {c['plain']:.1f} s, xdit {c['ours']:.1f} s, passes "
                     f"{c['passes']:.2f} s ({c['pass_pct']:.1f}%)")
    for t, s, m in targets:
        lines.append(f"target: {s:<8} {t}: {m}")
    for key, err in a["errors"]:
        lines.append(f"error {key}: {err[:200]}")
    return "\n".join(lines)


def _json(a: dict[str, Any], targets: list[tuple[str, str, str]], raw: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers, machine-readable (the smoke test reads this)."""
    return {
        "device": a["device"], "quick": raw["quick"], "wall_s": raw["wall_s"],
        "comm": [{"model": r["model"], "method": r["method"], "ratio": r["handed"] / max(r["min_handed"], 1),
                  "received_ratio": r["recv"] / max(r["min_recv"], 1), "handed_bytes": r["handed"]} for r in a["comm"]],
        "speed": [{k: r[k] for k in ("model", "method", "inner", "world", "t", "t1", "speedup", "eff", "err",
                                     "cpu_speedup", "load")}
                  for r in a["speed"] + a["peers"]],
        "compile": [{k: c[k] for k in ("model", "plain", "ours", "passes", "pass_pct")} for c in a["compile"]],
        "targets": [{"target": t, "status": s, "measured": m} for t, s, m in targets],
        "errors": [{"key": k, "error": e[:300]} for k, e in a["errors"]],
    }
