"""The PCRLv2 sub-crop views (docs/method.md §1, D1–D3), cut online from one whole volume.

A sample is two global views of one volume (boxes with IoU > ``min_iou``, optionally kept away from
tissue-dominated regions) and ``num_locals`` local sub-crops from inside the union of the two global boxes.
The package follows the data:

* :mod:`pcrl.views.geometry`: the sampler (boxes, spatial augmentation, view affines), from a sample's seed;
* :mod:`pcrl.views.tissue`: the tissue filter the sampler applies to the global boxes;
* :mod:`pcrl.views.render`: :class:`PCRLv2Views`, which draws a sample's random choices, cuts the regions its
  views read, and renders whole batches: a spatial backend (:class:`TorchSpatial`, or
  :class:`pcrl.views.dali.DALISpatial`) resamples and blurs, then :func:`finish_views` degrades and normalises;
* :mod:`pcrl.views.ops`: the batched tensor operations both backends share;
* :mod:`pcrl.views.cpu_kernels`: the numba loops of the CPU renderer;
* :mod:`pcrl.views.dali`: the DALI spatial backend.
"""

from __future__ import annotations

from pcrl.views.dali import DALISpatial, dali_available
from pcrl.views.geometry import (
    Box,
    SpatialParams,
    ViewPlan,
    box_iou,
    sample_global_pair,
    sample_local_boxes,
    sample_spatial_params,
    union_box,
    view_affines,
)
from pcrl.views.ops import SpatialViews, blur_window, pack_regions, region_list
from pcrl.views.render import (
    PCRLv2Views,
    SpatialBackend,
    TorchSpatial,
    build_renderer,
    collate_draws,
    finish_views,
)
from pcrl.views.tissue import TissueIntegral, tissue_score

__all__ = [
    "Box",
    "DALISpatial",
    "PCRLv2Views",
    "SpatialBackend",
    "SpatialParams",
    "SpatialViews",
    "TissueIntegral",
    "TorchSpatial",
    "ViewPlan",
    "blur_window",
    "box_iou",
    "build_renderer",
    "collate_draws",
    "dali_available",
    "finish_views",
    "pack_regions",
    "region_list",
    "sample_global_pair",
    "sample_local_boxes",
    "sample_spatial_params",
    "tissue_score",
    "union_box",
    "view_affines",
]
