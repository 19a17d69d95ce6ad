"""--group-by-length (epic_ext.train.sampling): the grouped sampler's properties on synthetic lengths and
modalities over several world sizes, the length estimate, and one DeepSpeed CPU run on a mixed data set that
resumes exactly."""

from __future__ import annotations

import random

import pytest
import torch
from helpers.grouping_assets import add_text_only_records
from helpers.train_runs import losses, one_error_line, resume_matches_uninterrupted, run_train

from epic_ext.train import loop
from epic_ext.train.sampling import DYNAMIC_VISUAL_TOKENS_ESTIMATE, GroupedSampler, Sampler, estimate_lengths

# (text-only, multimodal) sample counts: uneven on purpose, so every world size leaves leftovers
SIZES = [(97, 203), (40, 0), (0, 61), (131, 17)]
WORLDS = [1, 2, 3, 4]


def synthetic(n_text: int, n_multi: int, seed: int = 0) -> tuple[list[int], list[bool]]:
    """Text-only lengths 5..700, multimodal 580..1200 (576 visual tokens plus text), shuffled together."""
    rng = random.Random(seed)
    items = [(rng.randint(5, 700), False) for _ in range(n_text)] + [(576 + rng.randint(4, 600), True)
                                                                       for _ in range(n_multi)]
    rng.shuffle(items)
    return [length for length, _ in items], [flag for _, flag in items]


def samplers(lengths, multimodal, world, mbs, seed=0, **kwargs):
    return [GroupedSampler(lengths, multimodal, rank, world, seed, mbs, **kwargs) for rank in range(world)]


