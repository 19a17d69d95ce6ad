"""epic_ext.ops.attention_importance against the fp64 softmax(QK^T) head/row mean (reference.attention_importance)."""

from __future__ import annotations

import zlib

import pytest
import torch

from helpers.devices import DEVICES
from epic_ext import ops, reference
from helpers.token_data import make_batch


def rel_err(actual, expected):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads", [(32, 32), (32, 8), (14, 2)], ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_matches_reference_fp32(device, heads, rows, head_dim, padding):
    g = torch.Generator().manual_seed(zlib.crc32(repr((heads, rows, head_dim, padding)).encode()))
    q_heads, kv_heads = heads
    query, key, positions, mask, span_start = make_batch(3, q_heads, kv_heads, rows, 700, head_dim, torch.float32,
                                                         device, g, padding=padding, skip_rows=True)
    got = ops.attention_importance(query, key, query_positions=positions, key_padding_mask=mask)
    expected = reference.attention_importance(query, key, query_positions=positions, key_padding_mask=mask)
    assert got.shape == (3, 700) and got.dtype == torch.float32
    assert rel_err(got, expected) < 1e-5
    assert torch.all(got[~mask] == 0), "padded keys must get exactly 0"
    torch.testing.assert_close(got.sum(dim=1).double().cpu(), torch.ones(3, dtype=torch.float64), rtol=1e-5, atol=0)
    # The kept set equals the reference's top-k unless two candidates tie within fp32 noise at the boundary.
    keep = 128
    ours = ops.select_tokens(got, span_start, 576, keep)
    theirs = reference.select_tokens(expected, span_start, 576, keep)
    for b in range(3):
        span = expected[b, span_start[b] : span_start[b] + 576].sort(descending=True).values
        if (span[keep - 1] - span[keep]).item() > 1e-6 * span[0].item():
            assert torch.equal(ours[b].cpu(), theirs[b].cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_at_most_twice_plain_torch(device, dtype):
    g = torch.Generator().manual_seed(7 + (dtype == torch.float16))
    query, key, positions, mask, _ = make_batch(2, 32, 8, 5, 700, 128, dtype, device, g, padding="left")
    got = ops.attention_importance(query, key, query_positions=positions, key_padding_mask=mask)
    truth = reference.attention_importance(query, key, query_positions=positions, key_padding_mask=mask)
    plain = reference.attention_importance(query, key, query_positions=positions, key_padding_mask=mask,
                                           compute_dtype=dtype)
    assert got.dtype == torch.float32
    assert rel_err(got, truth) <= 2 * rel_err(plain, truth) + 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 4, 4, 1, 97, 59), (2, 6, 3, 2, 33, 8), (4, 2, 1, 3, 1, 16)],
                         ids=lambda s: "x".join(map(str, s)))
