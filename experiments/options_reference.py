"""Write docs/options.md, the reference of every option, from the option sections.

python experiments/options_reference.py            # write docs/options.md
python experiments/options_reference.py --check    # exit 1 if it is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

from pyro_bll.run.parser import options_reference

PAGE = Path(__file__).resolve().parents[1] / "docs" / "options.md"


def main(argv: list[str]) -> int:
    text = options_reference()
    if "--check" in argv:
        same = PAGE.exists() and PAGE.read_text(encoding="utf-8") == text
        print(f"{PAGE.name} is {'up to date' if same else 'out of date'}")
        return 0 if same else 1
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
