"""``python -m pldr_llm`` is ``pldr-llm`` (so ``torchrun -m pldr_llm train ...`` works)."""

import sys

from pldr_llm.cli import main

sys.exit(main())
