#!/usr/bin/env python3
"""Plots quality against bits per coordinate from the JSON of `veloxquant compare --json`.

Usage: plot_quality.py COMPARE.json OUT.png

Two panels share the x axis (mean of key and value bits per coordinate, every norm, scale and id
counted): mean KL(fp16 || config) of the next-token distributions on a log scale, with the
issue's targets (0.05 at 2.5 bits, 0.03 at 3, 0.01 at 4), and top-1 agreement with the fp16
cache. One series per method; hollow markers are a method's default settings. The fp16 baseline
itself has KLD 0 and is not drawn.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TARGETS = [(2.5, 0.05), (3.0, 0.03), (4.0, 0.01)]
KLD_FLOOR = 1e-5  # a KLD of exactly 0 cannot be drawn on a log axis
MARKERS = "osD^v<>p*h"  # distinct markers keep coinciding methods visible


def load_rows(path):
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    rows = [r for r in doc["rows"] if r["config"]["method"] != "fp16"]
    if not rows:
        raise SystemExit(f"{path}: no compressed configurations in 'rows'")
    return doc, rows


def bits(rows):
    return [r["footprint"]["bits_per_coordinate"] for r in rows]


def values(rows, key):
    if key == "kld":
        return [max(r["kld"], KLD_FLOOR) for r in rows]
    return [100.0 * r["top1"] for r in rows]


def plot(doc, rows, out_path):
    fig, (ax_kld, ax_top1) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    methods = sorted({r["config"]["method"] for r in rows})
    for i, method in enumerate(methods):
        color, marker = f"C{i}", MARKERS[i % len(MARKERS)]
        mine = sorted((r for r in rows if r["config"]["method"] == method),
                      key=lambda r: r["footprint"]["bits_per_coordinate"])
        swept = [r for r in mine if not r["label"].endswith("(defaults)")]
        defaults = [r for r in mine if r["label"].endswith("(defaults)")]
        for ax, key in ((ax_kld, "kld"), (ax_top1, "top1")):
            ax.plot(bits(swept), values(swept, key), marker + "-", color=color, alpha=0.8,
                    markersize=7 + 2 * (len(methods) - i) / len(methods),
                    label=method if key == "kld" else None)
            ax.plot(bits(defaults), values(defaults, key), marker, mfc="none", color=color,
                    markersize=10)
    ax_kld.plot(*zip(*TARGETS), "kx", markersize=9, label="issue targets")
    ax_kld.set_yscale("log")
    ax_kld.set_ylabel("mean KL(fp16 || config), nats")
    ax_kld.grid(True, which="both", alpha=0.3)
    ax_kld.legend(fontsize=8)
    ax_top1.axhline(100.0, color="gray", lw=0.8)
    ax_top1.set_ylabel("top-1 agreement with fp16 (%)")
    ax_top1.set_xlabel("bits per coordinate (mean of keys and values, all overheads)")
    ax_top1.grid(True, alpha=0.3)
    model = doc.get("model", "").rsplit("/", 1)[-1]
    fig.suptitle(f"{model}: ctx {doc['ctx']}, {doc['tokens_scored']} tokens scored "
                 "(hollow: method defaults)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)


def main(argv):
    if len(argv) != 3:
        raise SystemExit(__doc__)
    doc, rows = load_rows(argv[1])
    plot(doc, rows, argv[2])


if __name__ == "__main__":
    main(sys.argv)
