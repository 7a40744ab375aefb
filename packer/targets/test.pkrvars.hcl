# CI's target: the local base image (scripts/base-image.sh), the ComfyUI test double and the
# fixture nodes from local mirrors, packages from a wheelhouse, models from a loopback origin.
# The test (tests/packer) mounts the mirrors and sets COMFYBAKE_FIXTURES for the inventory.
target          = "test"
base_image      = "comfybake/test-base:bookworm"
docker_pull     = false
torch_flavor    = "cpu"
python          = "/usr/bin/python3"
inventory_dir   = "tests/packer/inventory"
image_name      = "comfybake/test"
image_version   = "ci"
ssh_username    = "root"
container_ports = [8443, 9188, 9189]
