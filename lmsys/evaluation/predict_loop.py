"""Running the model over every pair of a split, in each of its formats and one or both orientations: length-sorted
micro-batches, sharded over processes, gathered so that every pair gets exactly one prediction per format and
orientation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from lmsys.config import InputFormat
from lmsys.data.batching import Batching, Example, collate, prediction_batches, swap_tree
from lmsys.data.dataset import EncodedSplit
from lmsys.data.schema import swap_abt
from lmsys.evaluation.metrics import tta_combine
from lmsys.training.distributed import lockstep_count
from lmsys.training.signals import raise_if_stop_requested, stop_check_steps

LOGIT_COLUMNS = ("logit_a", "logit_b", "logit_tie")
# The (B, A) pass mapped back to (A, B, tie) order: swapped_logit_a is A's logit although A was shown second.
SWAPPED_LOGIT_COLUMNS = ("swapped_logit_a", "swapped_logit_b", "swapped_logit_tie")


@dataclass
class SplitPredictions:
    format_logits_ab: list[np.ndarray]  # [format] (N, C): the (A, B) orientation
    format_logits_ba: list[np.ndarray] | None  # [format] (N, C): the (B, A) orientation, in its own (B, A, tie) order

    @property
    def logits_ab(self) -> np.ndarray:
        """(N, C) the first (primary) format's (A, B) logits."""
        return self.format_logits_ab[0]

    @property
    def logits_ba(self) -> np.ndarray | None:
        """(N, C) the first (primary) format's (B, A) logits, in (B, A, tie) order."""
        return None if self.format_logits_ba is None else self.format_logits_ba[0]

    @property
    def all_logits(self) -> list[np.ndarray]:
        """Every format's logits of every orientation run."""
        return [*self.format_logits_ab, *(self.format_logits_ba or [])]

    @property
    def probs_ab(self) -> np.ndarray:
        """(N, C) the (A, B) orientation's probabilities, averaged over the formats."""
        return np.mean([softmax(logits) for logits in self.format_logits_ab], axis=0)

    @property
    def probs_ba_back(self) -> np.ndarray | None:
        """The swapped passes mapped back to (A, B, tie) (their first column is B's win probability, i.e. A's),
        averaged over the formats."""
        if self.format_logits_ba is None:
            return None
        return np.mean([swap_abt(softmax(logits)) for logits in self.format_logits_ba], axis=0)

    def combined(self, tta_mode: str) -> np.ndarray:
        if self.logits_ba is None:
            return self.probs_ab
        return tta_combine(self.probs_ab, self.probs_ba_back, tta_mode)

    def logits_table(self, format_index: int = 0, suffix: str = "") -> pd.DataFrame:
        """One format's logits as columns, in pair order: LOGIT_COLUMNS, and with TTA SWAPPED_LOGIT_COLUMNS (the
        swapped pass in (A, B, tie) order; the first two of each for a two-class model), names + `suffix`."""
        logits_ab = self.format_logits_ab[format_index]
        width = logits_ab.shape[1]
        frame = pd.DataFrame(logits_ab, columns=[c + suffix for c in LOGIT_COLUMNS[:width]])
        if self.format_logits_ba is not None:
            frame[[c + suffix for c in SWAPPED_LOGIT_COLUMNS[:width]]] = swap_abt(self.format_logits_ba[format_index])
        return frame


    def logits_columns(self, formats: tuple[InputFormat, ...]) -> pd.DataFrame:
        """The first format's logits under the plain names (as teacher files read them) and, with several formats,
        every format's under the same names suffixed _<format> (logit_a_papb, swapped_logit_a_papb, ...)."""
        tables = [self.logits_table()]
        if len(formats) > 1:
            tables += [self.logits_table(k, f"_{fmt.value}") for k, fmt in enumerate(formats)]
        return pd.concat(tables, axis=1)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(-1, keepdims=True)


def predict_split(
    model: torch.nn.Module,
    split: EncodedSplit,
    tta: bool,
    batching: Batching,
    accelerator,
    show_progress: bool = True,
    share_prefixes: bool = True,
) -> SplitPredictions:
    """Logits for every pair in every format of the split (both orientations with `tta`), identical whatever the
    number of processes.

    With `tta` and `share_prefixes`, where the model attends them exactly (packed rows on the CPU sdpa kernel:
    PreferenceModel.shares_prefixes), each format runs in one pass of swap trees (lmsys.data.batching.swap_tree):
    a pair's two orientations in one example, their common prefix computed once. A pair and the pair with A and B
    exchanged make the same tree, so the (A, B) logits of a file with A and B exchanged row by row are this file's
    (B, A) logits to the bit. Otherwise each (format, orientation) runs in its own pass; then the (A, B) pass of
    the exchanged file meets exactly the micro-batches of this file's (B, A) pass, and TTA predictions are again
    swap-symmetric to the bit, even where a kernel's rounding depends on the batch shape (bitsandbytes' CPU 4-bit
    GEMM rounds to bfloat16).
    """
    was_training = model.training
    model.eval()
    if tta and share_prefixes and batching.packed and _attends_swap_trees(model, split):
        both = [predict_swap_trees(model, forward, swapped, batching, accelerator, show_progress)
                for forward, swapped in zip(split.forward_by_format, split.swapped_by_format, strict=True)]
        forward, swapped = [ab for ab, _ in both], [ba for _, ba in both]
    else:
        forward = [predict_examples(model, examples, batching, accelerator, show_progress)
                   for examples in split.forward_by_format]
        swapped = [predict_examples(model, examples, batching, accelerator, show_progress)
                   for examples in split.swapped_by_format] if tta else None
    model.train(was_training)
    return SplitPredictions(forward, swapped)


