# Plugins for Packer 1.7 and later, which no longer build them in. Install them once with
#   packer init packer/init
# This block lives apart from the templates because Packer 1.6 (Debian 12's package, which
# still builds every plugin in) rejects `required_plugins`. Installed plugins are found by any
# template, so `packer build packer/` works the same with both.
packer {
  required_version = ">= 1.7.0"
  required_plugins {
    ansible = {
      source  = "github.com/hashicorp/ansible"
      version = "~> 1.1"
    }
    docker = {
      source  = "github.com/hashicorp/docker"
      version = "~> 1.1"
    }
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = "~> 1.3"
    }
    googlecompute = {
      source  = "github.com/hashicorp/googlecompute"
      version = "~> 1.1"
    }
    qemu = {
      source  = "github.com/hashicorp/qemu"
      version = "~> 1.1"
    }
  }
}
