#!/usr/bin/env bash
# The LMSYS 1st place's recipe in miniature, on the CPU with the two embedded models:
#   k-fold gemma-3-270m teachers -> their out-of-fold logits joined over the folds -> SmolLM2-135M students
#   distilled with (0.5 CE + KL + cosine) / 2.5, one per fold -> a LoRA soup of the students -> a submission with
#   swap TTA, scored on held-out pairs; beside it the same students trained on the labels alone, for comparison.
#
#   examples/distill_pipeline.sh DATA.csv [WORK_DIR]
#
# DATA.csv: labelled pairs in the Kaggle train.csv schema. HOLDOUT of them (default 0.2, prompt-grouped by the
# prepare step's seed) are kept out of training and scored at the end. Knobs (environment): FOLDS (2), STEPS (updates
# per run, 20), MAXLEN (256), HOLDOUT (0.2), SEED (0), TEACHER_OVERRIDES / STUDENT_OVERRIDES (extra Hydra
# overrides of the teacher / student runs, e.g. "model.path=DIR" for other models), KINDS ("distilled labels_only":
# which students to train).  Each step's outputs stay in WORK_DIR
# (default outputs/distill_pipeline), so a step that fails can be rerun after removing its directory.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA=${1:?usage: examples/distill_pipeline.sh DATA.csv [WORK_DIR]}
WORK=${2:-outputs/distill_pipeline}
FOLDS=${FOLDS:-2}; STEPS=${STEPS:-20}; MAXLEN=${MAXLEN:-256}; HOLDOUT=${HOLDOUT:-0.2}; SEED=${SEED:-0}
PY=${PYTHON:-python}
read -r -a teacher_extra <<< "${TEACHER_OVERRIDES:-}"
read -r -a student_extra <<< "${STUDENT_OVERRIDES:-}"
mkdir -p "$WORK"
run() { echo "==> $*"; "$@"; }

# 1. held-out pairs (labels kept aside) and the training pairs with prompt-grouped folds
"$PY" - "$DATA" "$WORK" "$HOLDOUT" "$SEED" <<'PY'
import sys
import numpy as np
import pandas as pd
from lmsys.data.io import read_pairs
from lmsys.data.split import prompt_group
data, work, holdout, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
frame = pd.read_csv(data, dtype={"id": str}, keep_default_na=False)
groups = np.array([prompt_group(p) for p in read_pairs(data, require_labels=True)])
unique = np.unique(groups)
held = set(np.random.default_rng(seed).choice(unique, size=max(1, int(len(unique) * holdout)), replace=False))
is_held = np.array([g in held for g in groups])
frame[~is_held].to_csv(f"{work}/train.csv", index=False)
frame[is_held].to_csv(f"{work}/heldout_labels.csv", index=False)
frame[is_held][["id", "prompt", "response_a", "response_b"]].to_csv(f"{work}/heldout.csv", index=False)
print(f"{(~is_held).sum()} training pairs, {is_held.sum()} held out")
PY
run "$PY" -m lmsys.prepare "inputs=[$WORK/train.csv]" output_dir="$WORK/prepared" k_folds="$FOLDS" seed="$SEED"

common=(data.train_path="$WORK/prepared/train.parquet" model.max_length="$MAXLEN" trainer.max_steps="$STEPS"
        seed="$SEED")
# 2. teachers, one per fold; 3. their out-of-fold logits on every training row
for ((k = 0; k < FOLDS; k++)); do
  run "$PY" lmsys/code/train_r_gemma.py --config-name conf_r_gemma_270m_teacher "${common[@]}" data.valid_fold="$k" \
    "${teacher_extra[@]}" hydra.run.dir="$WORK/teachers/fold$k"
done
run "$PY" -m lmsys.oof join "$WORK"/teachers/fold* --out "$WORK/teacher_oof.csv" --train "$WORK/prepared/train.parquet"
run "$PY" -m lmsys.teachers train="$WORK/prepared/train.parquet" "logits=[$WORK/teacher_oof.csv]" \
  output="$WORK/train_with_teacher.parquet"

# 4. students, distilled and (for comparison) on the labels alone; 5. a soup of each kind
for kind in ${KINDS:-distilled labels_only}; do
  extra=(); [[ $kind == labels_only ]] && extra=(loss.ce_weight=1 loss.kl_weight=0 loss.cosine_weight=0)
  checkpoints=()
  for ((k = 0; k < FOLDS; k++)); do
    run "$PY" lmsys/code/train_r_llama.py --config-name conf_r_llama_smol_student "${common[@]}" \
      data.train_path="$WORK/train_with_teacher.parquet" data.valid_fold="$k" "${extra[@]}" \
      "${student_extra[@]}" hydra.run.dir="$WORK/students_$kind/fold$k"
    checkpoints+=("$WORK/students_$kind/fold$k/checkpoint")
  done
  run "$PY" -m lmsys.soup "checkpoints=[$(IFS=,; echo "${checkpoints[*]}")]" output_dir="$WORK/soup_$kind"
  # 6. the submission of the soup, with swap TTA
  run "$PY" -m lmsys.predict checkpoint="$WORK/soup_$kind" data.test_path="$WORK/heldout.csv" \
    output="$WORK/submission_$kind.csv"
done

# 7. scores on the held-out pairs
"$PY" - "$WORK" "${KINDS:-distilled labels_only}" <<'PY'
import sys
import numpy as np
import pandas as pd
from lmsys.data.io import read_pairs
from lmsys.evaluation.metrics import accuracy, log_loss
work = sys.argv[1]
pairs = read_pairs(f"{work}/heldout_labels.csv", require_labels=True)
targets = np.array([p.target for p in pairs])
train = np.array([p.target for p in read_pairs(f"{work}/train.csv", require_labels=True)]).mean(0)
prior = np.tile([(train[0] + train[1]) / 2, (train[0] + train[1]) / 2, train[2]], (len(targets), 1))
print(f"held-out pairs: {len(targets)}")
print(f"{'swap-symmetric class prior':<28} log loss {log_loss(prior, targets):.4f}")
for kind in sys.argv[2].split():
    sub = pd.read_csv(f"{work}/submission_{kind}.csv", dtype={"id": str}).set_index("id").loc[[p.id for p in pairs]]
    probs = sub[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy()
    print(f"{'student soup, ' + kind:<28} log loss {log_loss(probs, targets):.4f}  accuracy {accuracy(probs, targets):.3f}")
PY
