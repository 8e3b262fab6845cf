"""Submitting on Kaggle (no internet, 2x T4 16 GB without bfloat16, ~9 h): `python -m lmsys.kaggle bundle` packs a
checkpoint, its base model and the wheels inference needs into one folder to upload as a Kaggle dataset, with
`inference.py` / `inference.ipynb` to run there; `python -m lmsys.kaggle estimate` projects the run time."""
