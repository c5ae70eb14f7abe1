"""The run's figures, drawn from what it logged (metrics.jsonl, timeline.jsonl): one PNG per question.

    reward.png       is it learning?               reward mean per step, ±1 std across the step's samples; per
                                                   data source (data.sources) and held-out evaluations when logged
    staleness.png    how off-policy are samples?   per-sample staleness histogram (the bound k marked), per step
    offpolicy.png    is the signal healthy?        ESS / samples per step, and the effective learning rate
    throughput.png   how fast, and who waits?      samples/s, the trainer's seconds per step: training vs waiting
    sync.png         what do weights cost?         bytes sent per version against dense, and the changed fraction
    utilization.png  which role is the bottleneck? each replica's time by activity (generate, score, train, ...)
    overview.png     the six above on one page, with the capacity advice

Each ``draw_*`` draws into a matplotlib Axes. The overview tiles the single figures' PNGs. Only
the object-oriented API is used (``Figure`` with the Agg canvas, never pyplot): it keeps no global
state, so figures can be drawn on a background thread while a run goes on (``flow/observe/tracking.py``).
Restarts and rewinds of the run are drawn as dotted vertical lines where the step axis allows.
"""

from __future__ import annotations

import logging
from pathlib import Path

logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache notice is not the run's business

COLORS = {"generate": "#4C72B0", "score": "#55A868", "train": "#C44E52", "all-reduce": "#8172B2",
          "sync": "#CCB974", "checkpoint": "#64B5CD", "wait": "#BBBBBB", "other": "#EEEEEE"}
SMOOTH = 10  # steps in the rolling means drawn over noisy per-step series


