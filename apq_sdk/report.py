"""Pictures of a sensitivity map and a plan (matplotlib, written as PNG)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    """Write a figure as PNG atomically, without a timestamp or version in its metadata."""
    plt = _plt()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)
    return path


def sensitivity_heatmap(sens, path) -> Path:
    """Left: log10 predicted KL per linear layer (rows) and candidate (columns).
    Right: per-head salience of q/k/v/o at the reference candidate, per decoder layer."""
    plt = _plt()
    # rows in network order, whatever order the map's modules come in (a map read back from the
    # cache has sorted keys, a fresh one its profiling order): the same picture either way
    names = sorted((n for n, e in sens.modules.items() if e["kind"] == "linear"),
                   key=lambda n: (sens.modules[n]["layer"], n))
    keys = sorted({k for n in names for k in sens.modules[n]["errors"]},
                  key=lambda k: (int(k[1:].split("g")[0]), int(k.split("g")[1])))
    grid = np.array([[math.log10(max(sens.predicted(n, k), 1e-12)) for k in keys] for n in names])
    heads = sens.heads
    fig, axes = plt.subplots(1, 2 if heads else 1, figsize=(13 if heads else 7, max(6, len(names) * 0.06)),
                             gridspec_kw={"width_ratios": [1, 1.4]} if heads else None,
                             squeeze=False)
    ax = axes[0][0]
    image = ax.imshow(grid, aspect="auto", cmap="magma_r", interpolation="nearest")
    ax.set_xticks(range(len(keys)), keys, rotation=45)
    step = max(1, len(names) // 40)
    ax.set_yticks(range(0, len(names), step),
                  [n.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "")
                   for n in names[::step]], fontsize=6)
    ax.set_title("predicted KL increase (log10), per layer and candidate")
    fig.colorbar(image, ax=ax, fraction=0.04)
    if heads:
        ax = axes[0][1]
        layers = sorted(heads, key=int)
        roles = [r for r in ("q", "k", "v", "o", "kv_group") if r in heads[layers[0]]]
        width = max(len(heads[layers[0]][r]) for r in roles)
        rows = []
        for layer in layers:
            row = []
            for role in roles:
                vals = heads[layer][role]
                total = sum(vals) or 1.0
                row += [v / total for v in vals] + [np.nan] * (width - len(vals)) + [np.nan]
            rows.append(row)
        image = ax.imshow(np.array(rows), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks([i * (width + 1) + width / 2 - 0.5 for i in range(len(roles))],
                      [r.replace("kv_group", "KV group") for r in roles])
        ax.set_ylabel("decoder layer")
        ax.set_title("per-head share of each projection's error, and of each KV group "
                     "(3-bit reference)")
        fig.colorbar(image, ax=ax, fraction=0.04)
    return _save(fig, path)


def plan_bits_chart(plan, path) -> Path:
    """Bits per linear layer, one row per decoder layer and one column per projection."""
    plt = _plt()
    layers: dict[int, dict[str, int]] = {}
    for name, entry in plan.modules.items():
        if entry.kind != "linear":
            continue
        parts = name.split(".")
        index = next(int(p) for p in parts if p.isdigit())
        layers.setdefault(index, {})[parts[-1]] = entry.bits
    roles = sorted({r for d in layers.values() for r in d})
    grid = np.array([[layers[i].get(r, np.nan) for r in roles] for i in sorted(layers)], dtype=float)
    fig, ax = plt.subplots(figsize=(1 + 0.9 * len(roles), max(3, 0.22 * len(layers))))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=2, vmax=16, interpolation="nearest")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, int(value), ha="center", va="center", fontsize=7, color="white")
    ax.set_xticks(range(len(roles)), roles, rotation=30)
    ax.set_ylabel("decoder layer")
    ax.set_title(f"bits per layer ({plan.totals.linear_bits_per_weight:.2f} bpw linear, "
                 f"{plan.totals.model_bits_per_weight:.2f} whole model)")
    fig.colorbar(image, ax=ax, fraction=0.05)
    return _save(fig, path)


def _png_data_uri(render, *args) -> str:
    import base64
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = render(*args, Path(tmp) / "figure.png")
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def write_package_report(package_dir, plan, manifest: dict, verify: dict | None, sens=None) -> Path:
    """report.html: size against FP16, the verification table, bits per layer, sensitivity, plan.

    Self-contained (images inline, no scripts, no network), so it renders offline. It holds no
    timings (they vary from run to run; verify.json has them), so every build of the same inputs,
    from a fresh or a warm cache, writes the same bytes.
    """
    t = plan.totals
    size = manifest.get("size", {})
    files_bytes = size.get("model_files_bytes")
    fp16 = t.model_fp16_bytes
    rows = "".join(
        f"<tr><td>{escape(name)}</td><td>{escape(e.kind)}</td><td>{e.shape[0]}x{e.shape[1]}</td>"
        f"<td>{e.bits}</td><td>{e.group_size or '-'}</td><td>{escape(e.activation)}</td>"
        f"<td>{e.bytes:,}</td><td>{e.predicted_loss:.2e}</td></tr>"
        for name, e in plan.modules.items())
    if verify is None:
        checks = "<tr><td>not verified (--no-verify)</td></tr>"
    else:
        checks = "<tr><th>check</th><th>measured</th><th>bound</th><th>result</th></tr>" + "".join(
            f"<tr><td>{escape(c['name'])}</td><td>{escape(_fmt(c['measured']))}</td>"
            f"<td>{escape(_fmt(c['bound']))}</td><td>{'pass' if c['passed'] else 'FAIL'}</td></tr>"
            for c in verify.get("checks", []))
        checks += "".join(f"<tr><td colspan=4>not run: {escape(why)}</td></tr>"
                          for why in verify.get("skipped", []))
    accuracy = ""
    if verify and verify.get("accuracy"):
        a = verify["accuracy"]
        accuracy = (f"<tr><th>KL to the unquantized model: package / torch reference</th>"
                    f"<td>{a['kl_float_package']:.4f} / {a['kl_float_reference']:.4f}</td></tr>"
                    f"<tr><th>perplexity: unquantized / package / torch reference</th>"
                    f"<td>{a['ppl_float']:.3f} / {a['ppl_package']:.3f} / "
                    f"{a['ppl_reference']:.3f}</td></tr>")
    if verify and verify.get("perplexity"):
        accuracy += (f"<tr><th>verification text</th><td>{verify['perplexity']['windows']} windows "
                     f"x {verify['perplexity']['seq_len']} tokens of "
                     f"{escape(Path(verify['text']).name)}</td></tr>")
    heatmap = (f'<img alt="sensitivity heatmap" src="{_png_data_uri(sensitivity_heatmap, sens)}">'
               if sens is not None else "<p>No sensitivity map: the build was given a plan.</p>")
    bits = f'<img alt="bits per layer" src="{_png_data_uri(plan_bits_chart, plan)}">'
    name = escape(manifest["model"]["name"])
    target = escape(manifest["target"]["name"])
    files_row = "" if files_bytes is None else (
        f"<tr><th>model files of this package</th><td>{files_bytes / 1e6:.2f} MB = "
        f"{8 * files_bytes / t.model_params:.3f} bits/weight ({100 * (1 - files_bytes / fp16):.1f}% "
        f"smaller than FP16)</td></tr>")
    html = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{name} for {target}: apq-sdk report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:left}}img{{max-width:100%}}</style>
</head><body>
<h1>{name} for {target}</h1>
<h2>Size</h2>
<table><tr><th>whole model, FP16</th><td>{fp16 / 1e6:.2f} MB ({t.model_params:,} parameters)</td></tr>
<tr><th>whole model as planned, as this target stores it (weights, scales, zero points, head, embeddings, norms)</th><td>{t.target_bytes / 1e6:.2f} MB = {t.target_bits_per_weight:.3f} bits/weight ({100 * (1 - t.target_bytes / fp16):.1f}% smaller than FP16)</td></tr>
<tr><th>whole model in the core's checkpoint (float16 scales)</th><td>{t.model_bytes / 1e6:.2f} MB = {t.model_bits_per_weight:.3f} bits/weight</td></tr>
{files_row}<tr><th>decoder linear layers</th><td>{t.linear_bits_per_weight:.3f} bits/weight</td></tr>
<tr><th>budget</th><td>{escape(_budget(plan.objective))}</td></tr>
<tr><th>predicted KL divergence</th><td>{t.predicted_loss:.4f}</td></tr></table>
<h2>Verification (package vs torch reference of the same plan)</h2>
<table>{checks}</table>
<table>{accuracy}</table>
<h2>Bits per layer</h2>{bits}
<h2>Sensitivity</h2>{heatmap}
<h2>Plan</h2>
<table><tr><th>module</th><th>kind</th><th>shape</th><th>bits</th><th>group</th><th>activation</th><th>bytes</th><th>predicted KL</th></tr>{rows}</table>
</body></html>
"""
    path = Path(package_dir) / "report.html"
    path.write_text(html)
    return path


def _budget(o) -> str:
    if o.bits_per_weight is not None:
        return f"{o.bits_per_weight:g} bits per weight ({'whole model' if o.scope == 'model' else 'decoder linears'})"
    if o.memory_reduction is not None:
        return f"{o.memory_reduction:.0%} smaller than the whole model's FP16 size"
    if o.max_loss is not None:
        return f"fewest bytes within a relative perplexity increase of {o.max_loss:g}"
    return f"{o.budget_bytes:,} bytes for the planned modules"


def escape(text: str) -> str:
    """HTML text with invisible characters (bidi overrides, zero-width) shown as U+XXXX."""
    import html

    from .native_glue import invisible

    return html.escape("".join(f"U+{ord(c):04X}" if invisible(c) else c for c in str(text)))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
