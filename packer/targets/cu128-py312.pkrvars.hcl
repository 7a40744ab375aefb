# CUDA 12.8 (Blackwell and older GPUs), Python 3.12 on Ubuntu 24.04.
target          = "cu128-py312"
base_image      = "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04"
torch_flavor    = "cu128"
python          = "/usr/bin/python3.12"
python_packages = ["python3.12-venv"]
