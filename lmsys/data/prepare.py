"""`python -m lmsys.data.prepare ...`: the name the prepare command had before it moved to `python -m
lmsys.prepare` (same options); kept so that existing scripts keep working."""

from lmsys.prepare import main

if __name__ == "__main__":
    main()
