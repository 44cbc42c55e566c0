"""The bundled training module (installed as ``napari_selfreg.training``)."""
