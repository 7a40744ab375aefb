"""Test harness of comfybake: fixture repositories, the base image, containers, processes."""
