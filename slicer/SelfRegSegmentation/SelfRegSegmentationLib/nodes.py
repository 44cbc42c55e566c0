"""MRML nodes <-> numpy arrays in napari-selfreg's convention (no Qt, no napari-selfreg).

Slicer keeps a volume's voxels in KJI order (``slicer.util.arrayFromVolume`` gives
numpy ``[k, j, i]``) and its IJK-to-RAS matrix maps ``(i, j, k, 1)`` to RAS millimetres.
napari-selfreg works on arrays in ``(i, j, k)`` order with that 4x4 matrix as their
affine, like nibabel's arrays of a NIfTI file. The transpose of a C-ordered KJI array
is an F-ordered IJK array: the same memory layout nibabel gives, so the library sees
the same array whether a file was read by Slicer or by napari-selfreg itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

SCALAR_VOLUMES = ("vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode")


def matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """A ``vtkMatrix4x4`` as a float64 ``(4, 4)`` array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def array_to_matrix(array) -> vtk.vtkMatrix4x4:
    """A ``(4, 4)`` array as a ``vtkMatrix4x4``."""
    array = np.asarray(array, dtype=np.float64)
    if array.shape != (4, 4):
        raise ValueError(f"a 4x4 matrix is needed, got shape {array.shape}")
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras(volume_node) -> np.ndarray:
    """The IJK-to-RAS matrix of a volume node, ``(4, 4)`` float64."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix_to_array(matrix)


def ijk_to_world(volume_node) -> np.ndarray:
    """The IJK-to-RAS matrix with the node's parent transforms applied: where the voxels
    are in the scene, hence the anatomy's orientation.

    Raises:
        ValueError: a non-linear parent transform (harden it first).
    """
    local = ijk_to_ras(volume_node)
    parent = volume_node.GetParentTransformNode()
    if parent is None:
        return local
    if not parent.IsTransformToWorldLinear():
        raise ValueError(f"{volume_node.GetName()} is under a non-linear transform; harden it first (Data module, right-click > Harden transform)")  # fmt: skip
    to_world = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(to_world)
    return matrix_to_array(to_world) @ local


def dimensions(volume_node) -> tuple[int, int, int]:
    """Voxels per I, J, K axis of a volume node (zeros when it has no image)."""
    image = volume_node.GetImageData()
    return tuple(int(n) for n in image.GetDimensions()) if image is not None else (0, 0, 0)


def volume_array(volume_node) -> np.ndarray:
    """A copy of a scalar volume's voxels in ``(i, j, k)`` order (F-ordered).

    Raises:
        ValueError: the node holds no image, or a vector / tensor volume.
    """
    if volume_node is None or volume_node.GetImageData() is None:
        raise ValueError("the volume node holds no image data; load or choose a volume first")
    if volume_node.GetClassName() not in SCALAR_VOLUMES:
        raise ValueError(
            f"{volume_node.GetName()!r} is a {volume_node.GetClassName()}; only scalar "
            "volumes can be segmented"
        )
    if volume_node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise ValueError(f"{volume_node.GetName()!r} has several components per voxel")
    kji = np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
    return kji.transpose(2, 1, 0)


def oriented_image(array_ijk: np.ndarray, matrix: np.ndarray) -> slicer.vtkOrientedImageData:
    """A ``vtkOrientedImageData`` holding ``array_ijk`` at the IJK-to-RAS ``matrix``."""
    array_ijk = np.asarray(array_ijk)
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*(int(n) for n in array_ijk.shape))
    image.AllocateScalars(numpy_support.get_vtk_array_type(array_ijk.dtype), 1)
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    scalars[:] = array_ijk.transpose(2, 1, 0).ravel()  # VTK runs i fastest: KJI in C order
    image.SetImageToWorldMatrix(array_to_matrix(matrix))
    return image


def add_scalar_volume(scene, name: str, array_ijk: np.ndarray, matrix, like=None):
    """A new scalar volume node in ``scene`` holding ``array_ijk`` at ``matrix``.

    ``like``: a node whose parent transform the new node gets (so it stays aligned).
    """
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(np.asarray(array_ijk).T))
    node.SetIJKToRASMatrix(array_to_matrix(matrix))
    if like is not None and like.GetTransformNodeID():
        node.SetAndObserveTransformNodeID(like.GetTransformNodeID())
    node.CreateDefaultDisplayNodes()
    return node


def hex_to_rgb(color: str) -> tuple[float, float, float]:
    """``'#rrggbb'`` -> ``(r, g, b)`` in [0, 1]; anything else gives mid grey."""
    text = str(color).strip().lstrip("#")
    if len(text) != 6:
        return (0.5, 0.5, 0.5)
    try:
        return tuple(int(text[i : i + 2], 16) / 255.0 for i in (0, 2, 4))
    except ValueError:
        return (0.5, 0.5, 0.5)


def segment_list(segmentation_node) -> list[tuple[str, str]]:
    """``(segment id, name)`` of each segment, in the segmentation's order."""
    segmentation = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    segmentation.GetSegmentIDs(ids)
    out = []
    for i in range(ids.GetNumberOfValues()):
        segment_id = ids.GetValue(i)
        out.append((segment_id, segmentation.GetSegment(segment_id).GetName()))
    return out


