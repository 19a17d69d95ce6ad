"""Data order of `python -m epic_ext.train`: which samples each rank draws, epoch by epoch.

Two samplers with one interface (`take`, `state`, `load`, `samples_per_epoch`); the checkpointed state of both is
(epoch, offset), so a resume recomputes the epoch's order from the seed and continues at the offset.

- `Sampler`: a seeded permutation per epoch, dealt round-robin to the ranks (the default).
- `GroupedSampler` (`--group-by-length`): LLaVA's `group_by_modality_length`, kept exact on resume. Per epoch, each
  modality (text-only, multimodal) is permuted, cut into sort windows, each window sorted by estimated length
  (longest first) and cut into megabatches of world * micro_batch_size samples; the megabatches of both modalities
  are shuffled together, and rank r takes slice [r * mbs, (r + 1) * mbs) of every megabatch. A micro-batch thus
  holds samples of one modality and similar lengths, and the ranks' micro-batches of one step come from the same
  megabatch. A modality's last partial megabatch (fewer than world * mbs samples) is left out of that epoch, a
  different set each epoch, as the plain sampler leaves out the last size % world samples.

Lengths come from `estimate_lengths`: no image is decoded and nothing is tokenized.
"""

from __future__ import annotations

import abc

import torch

from ..data.records import image_names, video_frames

# Visual tokens an image (or video frame) is counted as when the family's count varies with the image size
# (Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision's anyres): an ordering estimate, not the real count. It only decides where
# records with different numbers of images fall among the multimodal ones; LLaVA's recipe uses 128 for the same.
DYNAMIC_VISUAL_TOKENS_ESTIMATE = 128

# Megabatches sorted together: a larger window groups lengths more tightly and makes batches less random
# (HF transformers' LengthGroupedSampler sorts windows of 50 batches).
SORT_WINDOW_MEGABATCHES = 50

_IMAGE_PLACEHOLDERS = ("<image>", "<video>")


def estimate_lengths(records, visual_tokens_per_image: int | None) -> tuple[list[int], list[bool]]:
    """Estimated token length and modality of every record, cheap at any scale and the same on every rank.

    The text is counted in whitespace-separated words over every turn (placeholders removed): LLaVA's proxy for
    its tokens (a BPE tokenizer gives about 1.3 tokens per English word, the same factor for every record, so the
    order within a modality is what a tokenizer would give up to that spread). Each image and each video frame
    adds `visual_tokens_per_image`, or DYNAMIC_VISUAL_TOKENS_ESTIMATE for families whose count varies.

    Args:
        records: LLaVA-format records (epic_ext.data.records), in dataset order.
        visual_tokens_per_image: the family's visual tokens per image (Family.visual_tokens_per_image), or None.

    Returns:
        (lengths, multimodal): one int and one bool per record; multimodal is True for records with images or
        a video.
    """
    per_image = DYNAMIC_VISUAL_TOKENS_ESTIMATE if visual_tokens_per_image is None else visual_tokens_per_image
    lengths, multimodal = [], []
    for record in records:
        words = 0
        for turn in record["conversations"]:
            text = turn["value"]
            for placeholder in _IMAGE_PLACEHOLDERS:
                text = text.replace(placeholder, " ")
            words += len(text.split())
        visuals = len(image_names(record)) + len(video_frames(record))
        lengths.append(words + per_image * visuals)
        multimodal.append(visuals > 0)
    return lengths, multimodal


class _Cursor(abc.ABC):
    """The (epoch, offset) position in a rank's per-epoch order; subclasses give `_shard(epoch)`."""

    def _start(self) -> None:
        self.epoch, self.offset = 0, 0
        self._order = self._shard(0)

    @abc.abstractmethod
    def _shard(self, epoch: int) -> list[int]:
        """This rank's dataset indices for `epoch`, in order."""

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank draws per epoch (the same on every rank)."""
        return len(self._order)

    def take(self, count: int) -> list[int]:
        """The next `count` dataset indices of this rank, moving to the next epoch's order when one runs out."""
        out = []
        while len(out) < count:
            if self.offset >= len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._shard(self.epoch)
            out.append(self._order[self.offset])
            self.offset += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load(self, state: dict) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = self._shard(self.epoch)


