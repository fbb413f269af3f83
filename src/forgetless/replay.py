"""A bounded replay buffer for continual training: a uniform sample of earlier stages' rows.

Reservoir sampling (Vitter's algorithm R): after ``seen`` rows were offered, each of them is in
the buffer with probability ``size / seen``, whatever the stage it came from, and the buffer
never holds more than ``size`` rows. Seeded, so every method of a continual run replays the
same rows. A later stage mixes the buffer in as one more ``mix:`` source at the replay share.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from forgetless.data import Example, load_examples
from forgetless.errors import ForgetlessError
from forgetless.io import atomic_write_text


class ReplayBuffer:
    """At most ``size`` rows, a uniform sample of all rows ``add`` was given."""

    def __init__(self, size: int, seed: int = 0) -> None:
        if size < 1:
            raise ForgetlessError("replay: size must be at least 1")
        self.size = size
        self.seen = 0
        self.rows: list[Any] = []
        self._rng = random.Random(f"replay:{seed}")

    def add(self, rows: list[Any]) -> None:
        for row in rows:
            self.seen += 1
            if len(self.rows) < self.size:
                self.rows.append(row)
            else:
                slot = self._rng.randrange(self.seen)
                if slot < self.size:
                    self.rows[slot] = row

    def save(self, path: str | Path) -> Path:
        """The buffer as a JSONL data file (chat ``messages``, image paths absolute), written
        atomically; what ``mix:`` reads."""
        path = Path(path)
        lines = []
        for row in self.rows:
            example = row if isinstance(row, Example) else Example(row)
            record: dict[str, Any] = {"messages": example.messages}
            if example.images:
                if not all(isinstance(image, str | Path) for image in example.images):
                    raise ForgetlessError("replay: rows with in-memory images cannot be saved "
                                          "(give the stage's images as files)")
                record["images"] = [str(Path(image).resolve()) for image in example.images]
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        atomic_write_text(path, "".join(lines))
        return path


class ReplaySettings(BaseModel):
    """``replay:`` of a continual run: after each stage its training rows enter a reservoir of
    ``size`` rows, and every later stage trains with ``share`` of its examples from it."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(1000, ge=1)
    share: float = Field(0.2, gt=0.0, lt=1.0)  # of each later stage's training examples
    seed: int = 0


def stage_rows(data: str, train: dict[str, Any]) -> list[Example]:
    """The rows a stage trains on, as ``build_dataset`` picks them: its data shuffled by the
    run's seed, cut at ``limit``."""

    examples = load_examples(data, "train")
    order = list(range(len(examples)))
    random.Random(train.get("seed", 0)).shuffle(order)
    limit = train.get("limit")
    return [examples[i] for i in (order[:limit] if limit else order)]


def replay_files(settings: ReplaySettings, stages: list[tuple[str, dict[str, Any]]],
                 folder: Path) -> list[dict[str, Any] | None]:
    """For each stage (data, TrainConfig keys), the ``mix:`` entry replaying the stages before
    it (None for the first); buffers are written as ``folder/stage<k>.jsonl``. Replayed rows are
    earlier training rows, not general data: no held-out exclusion (``exclude: []``)."""
    buffer = ReplayBuffer(settings.size, settings.seed)
    out: list[dict[str, Any] | None] = []
    for index, (data, train) in enumerate(stages, start=1):
        if index == 1:
            out.append(None)
        else:
            path = buffer.save(folder / f"stage{index}.jsonl")
            out.append({"source": str(path), "ratio": settings.share, "exclude": []})
        buffer.add(stage_rows(data, train))
    return out
