"""fastformer.info() and `python -m fastformer info`."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import fastformer


def test_info_reports_versions_device_and_implementations():
    info = fastformer.info()
    assert info["versions"]["torch"] == torch.__version__
    assert info["device"]
    assert isinstance(info["extension"]["available"], bool)
    implementations = info["ops"]["layer_norm_residual"]["cpu"]
    expected = "c++" if info["extension"]["available"] else None
    if expected:
        assert implementations["float32"] == expected


def test_command_line_info_as_json():
    result = subprocess.run(
        [sys.executable, "-m", "fastformer", "info", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    parsed = json.loads(result.stdout)
    assert "layer_norm_residual" in parsed["ops"]


def test_command_line_info_table():
    result = subprocess.run(
        [sys.executable, "-m", "fastformer", "info"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "layer_norm_residual" in result.stdout
    assert "torch" in result.stdout
