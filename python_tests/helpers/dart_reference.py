"""DART's published selection, written independently in fp64 Python lists (the reference of the DART compressor and
of the models' DART cases)."""

from __future__ import annotations

import math


def rms_norm(row: list[float], weight: list[float], eps: float) -> list[float]:
    scale = 1.0 / math.sqrt(sum(v * v for v in row) / len(row) + eps)
    return [v * scale * w for v, w in zip(row, weight)]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def reference_dart(hidden, key, weight, eps, image, prompt, keep, image_pivots, text_pivots):
    """Kept visual positions per sample (sorted lists). hidden [B, L, D], key [B, H, L, Dh] tensors; weight and eps
    of the final RMS norm; image, prompt [B, L] bool; keep: list of B ints."""
    hidden, key = hidden.double().tolist(), key.double().tolist()
    image, prompt = image.tolist(), prompt.tolist()
    result = []
    for b, k_b in enumerate(keep):
        length = len(image[b])
        visual = [i for i in range(length) if image[b][i]]
        if k_b == 0:
            result.append([])
            continue
        l1 = [sum(abs(v) for head in key[b] for v in head[i]) for i in range(length)]
        by_norm = sorted(visual, key=lambda i: (-l1[i], i))
        img_piv = by_norm[:image_pivots]
        if k_b < len(img_piv):
            result.append(sorted(img_piv[:k_b]))
            continue
        first = visual[0]
        text = [i for i in range(length) if prompt[b][i] and not image[b][i] and i > first]
        txt_piv = sorted(text, key=lambda i: (-l1[i], i))[:text_pivots]
        pivots = sorted(img_piv + txt_piv)
        features = [rms_norm(hidden[b][i], weight, eps) for i in range(length)]
        kept = set(img_piv)
        per_pivot, extra = divmod(k_b - len(img_piv), len(pivots))
        for j, p in enumerate(pivots):
            budget = per_pivot + (1 if j < extra else 0)
            open_slots = [i for i in visual if i not in kept]
            picks = sorted(open_slots, key=lambda i: (cosine(features[p], features[i]), i))[:budget]
            kept.update(picks)
        assert len(kept) == k_b
        result.append(sorted(kept))
    return result


# ------------------------------------------------------------------------------------------ random contexts --