def series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a metrics key, skipping steps without a finite value."""
    pairs = [(m["step"], m[key]) for m in metrics if isinstance(m.get(key), (int, float)) and m[key] == m[key]]
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def rolling(values: list[float], n: int = SMOOTH) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - n] if i >= n else 0.0)
        out.append(total / min(i + 1, n))
    return out


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes, color="gray")


def _marks(ax, events: list[tuple[int, str]]) -> None:
    for step, label in events:
        ax.axvline(step, color="#444444", linestyle=":", linewidth=1)
        ax.annotate(label, (step, 1.0), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                    va="top", ha="right", color="#444444")


# ---------------------------------------------------------------------------------------------- panels
def draw_reward(ax, metrics: list[dict], events=(), evals=()) -> None:
    """The training reward per step; with ``evals`` (eval.jsonl: periodic evaluation on held-out prompts)
    their mean reward with its 95% interval, and pass@1, at the steps evaluated."""
    steps, mean = series(metrics, "reward/mean")
    if not steps:
        return _empty(ax, "reward")
    std = dict(zip(*series(metrics, "reward/std")))
    lo = [m - std.get(s, 0.0) for s, m in zip(steps, mean)]
    hi = [m + std.get(s, 0.0) for s, m in zip(steps, mean)]
    ax.fill_between(steps, lo, hi, color="#4C72B0", alpha=0.15, linewidth=0, label="±1 std across samples")
    ax.plot(steps, mean, color="#4C72B0", alpha=0.45, linewidth=0.8, label="mean per step")
    ax.plot(steps, rolling(mean), color="#1F3F7A", linewidth=2, label=f"mean, rolling {SMOOTH} steps")
    sources = sorted({k.split("/")[1] for m in metrics for k in m if k.startswith("source/") and k.endswith("/reward_mean")})
    for name in sources:  # a mixture (data.sources): each source's rolling mean
        at, values = series(metrics, f"source/{name}/reward_mean")
        ax.plot(at, rolling(values), linewidth=1.2, linestyle="-.", label=f"source {name}, rolling {SMOOTH} steps")
    held = [e for e in evals if e.get("eval/reward/mean") is not None]
    if held:
        ax.errorbar([e["step"] for e in held], [e["eval/reward/mean"] for e in held],
                    yerr=[e.get("eval/reward/mean_ci95") or 0.0 for e in held], color="#C44E52", marker="o",
                    markersize=4, linewidth=1.2, capsize=3, label="held-out eval: mean reward, 95% interval")
        ax.plot([e["step"] for e in held], [e.get("eval/pass@1", float("nan")) for e in held], color="#DD8452",
                marker="s", markersize=3, linestyle="--", linewidth=1, label="held-out eval: pass@1")
    ax.set(title="Reward", xlabel="step", ylabel="reward")
    ax.legend(loc="lower right", fontsize=7)
    _marks(ax, events)


def draw_staleness_hist(ax, metrics: list[dict], bound: int | None) -> None:
    counts: list[int] = []
    for m in metrics:
        for k, n in enumerate(m.get("staleness/counts") or []):
            counts += [0] * (k + 1 - len(counts))
            counts[k] += n
    if not counts:  # older runs logged only max and mean
        return _empty(ax, "per-sample staleness")
    total = sum(counts)
    bars = ax.bar(range(len(counts)), counts, color="#8172B2")
    for bar, n in zip(bars, counts):
        if n:
            ax.annotate(f"{n / total:.0%}", (bar.get_x() + bar.get_width() / 2, n), ha="center", va="bottom", fontsize=7)
    if bound is not None:
        ax.axvline(bound + 0.5, color="#C44E52", linestyle="--", linewidth=1.2, label=f"bound k={bound}")
        ax.legend(loc="upper left", fontsize=7)
    ax.set_ylim(0, max(counts) * 1.12)  # room for the percentages
    ax.set(title="Staleness of trained samples", xlabel="trainer version - generating version", ylabel="samples")
    ax.set_xticks(range(len(counts)))


def draw_staleness_steps(ax, metrics: list[dict]) -> None:
    steps, mean = series(metrics, "staleness/mean")
    if not steps:
        return _empty(ax, "staleness")
    ax.plot(*series(metrics, "staleness/max"), color="#C44E52", linewidth=0.8, label="max")
    ax.plot(steps, mean, color="#8172B2", linewidth=1.5, label="mean")
    ax.set(title="Staleness per step", xlabel="step", ylabel="versions")
    ax.legend(loc="upper right", fontsize=7)


def draw_offpolicy(ax, metrics: list[dict], vcpo_ref: float | None) -> None:
    steps, ratio = series(metrics, "ess/ratio")
    if not steps:
        return _empty(ax, "ESS")
    ax.plot(steps, ratio, color="#55A868", alpha=0.5, linewidth=0.8, label="_ESS per step")  # "_": not in the legend
    ax.plot(steps, rolling(ratio), color="#2E6B3C", linewidth=2, label="ESS / samples")
    if vcpo_ref is not None:
        ax.axhline(vcpo_ref, color="#55A868", linestyle="--", linewidth=1, label=f"VCPO ρ_ref={vcpo_ref:g}")
    ax.set(title="Importance weights: ESS ratio and effective LR", xlabel="step", ylabel="ESS / samples",
           ylim=(0, 1.05))
    ax.legend(loc="lower left", fontsize=7)
    lr_steps, lr = series(metrics, "lr/effective")
    if lr_steps:
        twin = ax.twinx()
        twin.plot(lr_steps, lr, color="#DD8452", linewidth=1.2)
        twin.set_ylabel("effective learning rate", color="#DD8452")
        twin.set_ylim(0, max(lr) * 1.1 or 1.0)
        twin.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))


def draw_throughput(ax, metrics: list[dict], events=()) -> None:
    steps, step_s = series(metrics, "actor/step_s")
    if not steps:
        return _empty(ax, "step times")
    wait = dict(zip(*series(metrics, "actor/wait_s")))
    waits = [wait.get(s, 0.0) for s in steps]
    train = [t - w for t, w in zip(step_s, waits)]
    ax.stackplot(steps, rolling(train), rolling(waits), colors=[COLORS["train"], COLORS["wait"]],
                 labels=["trainer training", "trainer waiting for data"], alpha=0.85)
    ax.set(title=f"Trainer time per step (rolling {SMOOTH}) and samples/s", xlabel="step", ylabel="seconds per step")
    ax.legend(loc="upper left", fontsize=7)
    rate_steps, rate = series(metrics, "samples/s")
    if rate_steps:
        twin = ax.twinx()
        twin.plot(rate_steps, rolling(rate), color="#4C72B0", linewidth=1.5)
        twin.set_ylabel("samples/s", color="#4C72B0")
        twin.set_ylim(0, max(rate) * 1.1)
    _marks(ax, events)


def draw_sync(ax, metrics: list[dict]) -> None:
    steps, sent = series(metrics, "sync/bytes")
    if not steps:
        return _empty(ax, "weight sync")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    dense_steps, dense = series(metrics, "sync/dense_bytes")
    ax.plot(dense_steps, dense, color="#777777", linewidth=1.5, linestyle="--", label="dense weights")
    ax.plot(steps, sent, color="#B8860B", linewidth=1.5, label="sent (patch or compressed)")
    if max(dense + sent) > 20 * min(dense + sent):  # sparse patches: only a log axis shows both
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())  # a label per minor tick is noise (and slow to draw)
    else:
        ax.set_ylim(0, max(dense + sent) * 1.15)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda b, _: f"{b / 1e6:g} MB"))
    ratio = sum(dense) / sum(sent) if sum(sent) else float("nan")
    ax.set(title=f"Weight sync per version: {ratio:.1f}x fewer bytes than dense", xlabel="step", ylabel="bytes per version")
    d_steps, density = series(metrics, "sync/density")
    if d_steps:
        twin = ax.twinx()
        twin.plot(d_steps, density, color="#8C564B", linewidth=0.8, alpha=0.7, label="changed fraction (right)")
        twin.set_ylabel("changed fraction of the weights", color="#8C564B")
        twin.set_ylim(0, 1.05)
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="lower left", fontsize=7)
    else:
        ax.legend(loc="lower left", fontsize=7)


def draw_utilization(ax, util: dict[str, dict[str, float]]) -> None:
    if not util:
        return _empty(ax, "timeline")
    names = list(util)[::-1]  # the trainer on top
    activities = [a for a in COLORS if any(a in u for u in util.values())]
    left = [0.0] * len(names)
    for a in activities:
        widths = [util[n].get(a, 0.0) / util[n]["window"] if util[n]["window"] else 0.0 for n in names]
        ax.barh(names, widths, left=left, color=COLORS[a], label=a, edgecolor="white", linewidth=0.5)
        for i, w in enumerate(widths):
            if w >= 0.08:
                ax.text(left[i] + w / 2, i, f"{w:.0%}", ha="center", va="center", fontsize=7)
        left = [x + w for x, w in zip(left, widths)]
    ax.set(title="Where each replica's time went (steady steps)", xlabel="fraction of the time", xlim=(0, 1))
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)


# ---------------------------------------------------------------------------------------------- figures
def _figure(width: float, height: float, cols: int = 1, rows: int = 1, right: float = 0.88):
    """A figure with fixed margins: a layout engine measuring every label costs more than the drawing."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    fig.subplots_adjust(left=0.12, right=right, bottom=0.13, top=0.9, wspace=0.4)
    return fig, fig.subplots(rows, cols, squeeze=False).ravel().tolist()


