"""A mixed-length, mixed-modality training set for --group-by-length: the demo shapes task's image records plus
text-only records of varied lengths, written beside them (used by the grouping tests and bench/bench_grouping.py)."""

from __future__ import annotations

import json
import pathlib
import random


def add_text_only_records(image_data: str | pathlib.Path, out: str | pathlib.Path, count: int, seed: int = 0,
                          min_words: int = 4, max_words: int = 90) -> str:
    """Writes `out`: the records of `image_data` plus `count` text-only records whose questions have a uniform
    random number of words in [min_words, max_words] (demo vocabulary, so the tiny tokenizer knows them), shuffled
    together. Returns out as a str."""
    from epic_ext.demo.task import COLORS, SHAPES

    rng = random.Random(f"grouping/{seed}")
    words = [*COLORS, *SHAPES, "a", "the", "in", "row", "column", ","]
    records = json.loads(pathlib.Path(image_data).read_text())
    for index in range(count):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words)))
        records.append({"id": f"text-{index:06d}", "conversations": [
            {"from": "human", "value": f"how many shapes are there ? {question}"},
            {"from": "gpt", "value": rng.choice(("yes", "no"))}]})
    rng.shuffle(records)
    pathlib.Path(out).write_text(json.dumps(records))
    return str(out)
