"""``python -m tledge.cli``: the console script, for ``torchrun -m tledge.cli finetune``."""

from tledge.cli import main

main()
