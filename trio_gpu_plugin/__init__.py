"""trio-gpu-plugin: a Kubernetes device plugin for NVIDIA GPUs, on trio.
"""
