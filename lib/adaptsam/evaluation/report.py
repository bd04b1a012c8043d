"""An evaluation report as a person reads it: JSON, a table, and two plots (Dice against
interactions per model version; final Dice per structure)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np

COLUMNS = ("box", "box_final", "box_auc", "click1", "click3", "click5", "click_auc", "clicks_to_85", "clicks_to_90", "box_final_nsd")


def table(report: Dict) -> str:
    """A Markdown table of every model's summary."""
    head = "| model | " + " | ".join(COLUMNS) + " | structures |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, entry in report["models"].items():
        s = entry["summary"]
        cells = []
        for c in COLUMNS:
            value = s.get(c, "")
            if c.startswith("clicks_to") and c + "_reached" in s:
                value = f"{value} ({s[c + '_reached']})"
            cells.append(str(value))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s.get('structures', 0)} |")
    return "\n".join(lines)


def _mean_curve(rows: List[Dict], key: str) -> np.ndarray:
    n = max(len(r[key]) for r in rows)
    return np.array([np.mean([r[key][min(i, len(r[key]) - 1)] for r in rows]) for i in range(n)])


def plot(report: Dict, out_dir: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    models = {n: e for n, e in report["models"].items() if e["structures"]}
    if not models:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, entry in models.items():
        box = _mean_curve(entry["structures"], "box_steps")
        clicks = _mean_curve(entry["structures"], "click_steps")
        axes[0].plot(range(len(box)), box, marker="o", label=name)
        axes[1].plot(range(1, len(clicks) + 1), clicks, marker="o", label=name)
    axes[0].set(title="box, then correction clicks", xlabel="correction clicks after the box", ylabel="mean Dice (3D)")
    axes[1].set(title="clicks only", xlabel="clicks", ylabel="mean Dice (3D)")
    for ax in axes:
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    curves = out_dir / "dice_per_interaction.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    names = sorted({(r["image"], r["structure"]) for e in models.values() for r in e["structures"]})
    fig, ax = plt.subplots(figsize=(max(8, 0.35 * len(names) * len(models) + 2), 4.5))
    width = 0.8 / len(models)
    for i, (name, entry) in enumerate(models.items()):
        final = {(r["image"], r["structure"]): r["box_final"] for r in entry["structures"]}
        ax.bar(np.arange(len(names)) + i * width, [final.get(n, 0) for n in names], width, label=name)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{s} ({img})" if len({n[0] for n in names}) > 1 else s for img, s in names], rotation=70, ha="right", fontsize=7)
    ax.set(ylabel="Dice after box + corrections", ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    bars = out_dir / "final_dice_per_structure.png"
    fig.savefig(bars, dpi=110)
    plt.close(fig)
    return [curves, bars]


def write(report: Dict, out_dir: Path, plots: bool = True) -> Dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "evaluation.json", "table": out_dir / "evaluation.md"}
    paths["json"].write_text(json.dumps(report, indent=1))
    paths["table"].write_text(table(report) + "\n")
    if plots:
        for p in plot(report, out_dir):
            paths[p.stem] = p
    return paths
