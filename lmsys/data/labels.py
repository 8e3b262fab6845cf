"""The training targets of a run: three classes (A, B, tie) as read, or two (A, B) for WSDM-style runs, where a
tied row is an error, dropped or split by `data.ties`; teacher logits checked against the class count."""

from __future__ import annotations

import logging
from dataclasses import replace

from lmsys.config import Ties
from lmsys.data.io import TEACHER_COLUMN, DataError
from lmsys.data.schema import Pair

log = logging.getLogger("lmsys")


def to_classes(pairs: list[Pair], num_classes: int, ties: Ties, name: str) -> list[Pair]:
    """Pairs with `num_classes` targets. A row is tied when its tie probability is above 0: with two classes,
    `error` names the first tied rows, `drop` removes them (counted in the log), `split` gives the tie's mass to
    A and B equally (a tie label becomes 0.5 / 0.5)."""
    _check_teachers(pairs, num_classes, name)
    if num_classes == 3:
        return pairs
    tied = [pair for pair in pairs if pair.target[2] > 0]
    if tied and ties == Ties.error:
        raise DataError(f"{name}: {len(tied)} tied row(s) in a two-class run (model.num_classes=2), e.g. row ids "
                        f"{[pair.id for pair in tied[:5]]}; set data.ties=drop or data.ties=split")
    if ties == Ties.drop:
        if tied:
            log.info("%s: dropped %d tied row(s) of %d (data.ties=drop)", name, len(tied), len(pairs))
        pairs = [pair for pair in pairs if pair.target[2] == 0]
        if not pairs:
            raise DataError(f"{name}: every row is tied; nothing left to train on with data.ties=drop")
    return [replace(pair, target=_two_class(pair.target)) for pair in pairs]


def _two_class(target: tuple[float, ...]) -> tuple[float, float]:
    a, b, tie = target
    return a + tie / 2, b + tie / 2


def _check_teachers(pairs: list[Pair], num_classes: int, name: str) -> None:
    with_teacher = [pair for pair in pairs if pair.teacher_logits is not None]
    wrong = [pair for pair in with_teacher if len(pair.teacher_logits) != num_classes]
    if wrong:
        raise DataError(f"{name}: row id={wrong[0].id} column '{TEACHER_COLUMN}': {len(wrong[0].teacher_logits)} "
                        f"logits for a {num_classes}-class run")


def require_teachers(pairs: list[Pair], name: str) -> None:
    """Distillation (loss.kl_weight or loss.cosine_weight above 0) needs teacher logits on every training row."""
    missing = [pair.id for pair in pairs if pair.teacher_logits is None]
    if missing:
        raise DataError(f"{name}: row id={missing[0]} has no '{TEACHER_COLUMN}' ({len(missing)} rows), but "
                        f"loss.kl_weight / loss.cosine_weight need them; add them with python -m lmsys.teachers")


def without_unscored_ties(pairs: list[Pair], scored: set[str], what: str) -> list[Pair]:
    """The pairs less the tied ones a two-class model never scored, when it scored no tie: a two-class k-fold run
    with data.ties=drop never validated its tied rows, and a two-class student drops them all the same. Logged when
    they are all that is unscored; any other unscored pair is left for the caller's id check to name (a missing
    fold is named by a row it would have scored, not by a tie)."""
    tied = {pair.id for pair in pairs if pair.target is not None and pair.target[2] > 0}
    if tied & scored:  # ties were scored (data.ties=split): an unscored one is a gap like any other
        return pairs
    unscored = [pair for pair in pairs if pair.id not in scored]
    ties = {pair.id for pair in unscored if pair.id in tied}
    if not ties:
        return pairs
    if len(ties) == len(unscored):
        log.warning("%s: %d tied row(s) have no two-class prediction (data.ties=drop left them out), e.g. %s; they "
                    "are left out here too", what, len(ties), [pair.id for pair in unscored[:3]])
    return [pair for pair in pairs if pair.id not in ties]
