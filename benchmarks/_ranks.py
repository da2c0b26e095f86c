"""Rank agreement of token weights, for the benchmarks that compare two weightings sample by sample."""

from __future__ import annotations


def spearman_rows(a, b, real) -> list[float]:
    """Spearman of a and b per sample over its real tokens ([N, T] each); equal rows (constant ones too) count 1."""
    import torch
    from scipy.stats import spearmanr

    out = []
    for i in range(a.shape[0]):
        m = real[i]
        if torch.equal(a[i][m], b[i][m]):
            out.append(1.0)
        elif int(m.sum()) > 2:
            out.append(float(spearmanr(a[i][m].numpy(), b[i][m].numpy()).statistic))
    return out