def add_class_segments(
    segmentation_node, labels_ijk: np.ndarray, matrix, names: Sequence[str], colors, classes
) -> list[str]:
    """One segment per class in ``classes`` (empty ones too, so they can be painted),
    named and coloured from ``names`` / ``colors``; returns the segment ids."""
    labels_ijk = np.asarray(labels_ijk)
    ids = []
    for c in classes:
        mask = (labels_ijk == c).astype(np.uint8)
        name = names[c] if c < len(names) else f"class {c}"
        color = hex_to_rgb(colors[c]) if c < len(colors) else (0.5, 0.5, 0.5)
        segment_id = segmentation_node.AddSegmentFromBinaryLabelmapRepresentation(
            oriented_image(mask, matrix), name, color
        )
        ids.append(segment_id)
    # the classes do not overlap: one shared labelmap layer, as Segment Editor keeps them
    segmentation_node.GetSegmentation().CollapseBinaryLabelmaps(False)
    return ids


def new_segmentation(scene, name: str, volume_node):
    """An empty segmentation node whose reference geometry is ``volume_node``'s."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    if volume_node.GetTransformNodeID():
        node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    return node


def export_segments(segmentation_node, segment_ids: Sequence[str], volume_node) -> np.ndarray:
    """The segments as one label array in the volume's grid, ``(i, j, k)`` order:
    voxels of ``segment_ids[n]`` hold ``n + 1`` (a later segment wins where they
    overlap), others 0. Uses Slicer's export, which also resamples segments that were
    painted on another grid or under another transform.

    Raises:
        RuntimeError: Slicer's export failed.
    """
    shape = dimensions(volume_node)
    if not segment_ids:
        return np.zeros(shape, dtype=np.int16)
    scene = segmentation_node.GetScene() or volume_node.GetScene()
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__selfreg_export__")
    ids = vtk.vtkStringArray()
    for segment_id in segment_ids:
        ids.InsertNextValue(segment_id)
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node,
            ids,
            labelmap,
            volume_node,
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
        )
        image = labelmap.GetImageData()
        if not ok or image is None:
            raise RuntimeError("Slicer could not export the segments to a labelmap")
        if tuple(image.GetDimensions()) != shape:
            raise RuntimeError(
                f"the exported labelmap has {image.GetDimensions()} voxels, the volume {shape}"
            )
        return np.array(slicer.util.arrayFromVolume(labelmap), copy=True).transpose(2, 1, 0)
    finally:
        created = [
            scene.GetNthNode(i)
            for i in range(scene.GetNumberOfNodes())
            if scene.GetNthNode(i).GetID() not in before
        ]
        for node in created:  # the labelmap, its display and colour nodes
            if node.GetClassName() != "vtkMRMLSubjectHierarchyNode":
                scene.RemoveNode(node)


def add_table(scene, name: str, columns: dict[str, list]):
    """A table node with one column per entry (text, whole numbers or reals)."""
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    for title, values in columns.items():
        if all(isinstance(v, str) for v in values):
            array = vtk.vtkStringArray()
        elif all(isinstance(v, (int, np.integer)) for v in values):
            array, values = vtk.vtkIntArray(), [int(v) for v in values]
        else:
            array, values = vtk.vtkDoubleArray(), [float(v) for v in values]
        array.SetName(title)
        for v in values:
            array.InsertNextValue(v)
        node.AddColumn(array)
    node.Modified()
    return node


def block_matrix(affine, origin: Sequence[int], reduction) -> np.ndarray:
    """IJK-to-RAS of a feature map of ``reduction`` (per axis) computed on a region
    starting at voxel ``origin``: map voxel ``m`` covers the image voxels ``origin +
    r*m ... origin + r*m + r - 1`` and sits at their centre,
    ``affine @ [[diag(r), origin + (r - 1) / 2], [0, 1]]``."""
    origin = np.asarray(origin, dtype=float)
    r = np.broadcast_to(np.asarray(reduction, dtype=float), origin.shape)
    local = np.eye(4)
    local[:3, :3] = np.diag(r)
    local[:3, 3] = origin + (r - 1) / 2
    return np.asarray(affine, dtype=float) @ local
