"""Running the model over every pair of a split, in one or both orientations: length-sorted micro-batches,
sharded over processes, gathered so that every pair gets exactly one prediction per orientation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from lmsys.config import PaddingSide
from lmsys.data.batching import Example, collate, fill_by_count, fill_by_tokens
from lmsys.data.dataset import EncodedSplit
from lmsys.data.schema import swap_abt
from lmsys.evaluation.metrics import tta_combine
from lmsys.training.distributed import lockstep_count


@dataclass(frozen=True)
class InferenceBatching:
    packed: bool
    max_tokens: int  # packed: tokens per micro-batch
    row_tokens: int  # packed: tokens per row of a micro-batch
    batch_size: int  # padded: pairs per micro-batch
    pad_id: int
    padding_side: PaddingSide
    attention_width: float | None = None  # packed: see lmsys.modeling.families.attention_width


@dataclass
class SplitPredictions:
    logits_ab: np.ndarray  # (N, 3) the (A, B) orientation
    logits_ba: np.ndarray | None  # (N, 3) the (B, A) orientation, in its own (B, A, tie) order

    @property
    def probs_ab(self) -> np.ndarray:
        return softmax(self.logits_ab)

    @property
    def probs_ba_back(self) -> np.ndarray | None:
        """The swapped pass mapped back to (A, B, tie): its first column is B's win probability, i.e. A's."""
        return None if self.logits_ba is None else swap_abt(softmax(self.logits_ba))

    def combined(self, tta_mode: str) -> np.ndarray:
        if self.logits_ba is None:
            return self.probs_ab
        return tta_combine(self.probs_ab, self.probs_ba_back, tta_mode)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(-1, keepdims=True)


@torch.inference_mode()
def predict_split(
    model: torch.nn.Module,
    split: EncodedSplit,
    tta: bool,
    batching: InferenceBatching,
    accelerator,
    show_progress: bool = True,
) -> SplitPredictions:
    """Logits for every pair (both orientations with `tta`), identical whatever the number of processes."""
    examples = split.forward + (split.swapped if tta else [])
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))  # longest first: OOM shows at once
    mine = [examples[i] for i in order[accelerator.process_index :: accelerator.num_processes]]
    was_training = model.training
    model.eval()
    results = []
    bar = tqdm(total=len(mine), desc="predict", disable=not (show_progress and accelerator.is_main_process), leave=False)
    groups = _micro_batches(mine, batching)
    # FSDP: every rank runs as many forwards as the busiest one (each is a collective); repeats are discarded
    n_runs = lockstep_count(model, len(groups), accelerator.device)
    for k in range(n_runs):
        group = groups[k] if k < len(groups) else (groups or [examples[:1]])[-1]
        batch = collate(group, batching.packed, batching.pad_id, batching.padding_side, batching.row_tokens,
                        batching.attention_width)
        logits = model(**batch.model_inputs(accelerator.device)).float().cpu().numpy()
        if k < len(groups):
            results += [(ex.pair_index, ex.swapped, row) for ex, row in zip(group, logits, strict=True)]
            bar.update(len(group))
    bar.close()
    model.train(was_training)
    gathered = gather_object(results) if accelerator.num_processes > 1 else results
    return _assemble(gathered, len(split), tta)


def _micro_batches(examples: list[Example], batching: InferenceBatching) -> list[list[Example]]:
    if batching.packed:
        groups = fill_by_tokens([len(ex.ids) for ex in examples], batching.max_tokens)
    else:
        groups = fill_by_count(len(examples), batching.batch_size)
    return [[examples[i] for i in group] for group in groups]


def _assemble(results: list[tuple[int, bool, np.ndarray]], n_pairs: int, tta: bool) -> SplitPredictions:
    logits = {False: np.full((n_pairs, 3), np.nan), True: np.full((n_pairs, 3), np.nan)}
    seen = {False: np.zeros(n_pairs, dtype=int), True: np.zeros(n_pairs, dtype=int)}
    for pair_index, swapped, row in results:
        logits[swapped][pair_index] = row
        seen[swapped][pair_index] += 1
    for swapped in (False, True) if tta else (False,):
        if not (seen[swapped] == 1).all():
            raise RuntimeError(f"prediction gather lost or duplicated pairs (swapped={swapped})")
    return SplitPredictions(logits[False], logits[True] if tta else None)
