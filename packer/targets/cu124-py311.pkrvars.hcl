# CUDA 12.4 (drivers from branch 550), Python 3.11 on Ubuntu 22.04 (python3.11 from universe).
# torch 2.6 is the newest release with cu124 wheels (the cu124 flavour pins it).
target          = "cu124-py311"
base_image      = "nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04"
torch_flavor    = "cu124"
python          = "/usr/bin/python3.11"
python_packages = ["python3.11", "python3.11-venv"]