def figures(metrics: list[dict], util: dict, config: dict, events=(), evals=()) -> dict:
    """name -> matplotlib Figure, for every single figure of the module docstring (not the overview)."""
    bound = config.get("flow", {}).get("staleness")
    actor = config.get("actor", {})
    vcpo_ref = actor.get("vcpo_ref") if actor.get("vcpo") else None
    out = {}
    fig, (ax,) = _figure(8, 4.5)
    draw_reward(ax, metrics, events, evals)
    out["reward"] = fig
    fig, (a, b) = _figure(8, 4.5, cols=2, right=0.97)
    draw_staleness_hist(a, metrics, bound)
    draw_staleness_steps(b, metrics)
    out["staleness"] = fig
    fig, (ax,) = _figure(8, 4.5)
    draw_offpolicy(ax, metrics, vcpo_ref)
    out["offpolicy"] = fig
    fig, (ax,) = _figure(8, 4.5)
    draw_throughput(ax, metrics, events)
    out["throughput"] = fig
    fig, (ax,) = _figure(8, 4.5)
    draw_sync(ax, metrics)
    out["sync"] = fig
    height = max(2.4, 1.3 + 0.45 * len(util))
    fig, (ax,) = _figure(8, height, right=0.84)
    fig.subplots_adjust(left=0.14, bottom=0.6 / height, top=1 - 0.45 / height)
    draw_utilization(ax, util)
    out["utilization"] = fig
    return out


def save(figs: dict, out_dir: Path) -> dict[str, Path]:
    """Write each figure as out_dir/NAME.png (written to a temporary name, then renamed: never half a file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in figs.items():
        paths[name] = _replace(out_dir / f"{name}.png", lambda tmp: fig.savefig(tmp, format="png"))
    return paths


def overview(paths: dict[str, Path], title: str, lines: list[str], out: Path) -> Path:
    """The single figures tiled on one page under ``title``, with ``lines`` (the advice) below them.

    Tiled from the PNGs already written rather than drawn again: drawing is most of a report's time.
    """
    from PIL import Image, ImageDraw, ImageFont

    order = ["reward", "staleness", "offpolicy", "throughput", "sync", "utilization"]
    tiles = [Image.open(paths[name]) for name in order if name in paths]
    width = 3 * 800
    scaled = [t.resize((800, round(t.height * 800 / t.width))) for t in tiles]
    rows = [scaled[i:i + 3] for i in range(0, len(scaled), 3)]
    heights = [max(t.height for t in row) for row in rows]
    font = ImageFont.load_default(size=20)
    small = ImageFont.load_default(size=16)
    text_h = 30 + 22 * (len(lines) + 1) if lines else 0
    page = Image.new("RGB", (width, 50 + sum(heights) + text_h), "white")
    draw = ImageDraw.Draw(page)
    draw.text((20, 12), title, fill="black", font=font)
    y = 50
    for row, h in zip(rows, heights):
        for i, tile in enumerate(row):
            page.paste(tile, (i * 800, y))
        y += h
    if lines:
        draw.text((20, y + 10), "Capacity advice (ECHO-2 model, measured):", fill="black", font=font)
        for i, line in enumerate(lines):
            draw.text((20, y + 40 + 22 * i), line, fill="#222222", font=small)
    return _replace(out, lambda tmp: page.save(tmp, format="PNG"))


def _replace(path: Path, write) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)
    return path
