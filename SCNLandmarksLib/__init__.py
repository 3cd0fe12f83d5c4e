"""SCNLandmarksLib: Spatial Configuration Nets for anatomical landmark detection (Payer et al. 2016/2019).

Pure Python (torch, numpy, SimpleITK); never imports slicer, vtk or Qt.
"""

__version__ = "0.1.0"
