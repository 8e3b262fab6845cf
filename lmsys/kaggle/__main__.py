"""`python -m lmsys.kaggle bundle|estimate key=value ...` (`--help` after a subcommand for its usage)."""

from __future__ import annotations

import sys

USAGE = """usage: python -m lmsys.kaggle bundle checkpoint=CKPT output_dir=DIR [python_version=3.11]
           [platform=manylinux_2_35_x86_64] [skip_packages=[...]] [predict_args=[quantization=int8,...]]
       python -m lmsys.kaggle estimate checkpoint=CKPT data.test_path=FILE [rows=25000] [limit_hours=9]
           [sample=64] [quantization=...] [compute_dtype=...]
(add --help after the subcommand for all its keys)"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "bundle":
        from lmsys.kaggle.bundle import main as bundle_main

        bundle_main(rest)
    elif command == "estimate":
        from lmsys.kaggle.estimate import main as estimate_main

        estimate_main(rest)
    else:
        print(f"error: unknown subcommand {command!r}; expected bundle or estimate", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
