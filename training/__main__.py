"""``python -m napari_selfreg.training {train,finetune} ...`` (also ``torchrun -m``)."""

import sys

from .cli import main

sys.exit(main())
