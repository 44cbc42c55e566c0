"""``python -m napari_selfreg`` runs the ``napari-selfreg`` command line."""

import sys

from napari_selfreg.cli import main

if __name__ == "__main__":
    sys.exit(main())
