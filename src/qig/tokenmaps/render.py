"""Pictures of token maps: heat overlays on the patch grid, coloured tokens, charts across depth.

matplotlib is an optional extra (``pip install 'qig[plot]'``), imported only
here and only when a picture is drawn; figures are built with the
object-oriented API (no pyplot, no global backend change).

Colours: a token's weight times uniform (see :mod:`qig.tokenmaps.maps`) on a
log scale, blue below AWQ's uniform weight, red above, clipped at
x1/4 and x4. Overlays keep the scene visible: near-uniform patches are only
lightly tinted.

    >>> from qig.tokenmaps.render import sample_figure
    >>> sample_figure(maps, 0, "sample-0.png")  # doctest: +SKIP
"""

from __future__ import annotations

import os

import numpy as np
import torch

from qig.calib import ANSWER, PAD, PROMPT, VISION
from qig.errors import QigError
from qig.tokenmaps.maps import ROLES, TokenMaps

LOG2_RANGE = 2.0  # colours saturate at x1/4 and x4
CMAP = "RdBu_r"
PANEL_PX = 192  # the image side in a panel, upscaled with nearest neighbour
DPI = 110
REGION_TYPES = ("colour", "shape", "digit", "position")  # embedded questions about one object
ROLE_COLOURS = {"vision": "#2a9d8f", "prompt": "#8d99ae", "answer": "#e76f51"}
METHOD_STYLES = {"qig": ("-", "o", 2.0), "mbq": ("--", "s", 1.2), "awq": (":", "", 1.2)}


def require_matplotlib():
    """The matplotlib module, or a QigError saying how to install it."""
    try:
        import matplotlib
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as exc:
        raise QigError(
            "the pictures of qig inspect / qig quantize --report need matplotlib, an optional extra; "
            "install it with: pip install 'qig[plot]'"
        ) from exc
    return matplotlib


def _figure(width: float, height: float):
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _unit(rel: np.ndarray) -> np.ndarray:
    """Times-uniform weights -> [-1, 1] on the clipped log2 scale."""
    return np.clip(np.log2(np.maximum(rel, 1e-6)), -LOG2_RANGE, LOG2_RANGE) / LOG2_RANGE


def _colours(rel: np.ndarray) -> np.ndarray:
    """Times-uniform weights [...] -> RGB [..., 3] in [0, 1]."""
    cmap = require_matplotlib().colormaps[CMAP]
    return cmap((_unit(rel) + 1) / 2)[..., :3]


def upscale(image: np.ndarray, px: int = PANEL_PX) -> tuple[np.ndarray, int]:
    """Nearest-neighbour upscaling by an integer factor so the longer side is about ``px``: ([H', W', 3], factor)."""
    factor = max(1, round(px / max(image.shape[:2])))
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1), factor


def overlay(image: np.ndarray, rel: np.ndarray, px: int = PANEL_PX) -> np.ndarray:
    """The image with one tinted cell per vision token: image [H, W, 3] uint8, rel [rows, cols] -> uint8.

    Cells follow the patch grid; thin light lines mark its borders.
    """
    big, factor = upscale(image, px)
    H, W = big.shape[:2]
    rows, cols = rel.shape
    ys = (np.arange(H) * rows) // H  # pixel row -> grid row
    xs = (np.arange(W) * cols) // W
    heat = _colours(rel)[ys][:, xs]  # [H, W, 3]
    alpha = (0.3 + 0.5 * np.abs(_unit(rel)))[ys][:, xs][..., None]  # [H, W, 1]
    out = big.astype(np.float32) / 255 * (1 - alpha) + heat * alpha
    edges_y = np.flatnonzero(np.diff(ys)) + 1
    edges_x = np.flatnonzero(np.diff(xs)) + 1
    out[edges_y, :] = 0.6 * out[edges_y, :] + 0.4
    out[:, edges_x] = 0.6 * out[:, edges_x] + 0.4
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def vision_grid(maps: TokenMaps, method: str, layer: int, group: str, i: int, image: int = 0) -> np.ndarray:
    """Times-uniform weights of sample i's vision tokens on the patch grid of its ``image``: [rows, cols]."""
    rel = maps.relative(method, layer, group)[i]  # [T]
    return rel[torch.from_numpy(maps.images[i][image].positions)].numpy()


