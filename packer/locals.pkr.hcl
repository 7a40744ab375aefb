locals {
  # The repository root: templates refer to the playbook, roles and ansible.cfg from it.
  repo = abspath("${path.root}/..")

  image_ref = "${var.image_name}:${var.image_version}"
  vm_name   = join("-", split("/", var.image_name))
  vm_image  = "${local.vm_name}-${join("-", split(".", var.target))}-${join("-", split(".", var.image_version))}"

  # The one vars file handed to the bake playbook (written by the build, read with -e @file):
  # what Packer knows and Ansible needs. Extra vars outrank the inventory, so the file sets
  # only what the target decides; lists the inventory may also set (packages, CA bundles)
  # go under comfybake_bake_* and playbooks/bake.yml adds them. No token is in it.
  vars_file = "${local.repo}/build/packer/${var.target}.vars.json"
  bake_vars = {
    comfybake_bake = {
      target        = var.target
      image         = local.image_ref
      torch_flavor  = var.torch_flavor
      models_policy = var.models_policy
    }
    comfybake_bake_packages                   = var.python_packages
    comfybake_bake_ca_certificates            = compact([var.extra_ca_bundle])
    comfyui_models_policy                     = var.models_policy
    comfyui_environments_python               = var.python
    comfyui_environments_default_torch_flavor = var.torch_flavor
    comfyui_user                              = var.container_user
  }

  # Labels of every image: what it is and where it came from (the BOM inside has the rest).
  labels = {
    "org.opencontainers.image.title"   = var.image_name
    "org.opencontainers.image.version" = var.image_version
    "org.comfybake.target"             = var.target
    "org.comfybake.torch-flavor"       = var.torch_flavor
    "org.comfybake.models-policy"      = var.models_policy
    "org.comfybake.bom"                = "/etc/comfybake/lock.json"
  }

  # A container runs the instances under supervisord behind tini (signals, zombies). It starts
  # as root to hand out accounts: the entrypoint fetches boot-time models as container_user,
  # and supervisord (root, its socket root-only) runs each instance as its own account.
  docker_changes = concat(
    [
      "USER root",
      "WORKDIR /var/lib/comfybake",
      "ENTRYPOINT [\"/usr/bin/tini\", \"--\", \"/usr/local/bin/comfybake-entrypoint\"]",
      "CMD []",
    ],
    [for port in var.container_ports : "EXPOSE ${port}"],
    [for key, value in local.labels : "LABEL ${key}=${value}"],
  )
}
