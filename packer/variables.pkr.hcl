# Every input of a bake. Validations avoid regex functions, which Packer 1.6 cannot evaluate there.
# A target (targets/*.pkrvars.hcl) sets the flavour; what goes in the
# image (environments, instances, models) is Ansible data in var.inventory_dir's group_vars.

# ----------------------------------------------------------------------------- target

variable "target" {
  type        = string
  description = "Name of the target (targets/<target>.pkrvars.hcl); recorded in the image's labels and BOM."
  validation {
    condition     = var.target != "" && trim(var.target, "abcdefghijklmnopqrstuvwxyz0123456789.-") == ""
    error_message = "The target must be lower-case letters, digits, '.' and '-', such as cu128-py312."
  }
}

variable "torch_flavor" {
  type        = string
  description = "Torch flavour of every environment in the image: cu130, cu128, cu126, cu124 or cpu."
  validation {
    condition     = contains(["cu130", "cu128", "cu126", "cu124", "cpu"], var.torch_flavor)
    error_message = "The torch_flavor must be one of cu130, cu128, cu126, cu124, cpu."
  }
}

variable "python" {
  type        = string
  description = "Python interpreter on the image that the environments' venvs are made from, such as /usr/bin/python3.12."
  validation {
    condition     = substr(var.python, 0, 1) == "/" && length(split(" ", var.python)) == 1
    error_message = "The python must be an absolute path to an interpreter, such as /usr/bin/python3.12."
  }
}

variable "python_packages" {
  type        = list(string)
  description = "System packages that provide var.python and its venv module (the base image may lack them)."
  default     = []
}

variable "models_policy" {
  type        = string
  description = "bake: models in the image; boot: the manifest in the image, fetched when it starts; none: a volume holds them."
  default     = "boot"
  validation {
    condition     = contains(["bake", "boot", "none"], var.models_policy)
    error_message = "The models_policy must be bake, boot or none."
  }
}

variable "inventory_dir" {
  type        = string
  description = "Ansible inventory folder, relative to the repository root, whose group_vars declare the environments, instances and models of the image."
  default     = "inventories/bake"
}

variable "extra_vars_files" {
  type        = list(string)
  description = "More Ansible vars files for the bake (paths relative to where packer runs, or absolute)."
  default     = []
}

variable "extra_ca_bundle" {
  type        = string
  description = "A PEM bundle on the build machine that the image must trust (a proxy's CA); empty for none."
  default     = ""
}

# ----------------------------------------------------------------------------- secrets

variable "hf_token" {
  type        = string
  description = "Hugging Face token for models fetched during the bake (models_policy bake); never stored in the image."
  default     = env("HF_TOKEN")
  sensitive   = true
}

variable "civitai_token" {
  type        = string
  description = "Civitai token for models fetched during the bake (models_policy bake); never stored in the image."
  default     = env("CIVITAI_TOKEN")
  sensitive   = true
}

# ----------------------------------------------------------------------------- image

variable "image_name" {
  type        = string
  description = "Name of the image (container repository, AMI, GCE image and qemu disk prefix)."
  default     = "comfybake"
  validation {
    condition     = var.image_name != "" && trim(var.image_name, "abcdefghijklmnopqrstuvwxyz0123456789._/-") == ""
    error_message = "The image_name must be lower-case letters, digits, '.', '_', '/' and '-'."
  }
}