def _attends_swap_trees(model: torch.nn.Module, split: EncodedSplit) -> bool:
    """PreferenceModel.shares_prefixes for the split's longest sequence; False for any other model."""
    shares_prefixes = getattr(model, "shares_prefixes", None)
    if shares_prefixes is None:
        return False
    examples = (*split.forward_by_format, *split.swapped_by_format)
    return shares_prefixes(max((len(ex.ids) for format_examples in examples for ex in format_examples), default=0))


def predict_swap_trees(model: torch.nn.Module, forward: list[Example], swapped: list[Example], batching: Batching,
                       accelerator, show_progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) logits of the (A, B) and of the (B, A) examples (each in its own class order), from one pass over
    their swap trees."""
    trees = [swap_tree(ab, ba) for ab, ba in zip(forward, swapped, strict=True)]
    both = predict_examples(model, trees, batching, accelerator, show_progress)  # (N, 2, C): the trees' sequences
    swapped_first = np.zeros(len(both), dtype=bool)
    swapped_first[[tree.pair_index for tree in trees]] = [tree.swapped for tree in trees]
    first, second = both[:, 0], both[:, 1]
    return (np.where(swapped_first[:, None], second, first), np.where(swapped_first[:, None], first, second))


@torch.inference_mode()
def predict_examples(
    model: torch.nn.Module, examples: list[Example], batching: Batching, accelerator, show_progress: bool
) -> np.ndarray:
    """(N, C) logits of one example per pair, in pair order ((N, 2, C) of swap trees' two sequences), the same to
    the bit whatever the number of processes:
    the micro-batches are cut from the whole length-sorted list, as one process would, and each process runs every
    num_processes-th of them, so every pair meets the same batch composition (bf16 and the CPU 4-bit GEMM round
    differently in another batch). The results are gathered. Inside a GracefulStop a signal raises StopRequested at
    the next checked micro-batch (see stop_check_steps), on every process."""
    groups = process_batches(examples, batching, accelerator.process_index, accelerator.num_processes)
    results = []
    bar = tqdm(total=sum(map(len, groups)), desc="predict", disable=not (show_progress and accelerator.is_main_process),
               leave=False)
    checks = stop_check_steps(len(groups), accelerator)
    # FSDP: every rank runs as many forwards as the busiest one (each is a collective); the repeats are discarded
    for k in range(lockstep_count(model, len(groups), accelerator.device)):
        if k in checks:
            raise_if_stop_requested(accelerator)
        group = groups[k] if k < len(groups) else (groups or [examples[:1]])[-1]
        logits = model(**collate(group, batching).model_inputs(accelerator.device)).float().cpu().numpy()
        if len(logits) != len(group):  # swap trees: (2n, C) of their sequences -> (n, 2, C)
            logits = logits.reshape(len(group), -1, logits.shape[-1])
        if k < len(groups):
            results += [(ex.pair_index, row) for ex, row in zip(group, logits, strict=True)]
            bar.update(len(group))
    bar.close()
    gathered = gather_object(results) if accelerator.num_processes > 1 else results
    return _assemble(gathered, len(examples))


def process_batches(examples: list[Example], batching: Batching, process_index: int, num_processes: int
                    ) -> list[list[Example]]:
    """This process's share of the prediction micro-batches: every num_processes-th of those one process would run,
    longest first (an out-of-memory error shows at once)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))
    return prediction_batches([examples[i] for i in order], batching)[process_index::num_processes]


def _assemble(results: list[tuple[int, np.ndarray]], n_pairs: int) -> np.ndarray:
    shape = results[0][1].shape if results else (0,)
    logits = np.full((n_pairs, *shape), np.nan)
    seen = np.zeros(n_pairs, dtype=int)
    for pair_index, row in results:
        logits[pair_index] = row
        seen[pair_index] += 1
    if not (seen == 1).all():
        raise RuntimeError(f"prediction gather lost or duplicated pairs: {int((seen != 1).sum())} of {n_pairs}")
    return logits
