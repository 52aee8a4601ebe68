"""Stub of the Lora extension's networks.py: the list of LoRAs on disk."""

import os

import network
from modules import shared

available_networks = {}
available_network_aliases = {}


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for root, _, files in os.walk(shared.cmd_opts.lora_dir):
        for file in sorted(files):
            if file.lower().endswith((".pt", ".ckpt", ".safetensors")):
                name = os.path.splitext(file)[0]
                entry = network.NetworkOnDisk(name, os.path.join(root, file))
                available_networks[name] = entry
                available_network_aliases[name] = entry