variable "image_version" {
  type        = string
  description = "Version label of the image (container tag, and a suffix of VM image names)."
  default     = "dev"
  validation {
    condition     = length(var.image_version) <= 128 && var.image_version != "" && trim(var.image_version, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-") == ""
    error_message = "The image_version must be a valid container tag: letters, digits, '_', '.', '-'."
  }
}

variable "manifest_path" {
  type        = string
  description = "Where the manifest post-processor records what was built (image ids, target, inputs)."
  default     = "build/packer-manifest.json"
}

# ----------------------------------------------------------------------------- container (docker)

variable "base_image" {
  type        = string
  description = "Base of the container image: nvidia/cuda:<version>-cudnn-runtime-ubuntu24.04, ubuntu:24.04, or a local image."
}

variable "docker_pull" {
  type        = bool
  description = "Pull var.base_image before the bake; false for an image that exists only locally."
  default     = true
}

variable "docker_volumes" {
  type        = map(string)
  description = "Host folders mounted into the bake container (mirrors for an air-gapped bake); never part of the image."
  default     = {}
}

variable "container_user" {
  type        = string
  description = "Account that owns the model store and fetches boot-time models in a container (comfyui_user; created by the bake). Never root; each instance runs as its own account."
  default     = "comfybake"
  validation {
    condition     = var.container_user != "root" && var.container_user != "0"
    error_message = "The container_user must not be root: it owns the model store and runs the model fetch."
  }
}

variable "container_ports" {
  type        = list(number)
  description = "Ports the container image declares (EXPOSE): the gateway's (each instance's port + 1000, each environment's from 8443, the exporter's metrics route on 9722), or the instances' in an image without the gateway."
  default     = [8443, 9188, 9722]
}

# ----------------------------------------------------------------------------- VMs (all builders)

variable "ssh_username" {
  type        = string
  description = "User Packer logs in as on VM builders (it must be able to sudo)."
  default     = "ubuntu"
}

variable "disk_size_gb" {
  type        = number
  description = "Root disk of VM images, in GB (environments take 10-20 GB each; baked models more)."
  default     = 80
  validation {
    condition     = var.disk_size_gb >= 20
    error_message = "The disk_size_gb must be at least 20."
  }
}

# ----------------------------------------------------------------------------- amazon-ebs

variable "aws_region" {
  type        = string
  description = "AWS region the AMI is built in."
  default     = "us-east-1"
}

variable "aws_instance_type" {
  type        = string
  description = "Instance type of the build VM (a GPU type runs the in-image GPU checks)."
  default     = "g6.xlarge"
}

variable "aws_source_ami_name" {
  type        = string
  description = "Name filter of the source AMI (the newest match is used)."
  default     = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"
}

variable "aws_source_ami_owners" {
  type        = list(string)
  description = "Owners of the source AMI (099720109477 is Canonical)."
  default     = ["099720109477"]
}

# ----------------------------------------------------------------------------- googlecompute

variable "gcp_project_id" {
  type        = string
  description = "GCP project the image is built in."
  default     = "my-project"
}

variable "gcp_zone" {
  type        = string
  description = "GCP zone of the build VM."
  default     = "us-central1-a"
}

variable "gcp_machine_type" {
  type        = string
  description = "Machine type of the build VM."
  default     = "g2-standard-4"
}

variable "gcp_source_image_family" {
  type        = string
  description = "Image family of the source image."
  default     = "ubuntu-2404-lts-amd64"
}

variable "gcp_source_image_project" {
  type        = string
  description = "Project that publishes var.gcp_source_image_family."
  default     = "ubuntu-os-cloud"
}

# ----------------------------------------------------------------------------- qemu (on-premises KVM)

variable "qemu_base_disk" {
  type        = string
  description = "Base disk image (qcow2, a cloud image with SSH access for var.ssh_username), a URL or a path; Packer keeps a download in its cache."
  default     = "https://cloud-images.ubuntu.com/releases/noble/release/noble-server-cloudimg-amd64.img"
}

variable "qemu_base_disk_checksum" {
  type        = string
  description = "Checksum of var.qemu_base_disk: sha256:<hex>, sha512:<hex>, or file:<URL or path> of a SHA256SUMS file that lists the disk's file name (the default: Ubuntu's, beside the default disk)."
  default     = "file:https://cloud-images.ubuntu.com/releases/noble/release/SHA256SUMS"
  validation {
    condition     = contains(["sha256", "sha512", "file"], split(":", var.qemu_base_disk_checksum)[0]) && length(split(":", var.qemu_base_disk_checksum)) > 1 && length(var.qemu_base_disk_checksum) > 7
    error_message = "The qemu_base_disk_checksum must be sha256:<hex>, sha512:<hex> or file:<SHA256SUMS URL or path>; an unchecked base disk (none) is refused."
  }
}

variable "qemu_accelerator" {
  type        = string
  description = "QEMU accelerator: kvm, or tcg where /dev/kvm is missing."
  default     = "kvm"
  validation {
    condition     = contains(["kvm", "tcg", "none"], var.qemu_accelerator)
    error_message = "The qemu_accelerator must be kvm, tcg or none."
  }
}

variable "qemu_cpu" {
  type        = string
  description = "CPU model given to the build VM (host,-arch-capabilities where -cpu host aborts)."
  default     = "host"
}

variable "qemu_cpus" {
  type        = number
  description = "vCPUs of the qemu build VM."
  default     = 4
}

variable "qemu_memory_mb" {
  type        = number
  description = "Memory of the qemu build VM, in MiB (environment installs need 2048 or more)."
  default     = 8192
  validation {
    condition     = var.qemu_memory_mb >= 1024
    error_message = "The qemu_memory_mb must be at least 1024."
  }
}

variable "qemu_seed_files" {
  type        = list(string)
  description = "Files of the cloud-init NoCloud seed the build VM boots with (user-data and meta-data, on a CD labelled cidata): the user-data gives var.ssh_username the public half of var.ssh_private_key_file. Empty: the base disk must let Packer in by itself."
  default     = []
}

variable "ssh_private_key_file" {
  type        = string
  description = "Private key Packer logs in with on qemu builds (the base disk's authorized key); empty uses var.ssh_password."
  default     = ""
}

variable "ssh_password" {
  type        = string
  description = "Password Packer logs in with on qemu builds when no key is set."
  default     = ""
  sensitive   = true
}
