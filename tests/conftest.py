"""Test set-up: eight fake CPU devices, so sharded code runs as it would on a pod slice.

XLA reads the flag when JAX initialises its backends, so it must be set before anything imports
jax; pytest imports this file first.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep TensorFlow (if present) and tfds quiet and off the GPU.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