def text_chips(maps: TokenMaps, method: str, layer: int, group: str, i: int) -> list[tuple[str, float]]:
    """(text, times-uniform weight) per real token of sample i; each image's run of vision tokens is one chip."""
    rel = maps.relative(method, layer, group)[i]
    roles = maps.roles[i]
    chips: list[tuple[str, float]] = []
    p, T = 0, roles.numel()
    while p < T:
        if roles[p] == PAD:
            p += 1
            continue
        if roles[p] == VISION:
            q = p
            while q < T and roles[q] == VISION:
                q += 1
            chips.append((f"[image: {q - p} tokens, mean]", float(rel[p:q].mean())))
            p = q
            continue
        chips.append((maps.tokens[i][p], float(rel[p])))
        p += 1
    return chips


def _draw_chips(ax, chips, x: float, y: float, fontsize: float = 8.0, label: str | None = None) -> None:
    """Coloured token chips from (x, y) in axes coordinates, left to right (one line)."""
    prev = None
    if label is not None:
        prev = ax.text(x, y, label, transform=ax.transAxes, fontsize=fontsize, va="bottom", ha="left", color="#444")
        prev.set_in_layout(False)
    colours = _colours(np.array([v for _, v in chips])) if chips else np.zeros((0, 3))
    for (text, _), rgb in zip(chips, colours, strict=True):
        lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
        style = dict(
            fontsize=fontsize,
            va="bottom",
            ha="left",
            color="white" if lum < 0.5 else "black",
            bbox=dict(boxstyle="round,pad=0.18", fc=rgb, ec="none"),
        )
        if prev is None:
            prev = ax.text(x, y, text, transform=ax.transAxes, **style)
        else:
            gap = 3.5 if prev.get_bbox_patch() is not None else 8.0
            prev = ax.annotate(text, xy=(1, 0), xycoords=prev, xytext=(gap, 0), textcoords="offset points", **style)
        prev.set_in_layout(False)


def _chip_lines(chips, width_in: float, fontsize: float):
    """Split chips into lines that fit about ``width_in`` inches at ``fontsize`` (estimated widths)."""
    budget = width_in * 72
    lines: list[list] = [[]]
    used = 0.0
    for chip in chips:
        cost = 0.6 * fontsize * len(chip[0]) + 8.0  # points: glyphs + padding + gap
        if lines[-1] and used + cost > budget:
            lines.append([])
            used = 0.0
        lines[-1].append(chip)
        used += cost
    return lines


def _colourbar(fig, cax):
    mpl = require_matplotlib()
    norm = mpl.colors.Normalize(-LOG2_RANGE, LOG2_RANGE)
    sm = mpl.cm.ScalarMappable(norm=norm, cmap=mpl.colormaps[CMAP])
    cb = fig.colorbar(sm, cax=cax, orientation="horizontal")
    ticks = np.arange(-LOG2_RANGE, LOG2_RANGE + 1)
    cb.set_ticks(ticks, labels=[f"x{2**t:g}" if t >= 0 else f"x1/{2**-t:g}" for t in ticks])
    cb.ax.tick_params(labelsize=8)
    cb.set_label("token weight / uniform (AWQ) weight", fontsize=8)
    return cb


def _title(maps: TokenMaps, i: int, width: int = 90) -> str:
    roles, toks = maps.roles[i], maps.tokens[i]
    prompt = " ".join(toks[p] for p in range(roles.numel()) if roles[p] == PROMPT and toks[p] not in ("↵", "␣"))
    answer = " ".join(toks[p] for p in range(roles.numel()) if roles[p] == ANSWER and toks[p] not in ("↵", "␣"))
    kind = maps.meta[i].get("type")
    text = f"{maps.meta[i].get('id', i)}" + (f" ({kind})" if kind else "")
    return f"{text}\nprompt: {_short(prompt, width)}\nanswer: {_short(answer, width)}"


