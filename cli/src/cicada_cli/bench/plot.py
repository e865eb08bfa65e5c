"""Pictures of cold starts: one panel per variant, one row per unit, on a shared time axis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

STAGE_COLOURS = {"construct": "#9e9e9e", "fetch": "#4f81bd", "apply": "#f0a030", "exec": "#3a9a3a"}
LANES = {"construct": -0.3, "fetch": -0.1, "apply": 0.1, "exec": 0.3}


def plot_timelines(row: dict[str, Any], variants: list[str], out: Path) -> None:
    """Draw the median-run timeline of each variant in ``variants`` from a benchmark row."""
    timelines = [
        (v, row["variants"][v]["timeline"])
        for v in variants
        if row["variants"].get(v, {}).get("timeline")
    ]
    if not timelines:
        raise ValueError(f"no timelines for {variants} in this row")
    end = max(t["summary"]["e2e_s"] for _, t in timelines) * 1.03
    fig, axes = plt.subplots(
        1, len(timelines), figsize=(6.5 * len(timelines), 7), sharex=True, squeeze=False
    )
    for ax, (variant, tl) in zip(axes[0], timelines, strict=True):
        units = tl["units"]
        for y, unit in enumerate(units):
            for stage, lane in LANES.items():
                if stage in unit:
                    start, stop = unit[stage]
                    ax.barh(
                        y + lane,
                        max(stop - start, end / 800),
                        left=start,
                        height=0.2,
                        color=STAGE_COLOURS[stage],
                        linewidth=0,
                    )
        summary = tl["summary"]
        ax.axvline(summary["e2e_s"], color="black", linewidth=1)
        ax.set_title(
            f"{variant}: E2E {summary['e2e_s']:.2f} s, first layer "
            f"{summary['ttfl_s']:.2f} s, utilisation {summary['utilization']:.2f}",
            fontsize=10,
        )
        ax.set_ylim(len(units), -1)
        ax.set_xlim(0, end)
        ax.set_xlabel("seconds since the request arrived")
        ax.set_yticks([])
    axes[0][0].set_ylabel(f"units in execution order ({len(timelines[0][1]['units'])})")
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in STAGE_COLOURS.values()]
    fig.legend(handles, list(STAGE_COLOURS), loc="lower center", ncol=4, frameon=False)
    fig.suptitle(
        f"Cold start of {row['model']} from {row['origin']} ({row['bytes'] / 1e6:.0f} MB)",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
