# One pipeline for every image: write the vars file, run playbooks/bake.yml once, record it.
build {
  name = "comfybake"
  sources = [
    "source.docker.comfybake",
    "source.amazon-ebs.comfybake",
    "source.googlecompute.comfybake",
    "source.qemu.comfybake",
  ]

  # The vars file of the bake, written from Packer's values (no token is in it).
  provisioner "shell-local" {
    environment_vars = [
      "COMFYBAKE_VARS=${jsonencode(local.bake_vars)}",
      "COMFYBAKE_VARS_FILE=${local.vars_file}",
    ]
    inline = [
      "mkdir -p \"$(dirname \"$COMFYBAKE_VARS_FILE\")\"",
      "printf '%s\\n' \"$COMFYBAKE_VARS\" > \"$COMFYBAKE_VARS_FILE\"",
    ]
  }

  # The only seam between Packer and Ansible. Packer's SSH proxy reaches every builder,
  # containers included; its 1.6 proxy offers only ssh-rsa and scp, hence the SSH settings.
  provisioner "ansible" {
    playbook_file       = "${local.repo}/playbooks/bake.yml"
    inventory_directory = "${local.repo}/${var.inventory_dir}"
    groups              = ["comfybake"]
    user                = var.ssh_username
    extra_arguments     = concat(["--extra-vars", "@${local.vars_file}"], flatten([for file in var.extra_vars_files : ["--extra-vars", "@${file}"]]))
    ansible_env_vars = [
      "ANSIBLE_CONFIG=${local.repo}/ansible.cfg",
      "ANSIBLE_PIPELINING=true",
      "ANSIBLE_SSH_TRANSFER_METHOD=scp",
      "ANSIBLE_SCP_EXTRA_ARGS=-O",
      "ANSIBLE_SSH_ARGS=-o HostKeyAlgorithms=+ssh-rsa -o PubkeyAcceptedAlgorithms=+ssh-rsa -o ControlMaster=auto -o ControlPersist=60s",
      "ANSIBLE_REMOTE_TMP=/tmp/.ansible-bake",
      "COMFYBAKE_HF_TOKEN=${var.hf_token}",
      "COMFYBAKE_CIVITAI_TOKEN=${var.civitai_token}",
    ]
  }

  post-processor "manifest" {
    output     = "${local.repo}/${var.manifest_path}"
    strip_path = true
    custom_data = merge(local.labels, {
      image      = local.image_ref
      base_image = var.base_image
      python     = var.python
      inventory  = var.inventory_dir
    })
  }

  post-processor "docker-tag" {
    only       = ["docker.comfybake"]
    repository = var.image_name
    tag        = [var.image_version]
  }
}
