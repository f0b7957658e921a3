"""Whole-slide images (SVS / pyramidal TIFF) to a patch dataset, for ``hlss-tile``.

The modules, in the order a slide meets them:

* :mod:`~hlss.data.wsi.slide` opens a slide through tiffslide (default) or OpenSlide and gives
  its levels, level-0 microns per pixel and RGB regions;
* :mod:`~hlss.data.wsi.grid` picks the pyramid level for a target resolution and lays the patch
  grid;
* :mod:`~hlss.data.wsi.tissue` finds tissue on a low-resolution level;
* :mod:`~hlss.data.wsi.tiler` cuts one slide into an HDF5 file of patches plus a thumbnail;
* :mod:`~hlss.data.wsi.catalog` finds slides, names their patients, labels and splits them and
  writes ``manifest.csv``;
* :mod:`~hlss.data.wsi.run` tiles many slides in worker processes with a progress display.

Nothing heavy is imported with the package: the slide readers load on first use.
"""
