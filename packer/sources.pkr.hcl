# Where a bake runs. Pick one with -only, such as -only=docker.comfybake.

# A container image for GPU clouds that run containers (pods, Kubernetes).
source "docker" "comfybake" {
  image   = var.base_image
  pull    = var.docker_pull
  commit  = true
  volumes = var.docker_volumes
  changes = local.docker_changes
}

# A VM image for AWS.
source "amazon-ebs" "comfybake" {
  region        = var.aws_region
  instance_type = var.aws_instance_type
  ami_name      = local.vm_image
  ssh_username  = var.ssh_username
  # Packer's temporary key leaves the image too (sysprep removes every authorized key).
  ssh_clear_authorized_keys = true
  source_ami_filter {
    filters = {
      name                = var.aws_source_ami_name
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = var.aws_source_ami_owners
    most_recent = true
  }
  launch_block_device_mappings {
    device_name           = "/dev/sda1"
    volume_size           = var.disk_size_gb
    volume_type           = "gp3"
    iops                  = 3000
    throughput            = 125
    delete_on_termination = true
  }
  tags     = local.labels
  run_tags = local.labels
}

# A VM image for Google Cloud (the build VM gets no GPU unless its machine type has one).
source "googlecompute" "comfybake" {
  project_id              = var.gcp_project_id
  zone                    = var.gcp_zone
  machine_type            = var.gcp_machine_type
  source_image_family     = var.gcp_source_image_family
  source_image_project_id = [var.gcp_source_image_project]
  image_name              = local.vm_image
  image_family            = local.vm_name
  disk_size               = var.disk_size_gb
  ssh_username            = var.ssh_username
  on_host_maintenance     = "TERMINATE"
  # Packer's temporary key leaves the image too (sysprep removes every authorized key).
  ssh_clear_authorized_keys = true
  image_labels = {
    comfybake_target        = join("-", split(".", var.target))
    comfybake_torch_flavor  = var.torch_flavor
    comfybake_models_policy = var.models_policy
  }
}

# A VM image for on-premises KVM, from a cloud image checked against its publisher's checksum,
# booted with a cloud-init NoCloud seed (var.qemu_seed_files) that lets Packer in.
source "qemu" "comfybake" {
  iso_url      = var.qemu_base_disk
  iso_checksum = var.qemu_base_disk_checksum
  disk_image   = true
  format       = "qcow2"
  disk_size    = "${var.disk_size_gb}G"
  accelerator  = var.qemu_accelerator
  qemuargs     = [["-cpu", var.qemu_cpu]]
  cpus         = var.qemu_cpus
  memory       = var.qemu_memory_mb
  cd_files     = var.qemu_seed_files
  cd_label     = "cidata"
  # Discards reach the qcow2: clusters that sysprep's fstrim frees wholly are dropped when
  # Packer compacts the image at the end.
  disk_discard         = "unmap"
  disk_detect_zeroes   = "unmap"
  headless             = true
  output_directory     = "${local.repo}/build/qemu/${local.vm_image}"
  vm_name              = "${local.vm_image}.qcow2"
  ssh_username         = var.ssh_username
  ssh_private_key_file = var.ssh_private_key_file
  ssh_password         = var.ssh_password
  ssh_timeout          = "10m"
  shutdown_command     = "sudo systemctl poweroff"
}
