"""``python -m facegan`` (also what ``torchrun -m facegan train ...`` runs)."""

from facegan.cli import main

main()