class Sampler(_Cursor):
    """Deterministic epoch permutations (seed + epoch), sharded by rank; the cursor is the checkpointed position."""

    def __init__(self, size: int, rank: int, world: int, seed: int):
        if size < world:
            raise ValueError(f"the dataset has {size} samples, fewer than the {world} processes")
        self.size, self.rank, self.world, self.seed = size, rank, world, seed
        self._start()

    def _shard(self, epoch: int) -> list[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        usable = self.size - self.size % self.world
        return order[:usable][self.rank :: self.world]


class GroupedSampler(_Cursor):
    """Modality-aware length grouping (see the module docstring); deterministic per (seed, epoch).

    Args:
        lengths: estimated length of every sample (estimate_lengths), in dataset order.
        multimodal: whether each sample has images or a video.
        rank, world: this process and the number of processes.
        seed: the run's seed.
        micro_batch_size: samples per rank and micro-batch; `take` must be called with multiples of it for a
            micro-batch to stay within one megabatch (the training loop takes exactly this many).
        window: megabatches sorted together (SORT_WINDOW_MEGABATCHES).

    Raises:
        ValueError: a modality present in the data has fewer samples than one megabatch (world * micro_batch_size):
            those samples would never be drawn.
    """

    def __init__(self, lengths, multimodal, rank: int, world: int, seed: int, micro_batch_size: int,
                 window: int = SORT_WINDOW_MEGABATCHES):
        if len(lengths) != len(multimodal):
            raise ValueError(f"{len(lengths)} lengths for {len(multimodal)} modality flags")
        if not 0 <= rank < world or micro_batch_size < 1 or window < 1:
            raise ValueError(f"bad rank {rank} / world {world} / micro-batch size {micro_batch_size} / window "
                             f"{window}")
        self.lengths = [int(length) for length in lengths]
        self.rank, self.world, self.seed, self.micro_batch_size, self.window = (rank, world, seed, micro_batch_size,
                                                                                  window)
        self.megabatch = world * micro_batch_size
        self.groups = [[i for i, flag in enumerate(multimodal) if not flag],
                       [i for i, flag in enumerate(multimodal) if flag]]
        for name, group in zip(("text-only", "multimodal"), self.groups):
            if 0 < len(group) < self.megabatch:
                raise ValueError(f"{len(group)} {name} samples, fewer than one megabatch of {world} processes x "
                                 f"{micro_batch_size} samples: they would never be drawn")
        self._start()

    def describe(self) -> str:
        """One line for the log: the samples per modality and how many an epoch leaves out."""
        text, multi = (len(group) for group in self.groups)
        left_out = sum(len(group) % self.megabatch for group in self.groups)
        return (f"{text} text-only and {multi} multimodal samples in megabatches of {self.megabatch}; "
                f"{left_out} left out per epoch (a different set each epoch)")

    def megabatches(self, epoch: int) -> list[list[int]]:
        """The epoch's megabatches in drawing order, each of one modality and sorted longest first."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        out = []
        for group in self.groups:
            order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            usable = len(order) - len(order) % self.megabatch
            span = self.megabatch * self.window
            for start in range(0, usable, span):
                window = sorted(order[start : min(start + span, usable)], key=lambda i: -self.lengths[i])
                out.extend(window[k : k + self.megabatch] for k in range(0, len(window), self.megabatch))
        return [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]

    def _shard(self, epoch: int) -> list[int]:
        low, high = self.rank * self.micro_batch_size, (self.rank + 1) * self.micro_batch_size
        return [index for megabatch in self.megabatches(epoch) for index in megabatch[low:high]]
