# Machines without a GPU: Ubuntu 24.04 (Python 3.12) and CPU torch.
target          = "cpu"
base_image      = "ubuntu:24.04"
torch_flavor    = "cpu"
python          = "/usr/bin/python3.12"
python_packages = ["python3.12-venv"]
