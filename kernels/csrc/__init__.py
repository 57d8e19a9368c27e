"""The C++ sources of the CPU kernels, shipped as package data and read by `switchboard.kernels.cpp_build`.

A regular package (the folders above it are namespace portions), so that `importlib.resources` reads it the same way
from an editable install, a wheel or a zip.
"""