def steps_of_epoch(ranks, mbs):
    """[step][rank] -> the micro-batch (indices) each rank draws, for one epoch."""
    per_epoch = ranks[0].samples_per_epoch
    assert all(r.samples_per_epoch == per_epoch for r in ranks)
    return [[r.take(mbs) for r in ranks] for _ in range(per_epoch // mbs)]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("mbs", [1, 3])
@pytest.mark.parametrize("sizes", SIZES)
def test_each_index_at_most_once_and_leftovers_bounded(world, mbs, sizes):
    lengths, multimodal = synthetic(*sizes)
    megabatch = world * mbs
    if any(0 < n < megabatch for n in sizes):
        with pytest.raises(ValueError, match="never be drawn"):
            samplers(lengths, multimodal, world, mbs)
        return
    ranks = samplers(lengths, multimodal, world, mbs, window=4)
    for epoch in range(2):
        drawn = [i for step in steps_of_epoch(ranks, mbs) for batch in step for i in batch]
        assert len(drawn) == len(set(drawn))  # at most once per epoch, over all ranks
        for flag, n in ((False, sizes[0]), (True, sizes[1])):
            seen = sum(1 for i in drawn if multimodal[i] == flag)
            assert seen == n - n % megabatch, (epoch, flag)  # only a partial megabatch is left out
        assert all(r.epoch == epoch and r.offset == r.samples_per_epoch for r in ranks)
        for r in ranks:  # the next take moves on to the next epoch
            r.take(mbs)
            r.load({"epoch": epoch + 1, "offset": 0})


@pytest.mark.parametrize("world", WORLDS)
def test_every_index_exactly_once_when_groups_divide(world):
    lengths, multimodal = synthetic(world * 2 * 7, world * 2 * 5, seed=4)
    ranks = samplers(lengths, multimodal, world, 2)
    drawn = sorted(i for step in steps_of_epoch(ranks, 2) for batch in step for i in batch)
    assert drawn == list(range(len(lengths)))


@pytest.mark.parametrize("world", WORLDS)
def test_no_step_mixes_modalities(world):
    lengths, multimodal = synthetic(97, 203, seed=1)
    ranks = samplers(lengths, multimodal, world, 3)
    both = set()
    for step in steps_of_epoch(ranks, 3):
        flags = {multimodal[i] for batch in step for i in batch}
        assert len(flags) == 1, step  # one megabatch: every rank's micro-batch of the step, one modality
        both |= flags
    assert both == {False, True}


def mean_spread(batches, lengths):
    return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)


def padding_fraction(batches, lengths):
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded


@pytest.mark.parametrize("world", [1, 2, 3])
def test_length_spread_within_micro_batches_is_small(world):
    lengths, multimodal = synthetic(400, 600, seed=2)
    mbs = 4
    grouped = [b for step in steps_of_epoch(samplers(lengths, multimodal, world, mbs), mbs) for b in step]
    plain_ranks = [Sampler(len(lengths), rank, world, 0) for rank in range(world)]
    plain = [b for step in steps_of_epoch(plain_ranks, mbs) for b in step]
    assert mean_spread(grouped, lengths) < 0.1 * mean_spread(plain, lengths)
    assert padding_fraction(grouped, lengths) < 0.25 * padding_fraction(plain, lengths)


def test_deterministic_per_seed_and_different_per_epoch():
    lengths, multimodal = synthetic(97, 203, seed=3)
    assert GroupedSampler(lengths, multimodal, 0, 3, 5, 2).describe().endswith(
        f"{97 % 6 + 203 % 6} left out per epoch (a different set each epoch)")
    a = GroupedSampler(lengths, multimodal, 1, 3, 5, 2)
    b = GroupedSampler(lengths, multimodal, 1, 3, 5, 2)
    other_seed = GroupedSampler(lengths, multimodal, 1, 3, 6, 2)
    per_epoch = a.samples_per_epoch
    first = a.take(per_epoch)
    assert first == b.take(per_epoch)
    assert first != other_seed.take(per_epoch)
    second = a.take(per_epoch)
    assert a.epoch == 1 and sorted(second) != second and second != first
    assert a.megabatches(1) == b.megabatches(1) and a.megabatches(0) != a.megabatches(1)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("cut", [0, 7, 31])  # micro-batches drawn before the checkpoint; 31 crosses an epoch
def test_state_load_resumes_the_same_sequence(world, cut):
    lengths, multimodal = synthetic(61, 83, seed=5)
    mbs = 2
    for rank in range(world):
        full = GroupedSampler(lengths, multimodal, rank, world, 9, mbs)
        expected = [full.take(mbs) for _ in range(60)]
        first = GroupedSampler(lengths, multimodal, rank, world, 9, mbs)
        got = [first.take(mbs) for _ in range(cut)]
        state = dict(first.state())
        assert set(state) == {"epoch", "offset"}  # the checkpoint's shape is the plain sampler's
        resumed = GroupedSampler(lengths, multimodal, rank, world, 9, mbs)
        resumed.load(state)
        got += [resumed.take(mbs) for _ in range(60 - cut)]
        assert got == expected, rank


def test_plain_sampler_unchanged_and_importable_from_loop():
    assert loop.Sampler is Sampler
    sampler = Sampler(23, 1, 3, 4)
    drawn = sampler.take(7 + 3)  # 7 per epoch: into the second
    expected = [torch.randperm(23, generator=torch.Generator().manual_seed(4 + epoch)).tolist()[:21][1::3]
                for epoch in (0, 1)]
    assert drawn == expected[0] + expected[1][:3]
    assert sampler.state() == {"epoch": 1, "offset": 3}


def test_estimate_lengths():
    records = [
        {"conversations": [{"from": "human", "value": "<image>\nwhat is it ?"}, {"from": "gpt", "value": "a cat"}],
         "image": "a.png"},
        {"conversations": [{"from": "human", "value": "<image> <image> two"}, {"from": "gpt", "value": "yes"}],
         "image": ["a.png", "b.png"]},
        {"conversations": [{"from": "human", "value": "<video> and"}, {"from": "gpt", "value": "no"}],
         "video": ["f0.png", "f1.png", "f2.png"]},
        {"conversations": [{"from": "human", "value": "one two three"}, {"from": "gpt", "value": "four"}]},
    ]
    assert estimate_lengths(records, 576) == ([6 + 576, 2 + 2 * 576, 2 + 3 * 576, 4], [True, True, True, False])
    lengths, _ = estimate_lengths(records, None)
    assert lengths[0] == 6 + DYNAMIC_VISUAL_TOKENS_ESTIMATE


# ---------------------------------------------------------------------------------------------- end to end --


@pytest.fixture(scope="module")
def mixed_assets(tmp_path_factory):
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    from helpers.train_assets import make_train_assets

    assets = make_train_assets(tmp_path_factory.mktemp("grouping"))
    mixed = add_text_only_records(assets["data"], assets["root"] / "mixed.json", count=64, seed=0)
    return dict(assets, data=mixed)


@pytest.mark.slow
def test_group_by_length_trains_and_resumes_exactly(mixed_assets, tmp_path):
    args = ("--zero", "2", "--max-steps", "6", "--save-steps", "3", "--grad-accum", "2", "--group-by-length")
    full, _ = resume_matches_uninterrupted(mixed_assets, tmp_path, *args, steps=6, kill_after=4)
    for row in full.values():
        assert row["loss"] == pytest.approx(row["loss"]) and abs(row["loss"]) < 1e3  # finite
        assert 0.0 <= row["padding_fraction"] < 1.0
    # the flag shapes the batches: a resume must keep it
    proc = run_train(mixed_assets, tmp_path / "cut", *args[:-1], "--resume", "auto", check=False)
    assert "--group-by-length" in one_error_line(proc)
    assert sorted(losses(tmp_path / "cut")) == list(range(1, 7))


@pytest.mark.slow
def test_group_by_length_with_two_processes(mixed_assets, tmp_path):
    """Every rank estimates the same lengths and draws its slice of the same megabatches (a rank drawing from
    another order would desynchronise the steps or hang the collectives)."""
    run_train(mixed_assets, tmp_path, "--zero", "2", "--max-steps", "3", "--group-by-length", nproc=2)
    rows = losses(tmp_path)
    assert sorted(rows) == [1, 2, 3]
    assert all(abs(row["loss"]) < 1e3 and 0.0 <= row["padding_fraction"] < 1.0 for row in rows.values())


@pytest.mark.slow
def test_preflight_refuses_a_modality_smaller_than_one_batch(mixed_assets, tmp_path):
    few = add_text_only_records(mixed_assets["test"], tmp_path / "few.json", count=3, seed=1)
    proc = run_train(dict(mixed_assets, data=few), tmp_path / "out", "--max-steps", "1", "--group-by-length",
                     check=False)
    line = one_error_line(proc)
    assert "--group-by-length" in line and "3 text-only records" in line
