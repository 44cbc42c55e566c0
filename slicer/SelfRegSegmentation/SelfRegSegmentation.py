"""SelfReg Segmentation: a 3D Slicer module over napari-selfreg (segment, inspect, fine-tune).

The widget is a thin shell: the work is done by ``SelfRegSegmentationLib.logic``, which
needs no Qt (it is tested with Slicer's MRML libraries alone). napari-selfreg and torch
are imported on first use and installed into Slicer's Python after the user agrees.
"""

from __future__ import annotations

import logging
import os
import tempfile

import vtk
from SelfRegSegmentationLib import logic as liblogic
from SelfRegSegmentationLib.logic import SelfRegSegmentationLogic as _Logic
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

# pip specification of napari-selfreg; set SELFREG_PIP_SPEC to a wheel or source folder
# to install a copy that is not on PyPI.
PIP_SPEC = os.environ.get("SELFREG_PIP_SPEC", liblogic.PACKAGE)


class SelfRegSegmentation(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SelfReg Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["napari-selfreg authors"]
        self.parent.helpText = (
            "Segment a volume with a self-regularised 3D UNet (napari-selfreg), look at what "
            "its blocks see (feature maps, Grad-CAM, channel redundancy), correct the "
            "segments in Segment Editor and fine-tune a new version of the model on them. "
            "Models are napari-selfreg model folders; torch and napari-selfreg are installed "
            "into Slicer's Python on first use."
        )
        self.parent.acknowledgementText = (
            "Built on napari-selfreg (BSD-3-Clause), after SelfReg-UNet and MISSU."
        )


@parameterNodeWrapper
class SelfRegSegmentationParameterNode:
    """The module's state: input volume, segmentation to correct, model and fine-tuning."""

    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    model: str = ""
    scribbles: bool = False
    iterations: int = 0  # 0: the library's default for the device (FINETUNE_ITERATIONS)


def dependenciesInstalled() -> bool:
    """True when torch, napari-selfreg and its runtime libraries can be imported."""
    return not liblogic.missing_packages()


def installDependencies(askConfirmation: bool = True) -> bool:
    """Install torch (SlicerPyTorch's installer when present, else pip) and napari-selfreg
    into Slicer's Python; returns True when everything is importable afterwards."""
    missing = liblogic.missing_packages()
    if not missing:
        return True
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
        "SelfReg Segmentation needs these Python packages, which are not installed in "
        f"Slicer's Python: {', '.join(missing)}.\n\nDownload and install them now? PyTorch "
        "is large (up to a few GB with GPU support); this can take several minutes.",
        windowTitle="Install napari-selfreg",
    ):
        return False
    dialog = slicer.util.createProgressDialog(
        labelText="Installing PyTorch...", maximum=0, windowTitle="SelfReg Segmentation"
    )
    try:
        slicer.app.processEvents()
        if "torch" in missing:
            installTorch()
        dialog.labelText = f"Installing napari-selfreg ({PIP_SPEC})..."
        slicer.app.processEvents()
        slicer.util.pip_install(f"{PIP_SPEC} --no-deps")
        slicer.util.pip_install(" ".join(liblogic.RUNTIME_REQUIREMENTS))
    finally:
        dialog.close()
    still = liblogic.missing_packages()
    if still:
        slicer.util.errorDisplay(f"Installation incomplete; missing: {', '.join(still)}.")
        return False
    slicer.util.delayDisplay("napari-selfreg is installed.", autoCloseMsec=2000)
    return True


def installTorch() -> None:
    """PyTorch the way SlicerPyTorch installs it (the build that fits the GPU driver)."""
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=liblogic.TORCH_REQUIREMENT
        )
        if torch is None:
            raise RuntimeError("PyTorch was not installed")
    else:
        logging.info("SlicerPyTorch is not installed; installing torch from PyPI")
        slicer.util.pip_install(f"torch{liblogic.TORCH_REQUIREMENT}")


class SelfRegSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: pickers, Segment / Inspect / Fine-tune, progress and Cancel."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cancelRequested = False
        self._busy = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SelfRegSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SelfRegSegmentationLogic()

        self.addObserver(
            slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose
        )
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.inspectButton.connect("clicked(bool)", self.onInspect)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setValue(0)
        self.initializeParameterNode()
        self.refreshEnvironment()

    def cleanup(self):
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -------------------------------------------------------------- parameter node
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)  # fmt: skip
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)  # fmt: skip
            self.updateButtons()

    def updateButtons(self, caller=None, event=None):
        node = self._parameterNode
        hasVolume = bool(node and node.inputVolume)
        idle = not self._busy
        self.ui.segmentButton.enabled = idle and hasVolume
        self.ui.inspectButton.enabled = idle and hasVolume
        self.ui.finetuneButton.enabled = idle and hasVolume and bool(node.segmentation)
        self.ui.cancelButton.enabled = self._busy

    # -------------------------------------------------------------- models and device
    def refreshEnvironment(self, select: str | None = None):
        """Fill the model picker and the device line (when napari-selfreg is installed)."""
        combo = self.ui.modelComboBox
        combo.blockSignals(True)
        combo.clear()
        if not dependenciesInstalled():
            self.ui.deviceLabel.text = "napari-selfreg is not installed yet: it is installed on first use."  # fmt: skip
            combo.blockSignals(False)
            return
        for label, folder in liblogic.model_choices():
            combo.addItem(label, folder)
        wanted = select or (self._parameterNode.model if self._parameterNode else "")
        index = combo.findData(str(wanted)) if wanted else -1
        combo.setCurrentIndex(max(index, 0))
        combo.blockSignals(False)
        self.onModelChanged()
        line, report = liblogic.device_summary()
        self.ui.deviceLabel.text = line
        self.ui.deviceLabel.toolTip = report

    def currentModel(self):
        return self.ui.modelComboBox.currentData or None

    def onModelChanged(self, index=None):
        model = self.currentModel()
        if self._parameterNode is not None:
            self._parameterNode.model = model or ""
        self.ui.blockComboBox.clear()
        if model is None:
            return
        try:
            bundle = self.logic.load_bundle(model)
        except (OSError, ValueError) as err:
            self.ui.statusLabel.text = f"Cannot load the model: {err}"
            return
        blocks = [info.name for info in bundle.network.feature_info]
        for block in blocks:
            self.ui.blockComboBox.addItem(block)
        self.ui.blockComboBox.currentText = liblogic.default_block(blocks)

    def ensureDependencies(self) -> bool:
        if dependenciesInstalled():
            return True
        with slicer.util.tryWithErrorDisplay("Installing napari-selfreg failed.", waitCursor=True):
            if installDependencies(askConfirmation=True):
                self.refreshEnvironment()
                return True
        return False

    # -------------------------------------------------------------- jobs
    def runJob(self, job, title: str):
        """Drive a generator job with the progress bar; Cancel closes it. Returns its
        result, or None when cancelled or failed (the error is shown)."""
        self._busy, self._cancelRequested = True, False
        self.updateButtons()
        self.ui.statusLabel.text = title
        self.ui.progressBar.setRange(0, 0)

        def onProgress(event):
            done, total, text = liblogic.describe(event)
            if total:
                self.ui.progressBar.setRange(0, total)
                self.ui.progressBar.setValue(min(done, total))
            else:
                self.ui.progressBar.setRange(0, 0)
            self.ui.statusLabel.text = f"{title}: {text}"
            slicer.app.processEvents()

        result = None
        try:
            with slicer.util.tryWithErrorDisplay(f"{title} failed.", waitCursor=True):
                result = liblogic.run_job(job, onProgress, lambda: self._cancelRequested)
        finally:
            self._busy = False
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.setValue(100 if result is not None else 0)
            outcome = "done" if result is not None else "cancelled" if self._cancelRequested else "failed"  # fmt: skip
            self.ui.statusLabel.text = f"{title}: {outcome}"
            self.updateButtons()
        return result

    def onCancel(self):
        self._cancelRequested = True
        self.ui.statusLabel.text = "Cancelling at the next step..."

    def onSegment(self):
        if not self.ensureDependencies():
            return
        volume = self._parameterNode.inputVolume
        node = self.runJob(self.logic.iter_segment(volume, self.currentModel()), "Segmenting")
        if node is not None:
            self._parameterNode.segmentation = node
            slicer.util.setSliceViewerLayers(background=volume)

    def onInspect(self):
        if not self.ensureDependencies():
            return
        volume = self._parameterNode.inputVolume
        block = self.ui.blockComboBox.currentText or None
        job = self.logic.iter_inspect(volume, self.currentModel(), block=block)
        result = self.runJob(job, "Inspecting")
        if result is None:
            return
        shown = result.cam or (result.features[0] if result.features else None)
        if shown is not None:
            slicer.util.setSliceViewerLayers(background=volume, foreground=shown, foregroundOpacity=0.5)  # fmt: skip
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None and result.table is not None:
            layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
            selection = slicer.app.applicationLogic().GetSelectionNode()
            selection.SetActiveTableID(result.table.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()
        if result.notes:
            slicer.util.warningDisplay("\n".join(result.notes))

    def onFinetune(self):
        if not self.ensureDependencies():
            return
        node = self._parameterNode
        steps = f"{node.iterations} steps" if node.iterations else "the device's default steps"
        if not slicer.util.confirmOkCancelDisplay(
            f"Fine-tune a new version of the model on the segments of "
            f"{node.segmentation.GetName()!r} ({steps})? The base model is kept as it is."
        ):
            return
        job = self.logic.iter_finetune(
            node.inputVolume, node.segmentation, self.currentModel(),
            scribbles=node.scribbles, iterations=node.iterations or None,
        )  # fmt: skip
        path = self.runJob(job, "Fine-tuning")
        if path is not None:
            self.refreshEnvironment(select=str(path))
            slicer.util.infoDisplay(f"New model version saved in {path}")


class SelfRegSegmentationLogic(ScriptedLoadableModuleLogic, _Logic):
    """The library logic with Slicer's parameter node (see ``SelfRegSegmentationLib.logic``)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        _Logic.__init__(self, scene=slicer.mrmlScene)

    def getParameterNode(self):
        return SelfRegSegmentationParameterNode(super().getParameterNode())


class SelfRegSegmentationTest(ScriptedLoadableModuleTest):
    """Self-test: segment, inspect and fine-tune a phantom with an untrained tiny model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SelfRegSegmentation()

    def test_SelfRegSegmentation(self):
        if not dependenciesInstalled() and not installDependencies(askConfirmation=True):
            self.delayDisplay("napari-selfreg is not installed; test skipped")
            return
        from SelfRegSegmentationLib.selftest import run_self_test

        with tempfile.TemporaryDirectory(prefix="selfreg-selftest-") as folder:
            run_self_test(slicer.mrmlScene, folder, say=self.delayDisplay)