def _short(text: str, n: int = 90) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _vision_share(maps: TokenMaps, method: str, layer: int, group: str, i: int) -> float:
    w = maps.get(method, layer, group)
    if w is None:
        return float("nan")
    total = float(w[i].sum())
    return float(w[i][maps.roles[i] == VISION].sum()) / total if total > 0 else float("nan")


def sample_figure(maps: TokenMaps, i: int, path: str | os.PathLike, method: str = "qig") -> None:
    """One sample: its image, the vision-token overlays per shown layer x group, and its tokens coloured.

    The token lines show every shown layer and group, so the text can be read
    against the overlays above it.
    """
    groups = [g for g in maps.groups if any(maps.get(method, layer, g) is not None for layer in maps.shown)]
    has_image = bool(maps.images[i])
    n_cols = max(len(groups), 3)
    width = 2.3 * n_cols + 0.3
    line_in = width * 0.86
    pairs = [(layer, g) for layer in maps.shown for g in groups if maps.get(method, layer, g) is not None]
    lines = [
        (layer, g, j, line)
        for layer, g in pairs
        for j, line in enumerate(_chip_lines(text_chips(maps, method, layer, g, i), line_in, 8.0))
    ]
    text_h = 0.27 * len(lines) + 0.2
    ratios = [2.3] + ([2.45] * len(maps.shown) if has_image else []) + [0.32, text_h]
    fig = _figure(width, sum(ratios) + 0.3)
    gs = fig.add_gridspec(len(ratios), n_cols, height_ratios=ratios)
    head = fig.add_subplot(gs[0, 0])
    head.axis("off")
    if has_image:
        head.imshow(upscale(maps.images[i][0].image)[0], interpolation="nearest")
        head.set_title("image (as the model sees it)", fontsize=8)
    info = fig.add_subplot(gs[0, 1:])
    info.axis("off")
    chars = int((width - 2.6) * 72 / (0.6 * 8.5))  # what fits right of the image at 8.5 pt
    rows = [_title(maps, i, chars), "", f"vision share of the weight ({groups[0]}):"]
    for layer in maps.shown:
        shares = "   ".join(
            f"{m.upper()} {100 * _vision_share(maps, m, layer, groups[0], i):.0f}%" for m in maps.methods
        )
        rows.append(f"  layer {layer}:  {shares}")
    note = info.text(0.02, 1, "\n".join(rows), va="top", ha="left", fontsize=8.5, transform=info.transAxes)
    note.set_in_layout(False)
    if has_image:
        _overlays(fig, gs, maps, method, groups, i)
    _colourbar(fig, fig.add_subplot(gs[-2, 1 : n_cols - 1] if n_cols > 2 else gs[-2, :]))
    text_ax = fig.add_subplot(gs[-1, :])
    text_ax.axis("off")
    for k, (layer, g, j, line) in enumerate(lines):
        label = f"L{layer} {g}" if j == 0 else ""
        _draw_chips(text_ax, line, 0.11, 1 - (k + 1) / len(lines), label=None)
        if label:
            t = text_ax.text(
                0.0, 1 - (k + 1) / len(lines), label, transform=text_ax.transAxes, fontsize=8, va="bottom", color="#444"
            )
            t.set_in_layout(False)
    fig.suptitle(f"{method.upper()} token weights, H = entropy of the vision map (1 = uniform)", fontsize=9)
    fig.savefig(path)


