"""Training data of a run: the fixed train/test split, the rows each process trains on, fresh and streamed rows.

Three data modes, one interface (`TrainData.micro_batches(step)`):

- fixed (default): data.num_samples examples drawn once, the train split reshuffled every epoch;
- fresh (data.fresh_samples): new examples every step, drawn row by row from a generator seeded by
  (seed, step, global row) (`row_seed`), so any world size draws the same rows and resuming needs no state;
- stream (text with data.text_carry_state): step s trains on segment s of contiguous rows of the corpus, each row's
  detached model state carried to the next step (truncated back-propagation through time).

Under torchrun `training.batch_size` is the global micro-batch: rank r trains on a contiguous 1/W of each micro-batch's
rows (`rank_rows`), so the union over the ranks is exactly what one process would train on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from titans.models import detach_state
from titans.tasks import make_task
from titans.tasks.base import IGNORE_INDEX, Batch, Task

if TYPE_CHECKING:
    from titans.config import RunConfig

_MASK64 = (1 << 64) - 1


def make_datasets(cfg: RunConfig, task: Task) -> tuple[Batch, Batch]:
    """(train, test) examples: data.num_samples drawn once from a generator seeded with cfg.seed and split by
    `cfg.data.split_sizes()`, the first `test` of them held out (the seed's meaning of num_samples).

    A task over a real corpus (one with `iter_segments`, e.g. text) is tested on its held-out "valid" split instead:
    `test` rows of seq_len bytes from evenly spaced places, so no test window overlaps the training text. `titans
    eval` rebuilds the same split, so a checkpoint is always scored on examples it never trained on.
    """
    n_train, n_test = cfg.data.split_sizes()
    data = task.sample(cfg.data.num_samples, torch.Generator().manual_seed(cfg.seed))
    if hasattr(task, "iter_segments"):
        return data[n_test:], next(iter(task.iter_segments("valid", task.seq_len, n_test)))
    return data[n_test:], data[:n_test]


@dataclass
class MicroBatch:
    """One micro-step's rows on this process: `batch` [rows, T]; `scored` = its scored-token count (0 for the
    stand-in row of a process whose share of a short last micro-batch is empty); `row` = its first global row, the
    key of its carried state in stream mode."""

    batch: Batch
    scored: int
    row: int


class TrainData:
    """The training batches of every optimizer step of a run, and the state a checkpoint keeps to resume them.

    `micro_batches(step)` is a function of the step and the saved state alone, so a resumed run trains on exactly
    the rows the uninterrupted one would have. Saved in checkpoints: `epoch_order` (the current epoch's shuffle) and
    `generator` (the shuffles' random stream, inside the checkpoint's RNG states).
    """

    def __init__(self, cfg: RunConfig, task: Task, rank: int = 0, world_size: int = 1) -> None:
        t = cfg.training
        self.task, self.seed, self.rank, self.world_size = task, cfg.seed, rank, world_size
        self.micro_batch_size = t.batch_size
        self.train_set, self.test_set = make_datasets(cfg, task)
        if t.eval_samples:
            self.test_set = self.test_set[: t.eval_samples]
        self.fresh = cfg.data.fresh_samples
        # data.curriculum_lengths: the task at each shorter training length, which fresh rows are drawn from until the
        # curriculum reaches data.seq_len (`task_at`); evaluation keeps `task`
        self.data_config = cfg.data
        self.stage_tasks = {n: make_task(cfg.data.at_length(n)) for n in cfg.data.curriculum_lengths}
        self.examples_per_step = t.batch_size * t.grad_accum_steps
        self.steps_per_epoch = math.ceil(len(self.train_set) / self.examples_per_step)
        # Text with data.text_carry_state: step s trains on segment s (mod the epoch) of examples_per_step contiguous
        # rows of the train split, each micro-batch carrying its detached memory state to the next step (truncated
        # BPTT). Checkpoints hold no activations, so a resumed run restarts the carried state empty at its step.
        self.stream = cfg.data.dataset == "text" and cfg.data.text_carry_state
        self.carried: dict[int, Any] = {}
        if self.stream:
            self.steps_per_epoch = task.corpus.num_segments("train", task.seq_len, self.examples_per_step)
        # A separate stream for the shuffles, so the data set itself never depends on it. It advances identically on
        # every rank: all ranks see one permutation and take their rows of it.
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.epoch_order: torch.Tensor | None = None

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all processes at data.seq_len (the rate a progress line reports; the
        shorter steps of a curriculum train fewer)."""
        return self.examples_per_step * self.task.seq_len

    def task_at(self, step: int) -> Task:
        """The task optimizer step `step` draws fresh rows from: at its curriculum length, else `task`."""
        return self.stage_tasks.get(self.data_config.length_at(step), self.task)

    def total_steps(self, max_steps: int | None, max_epochs: int) -> int:
        """The run's optimizer steps: training.max_steps when set, else max_epochs whole epochs."""
        return max_steps if max_steps is not None else max_epochs * self.steps_per_epoch

    def micro_batches(self, step: int) -> list[MicroBatch]:
        """This process's micro-batches of optimizer step `step` (0-based), grad_accum_steps of them (or fewer in a
        short last step of an epoch); the same count on every process."""
        epoch, index_in_epoch = divmod(step, self.steps_per_epoch)
        # The step's global batch is rows [first, first + step_rows) of the epoch order (or fresh rows); this rank
        # trains on its contiguous 1/world_size of every micro-batch of it.
        first = index_in_epoch * self.examples_per_step
        step_rows = self.examples_per_step
        if self.stream:
            if index_in_epoch == 0:
                self.carried.clear()  # each epoch reads the rows from their first byte, with a fresh memory
            segment = self.task.corpus.segment("train", self.task.seq_len, self.examples_per_step, index_in_epoch)
        elif not self.fresh:
            if index_in_epoch == 0 or self.epoch_order is None:
                self.epoch_order = torch.randperm(len(self.train_set), generator=self.generator)
            step_rows = min(self.examples_per_step, len(self.train_set) - first)
        micro_batches = []
        for rows in rank_rows(step_rows, self.micro_batch_size, self.rank, self.world_size):
            # A rank whose share of a short last micro-batch is empty still joins the all-reduce: it runs one row
            # with weight 0 (its scored-token count).
            real = len(rows) > 0
            rows = rows if real else range(rows.start, rows.start + 1)
            if self.stream:
                micro = segment[rows.start : rows.stop]
            elif self.fresh:
                micro = sample_rows(self.task_at(step), self.seed, step, rows)
            else:
                micro = self.train_set[self.epoch_order[first + rows.start : first + rows.stop]]
            scored = int((micro.targets != IGNORE_INDEX).sum()) if real else 0
            micro_batches.append(MicroBatch(micro, scored, rows.start))
        return micro_batches

    def carried_state(self, micro: MicroBatch) -> Any:
        """The model state this micro-batch continues from: its rows' state after the previous step (stream mode),
        else None (a fresh state)."""
        return self.carried.get(micro.row)

    def carry(self, micro: MicroBatch, state: Any) -> None:
        """Keep the detached state after `micro` for the next step's same rows (stream mode only)."""
        if self.stream:
            self.carried[micro.row] = detach_state(state)


# ---------------------------------------------------------------------------------------------------------------------
# Which rows of the global batch each process trains on, and how fresh rows are drawn.


def rank_rows(num_rows: int, micro_batch_size: int, rank: int, world_size: int) -> list[range]:
    """This rank's global row indices for each micro-step of a step over `num_rows` rows.

    The step's rows are cut into micro-batches of `micro_batch_size` (the last may be shorter), and each
    micro-batch into `world_size` contiguous parts of near-equal size; rank r gets part r. With micro-batches
    divisible by the world size, rank r's part of micro-batch k is rows [k*B + r*B/W, k*B + (r+1)*B/W). A part can
    be empty when a short last micro-batch has fewer rows than there are ranks.
    Returns ceil(num_rows / micro_batch_size) ranges, the same count on every rank (each rank must take part in
    every micro-step's gradient all-reduce).
    """
    if num_rows < 1 or micro_batch_size < 1:
        raise ValueError(f"num_rows and micro_batch_size must be >= 1, got {num_rows} and {micro_batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    parts = []
    for start in range(0, num_rows, micro_batch_size):
        size = min(micro_batch_size, num_rows - start)
        parts.append(range(start + size * rank // world_size, start + size * (rank + 1) // world_size))
    return parts


def _mix64(x: int) -> int:
    # splitmix64's finaliser: nearby inputs (consecutive steps or rows) give unrelated 64-bit outputs.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, step: int, row: int) -> int:
    """The generator seed of fresh-sample row `row` of optimizer step `step` (0-based), in [0, 2**63).

    A function of the global row, not of the rank that draws it: any world size draws the same rows.
    """
    if min(seed, step, row) < 0:
        raise ValueError(f"seed, step and row must be >= 0, got seed={seed}, step={step}, row={row}")
    return _mix64(_mix64(_mix64(seed) ^ step) ^ row) >> 1


def sample_rows(task: Task, seed: int, step: int, rows: range) -> Batch:
    """Fresh examples for global rows `rows` of step `step`: row i is task.sample(1, Generator(row_seed(...))).

    Returns a Batch with inputs / targets [len(rows), T]. Stateless, so resuming needs no generator state.
    """
    if len(rows) == 0:
        raise ValueError(f"sample_rows needs at least one row, got {rows}")
    parts = [task.sample(1, torch.Generator().manual_seed(row_seed(seed, step, row))) for row in rows]
    return Batch(torch.cat([p.inputs for p in parts]), torch.cat([p.targets for p in parts]))


def check_batch_divisible(batch_size: int, world_size: int) -> None:
    """training.batch_size is the global micro-batch; every rank must get the same number of rows of it."""
    if batch_size % world_size != 0:
        raise ValueError(
            f"training.batch_size={batch_size} is the global batch and must be divisible by the {world_size} "
            f"processes (each gets batch_size / world_size rows); set training.batch_size to a multiple of "
            f"{world_size} or change --nproc_per_node"
        )