def test_odd_sizes_and_defaults(device, shape):
    batch, q_heads, kv_heads, rows, length, head_dim = shape
    g = torch.Generator().manual_seed(sum(shape))
    query = torch.randn(batch, q_heads, rows, head_dim, generator=g).to(device)
    key = torch.randn(batch, kv_heads, length, head_dim, generator=g).to(device)
    got = ops.attention_importance(query, key, scale=0.3)
    expected = reference.attention_importance(query, key, scale=0.3)
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_skipped_and_blind_rows_do_not_count(device):
    g = torch.Generator().manual_seed(5)
    query = torch.randn(3, 4, 3, 16, generator=g).to(device)
    key = torch.randn(3, 2, 20, 16, generator=g).to(device)
    positions = torch.tensor([[19, -1, 5], [-1, -1, -1], [2, 19, 19]], device=device)
    mask = torch.ones(3, 20, dtype=torch.bool, device=device)
    mask[2, :4] = False  # row at position 2 of sample 2 sees no key: not counted
    got = ops.attention_importance(query, key, query_positions=positions, key_padding_mask=mask)
    expected = reference.attention_importance(query, key, query_positions=positions, key_padding_mask=mask)
    assert rel_err(got, expected) < 1e-5
    assert torch.all(got[1] == 0), "a sample with no valid row gets zeros, not NaN"
    assert torch.all(got[0, 6:] >= 0) and torch.isfinite(got).all()
    torch.testing.assert_close(got[2].sum().item(), 1.0, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_views(device):
    g = torch.Generator().manual_seed(6)
    q_full = torch.randn(2, 10, 8, 64, generator=g).to(device)
    k_full = torch.randn(2, 40, 4, 64, generator=g).to(device)
    query = q_full[:, 3:6].transpose(1, 2)  # [2, 8, 3, 64] from a [B, R, H, D] layout
    key = k_full.transpose(1, 2)  # [2, 4, 40, 64]
    assert not query.is_contiguous() and not key.is_contiguous()
    got = ops.attention_importance(query, key)
    expected = reference.attention_importance(query.contiguous(), key.contiguous())
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    got = ops.attention_importance(torch.randn(0, 4, 1, 8, device=device), torch.randn(0, 2, 10, 8, device=device))
    assert got.shape == (0, 10)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    g = torch.Generator().manual_seed(8)
    query, key, positions, mask, _ = make_batch(2, 4, 2, 2, 40, 16, torch.float32, device, g, span=16)
    torch.library.opcheck(torch.ops.epic_ext.attention_importance.default, (query, key, None, positions, mask))
    torch.library.opcheck(torch.ops.epic_ext.attention_importance.default, (query, key, 0.5, None, None))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(query=torch.randn(2, 4, 8)), "query must be 4-D"),
        (dict(key=torch.randn(2, 2, 10)), "key must be 4-D"),
        (dict(key=torch.randn(2, 3, 10, 8)), "multiple of key heads"),
        (dict(key=torch.randn(2, 2, 10, 7)), "same head dim"),
        (dict(key=torch.randn(3, 2, 10, 8)), "same batch size"),
        (dict(key=torch.randn(2, 2, 10, 8).double()), "key must be float32, bfloat16 or float16"),
        (dict(key=torch.randn(2, 2, 10, 8).half()), "same dtype"),
        (dict(scale=-1.0), "scale must be"),
        (dict(query_positions=torch.zeros(2, 1, dtype=torch.long)), r"query_positions must have shape \[B, R\]"),
        (dict(query_positions=torch.zeros(2, 3, dtype=torch.int32)), "query_positions must be int64"),
        (dict(query_positions=torch.tensor([[0, 1, 10], [0, 0, 0]])), "query_positions entries must be"),
        (dict(query_positions=torch.tensor([[0, 1, -2], [0, 0, 0]])), "query_positions entries must be"),
        (dict(key_padding_mask=torch.ones(2, 10)), "key_padding_mask must be bool"),
        (dict(key_padding_mask=torch.ones(2, 9, dtype=torch.bool)), r"key_padding_mask must have shape \[B, L\]"),
        (dict(key_padding_mask=torch.ones(2, 10, dtype=torch.bool, device="meta")), "key_padding_mask is on"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    args = dict(query=torch.randn(2, 4, 3, 8), key=torch.randn(2, 2, 10, 8))
    args.update(kwargs)
    query, key = args.pop("query"), args.pop("key")
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        ops.attention_importance(query, key, **args)


# ------------------------------------------------------------------------------- issue 10: NaN / inf propagate --
def _nan_case(kind: str, generator: torch.Generator):
    """query [2, 4, 3, 8], key [2, 2, 10, 8] and a non-finite value placed as `kind` says (sample 0 only)."""
    query = torch.randn(2, 4, 3, 8, generator=generator)
    key = torch.randn(2, 2, 10, 8, generator=generator)
    kwargs = {}
    if kind == "nan query row":
        query[0, 1, 2, 3] = float("nan")
    elif kind == "nan key":
        key[0, 1, 7, 0] = float("nan")
    elif kind == "inf key":  # scores of +inf and -inf: the rows that see it are NaN in torch.softmax
        key[0, 0, 4, 2] = float("inf")
    elif kind == "inf query":
        query[0, 3, 0, 5] = float("-inf")
    elif kind == "only -inf scores":  # q . k = -inf for every key a row sees
        query[0] = 1.0
        key[0] = float("-inf")
    elif kind == "nan in a skipped row":  # position -1: not counted, so no NaN
        query[0, :, 1] = float("nan")
        kwargs["query_positions"] = torch.tensor([[9, -1, 5], [9, 9, 9]])
    elif kind == "nan in a padded key":  # masked key: probability 0, so no NaN
        key[0, :, 2] = float("nan")
        mask = torch.ones(2, 10, dtype=torch.bool)
        mask[0, 2] = False
        kwargs["key_padding_mask"] = mask
    elif kind == "nan after the causal limit":  # no row sees key 8, so no NaN
        key[0, :, 8] = float("nan")
        kwargs["query_positions"] = torch.tensor([[7, 3, 5], [9, 9, 9]])
    return query, key, kwargs


NAN_CASES = ["nan query row", "nan key", "inf key", "inf query", "only -inf scores", "nan in a skipped row",
             "nan in a padded key", "nan after the causal limit"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", NAN_CASES)
def test_non_finite_inputs_propagate_like_the_reference(device, kind):
    """One NaN in a query row used to give all-zero (or plausible) importance; now NaN where the reference is."""
    query, key, kwargs = _nan_case(kind, torch.Generator().manual_seed(zlib.crc32(kind.encode())))
    expected = reference.attention_importance(query, key, **kwargs)
    kwargs = {name: value.to(device) for name, value in kwargs.items()}
    got = ops.attention_importance(query.to(device), key.to(device), **kwargs).cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    poisoned = kind not in ("nan in a skipped row", "nan in a padded key", "nan after the causal limit")
    assert bool(torch.isnan(got[0]).all()) == poisoned  # the whole sample, never a part of it
    assert torch.isfinite(got[1]).all()  # the other sample is untouched
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-6, equal_nan=True)


def test_head_dim_zero_is_rejected():
    with pytest.raises(RuntimeError, match="head dim D > 0"):
        ops.attention_importance(torch.randn(2, 4, 3, 0), torch.randn(2, 2, 10, 0))