def _overlays(fig, gs, maps: TokenMaps, method: str, groups: list[str], i: int) -> None:
    """Sample ``i``'s vision-token overlays, one row per shown layer and one column per group, from grid row 1."""
    image = maps.images[i][0].image
    for r, layer in enumerate(maps.shown):
        for c, group in enumerate(groups):
            ax = fig.add_subplot(gs[1 + r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if maps.get(method, layer, group) is None:
                ax.axis("off")
                continue
            ax.imshow(overlay(image, vision_grid(maps, method, layer, group, i)), interpolation="nearest")
            h = maps.entropy_of(method, layer, group, i, "vision")
            ax.set_title(f"{method.upper()} L{layer} {group}  (H={h:.2f})", fontsize=8)


def overview_figure(maps: TokenMaps, path: str | os.PathLike, method: str = "qig", n: int = 3) -> list[int]:
    """The README picture: a few samples' overlays across depth with coloured tokens, and the shares chart.

    Prefers samples whose answer depends on one object (colour / shape / digit /
    position questions of the embedded world). Returns the samples shown.
    """
    with_image = [i for i in range(maps.n_samples) if maps.images[i]]
    if not with_image:
        raise QigError("no sample has an image; the overview needs vision tokens")
    ranked = sorted(with_image, key=lambda i: (maps.meta[i].get("type") not in REGION_TYPES, i))
    chosen = ranked[:n]
    group = next(g for g in maps.groups if maps.get(method, maps.shown[0], g) is not None)
    n_cols = 1 + len(maps.shown)
    width = max(2.3 * n_cols, 9.5)
    line_in = width * 0.9
    text = {
        (i, layer): _chip_lines([c for c in text_chips(maps, method, layer, group, i) if c[0] != "↵"], line_in, 7.5)
        for i in chosen
        for layer in maps.shown
    }
    ratios = [0.35]
    for i in chosen:
        ratios += [2.2, 0.24 * sum(len(text[(i, layer)]) for layer in maps.shown) + 0.1]
    ratios.append(3.2)
    fig = _figure(width, sum(ratios) + 0.6)
    gs = fig.add_gridspec(len(ratios), n_cols, height_ratios=ratios)
    _colourbar(fig, fig.add_subplot(gs[0, 1:]))
    for r, i in enumerate(chosen):
        image = maps.images[i][0].image
        ax = fig.add_subplot(gs[1 + 2 * r, 0])
        ax.imshow(upscale(image)[0], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(_short(maps.meta[i].get("question") or maps.meta[i].get("id", f"sample {i}"), 34), fontsize=8)
        answer = maps.meta[i].get("answer")
        if answer:
            ax.set_xlabel(f"answer: {_short(answer, 30)}", fontsize=8)
        for c, layer in enumerate(maps.shown):
            ax = fig.add_subplot(gs[1 + 2 * r, 1 + c])
            ax.imshow(overlay(image, vision_grid(maps, method, layer, group, i)), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            h = maps.entropy_of(method, layer, group, i, "vision")
            ax.set_title(f"layer {layer}  (H={h:.2f})", fontsize=8.5)
        _token_rows(fig.add_subplot(gs[2 + 2 * r, :]), maps, text, i)
    chart = fig.add_subplot(gs[-1, :])
    _shares_axes(chart, maps, group)
    fig.suptitle(
        f"Which tokens {method.upper()} weighs at {group} (vs AWQ's uniform weight); "
        "H = entropy of the vision map, 1 = uniform",
        fontsize=10,
    )
    fig.savefig(path)
    return chosen


def _token_rows(text_ax, maps: TokenMaps, text: dict, i: int) -> None:
    """Sample ``i``'s coloured token lines, every shown layer in turn, labelled with the layer."""
    text_ax.axis("off")
    rows = [(layer, j, line) for layer in maps.shown for j, line in enumerate(text[(i, layer)])]
    for k, (layer, j, line) in enumerate(rows):
        y = 1 - (k + 1) / len(rows)
        _draw_chips(text_ax, line, 0.06, y, 7.5)
        if j == 0:
            t = text_ax.text(0.0, y, f"L{layer}", transform=text_ax.transAxes, fontsize=7.5, color="#444")
            t.set_in_layout(False)


def _shares_axes(ax, maps: TokenMaps, group: str) -> None:
    shares = maps.shares()
    for method in maps.methods:
        for name in ROLES.values():
            xs = [layer for layer in maps.layers if f"{layer}.{group}" in shares.get(method, {})]
            ys = [shares[method][f"{layer}.{group}"][name] for layer in xs]
            if not xs:
                continue
            ls, marker, lw = METHOD_STYLES.get(method, ("-.", "^", 1.2))
            ax.plot(
                xs, ys, ls=ls, marker=marker, lw=lw, ms=3.5, color=ROLE_COLOURS[name], label=f"{method.upper()} {name}"
            )
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("share of total weight")
    ax.set_xticks(maps.layers)
    ax.set_ylim(-0.02, 1.04)
    ax.grid(alpha=0.3)
    ax.set_title(f"{group}: weight share by modality across depth", fontsize=9)
    ax.legend(fontsize=7, ncol=len(maps.methods), loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)


def shares_figure(maps: TokenMaps, path: str | os.PathLike) -> None:
    """Per group: the share of total weight on vision / prompt / answer tokens across depth, every method."""
    fig = _figure(4.2 * len(maps.groups) + 0.4, 4.0)
    axes = fig.subplots(1, len(maps.groups), squeeze=False)[0]
    for ax, group in zip(axes, maps.groups, strict=True):
        _shares_axes(ax, maps, group)
        if ax is not axes[-1]:
            ax.get_legend().remove()
    fig.savefig(path)


def variability_figure(maps: TokenMaps, path: str | os.PathLike, method: str = "qig") -> None:
    """Spread of the times-uniform weights inside each modality, per layer (boxes), with MBQ for reference."""
    present = [(code, name) for code, name in ROLES.items() if bool((maps.roles == code).any())]
    fig = _figure(3.6 * len(maps.groups) + 0.5, 2.5 * len(present) + 0.6)
    axes = fig.subplots(len(present), len(maps.groups), squeeze=False, sharey=True)
    for r, (code, name) in enumerate(present):
        for c, group in enumerate(maps.groups):
            ax = axes[r, c]
            data, xs, mbq = [], [], []
            for layer in maps.layers:
                if maps.get(method, layer, group) is None:
                    continue
                vals = maps.relative(method, layer, group)[maps.roles == code].numpy()
                data.append(np.log2(np.maximum(vals, 2 ** -(LOG2_RANGE + 2))))
                xs.append(layer)
                if maps.get("mbq", layer, group) is not None:
                    m = maps.relative("mbq", layer, group)[maps.roles == code].numpy()
                    mbq.append(float(np.log2(max(float(np.median(m)), 2 ** -(LOG2_RANGE + 2)))))
            if not data:
                ax.axis("off")
                continue
            ax.boxplot(
                data,
                positions=xs,
                widths=0.6,
                showfliers=True,
                flierprops=dict(ms=2, alpha=0.4),
                patch_artist=True,
                boxprops=dict(fc=ROLE_COLOURS[name], alpha=0.6),
            )
            ax.axhline(0, color="k", lw=0.8, ls=":", label="AWQ (uniform)")
            if len(mbq) == len(xs):
                ax.plot(xs, mbq, "k_", ms=14, mew=2, label="MBQ")
            ax.set_xticks(xs)
            ticks = np.arange(-LOG2_RANGE - 2, LOG2_RANGE + 3, 2)
            ax.set_yticks(ticks, labels=[f"x{2**t:g}" if t >= 0 else f"x1/{2**-t:g}" for t in ticks])
            ax.grid(alpha=0.3, axis="y")
            if r == 0:
                ax.set_title(f"{method.upper()} {group}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{name} tokens\nweight / uniform")
            if r == len(present) - 1:
                ax.set_xlabel("decoder layer")
    axes[0, -1].legend(fontsize=7, loc="upper right")
    fig.savefig(path)
