"""``edge-mllm simulate BUNDLE --device NAME --emulate``: the tiny LLaVA's ONNX bundle runs here with the
device's big-core thread count capped at this host's cores; a budget it exceeds fails with exit 1."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
from edge_mllm.export.bundle import export_bundle

from edge_mllm.checkpoint import load_model
from edge_mllm.cli import main
from edge_mllm.sim import profiles
from edge_mllm.sim.emulate import emulate, format_emulation
from edge_mllm.sim.profiles import get_device

DEVICE = "snapdragon-8-gen-3"  # 6 big cores: more than this host's, so the cap shows


@pytest.fixture(scope="module")
def bundle(llava, tmp_path_factory):
    return export_bundle(copy.deepcopy(load_model(llava.path)), "onnx", tmp_path_factory.mktemp("emu") / "onnx",
                         progress=False)


@pytest.fixture
def tiny_budget(monkeypatch):
    """``snapdragon-8-gen-3`` with a 1 MiB app budget, wherever the CLI looks it up."""
    real = profiles.get_device

    def fake(name):
        device = real(name)
        return dataclasses.replace(device, app_budget_gb=2**20 / 1e9) if device.key == DEVICE else device

    monkeypatch.setattr(profiles, "get_device", fake)


def test_emulate_caps_threads_and_measures_memory(bundle):
    from edge_mllm.bench.suite import host_cores

    device = get_device(DEVICE)
    e = emulate(str(bundle), device, tokens=4)
    assert e.device_threads == device.big_cores and e.threads == min(device.big_cores, host_cores())
    assert e.peak_rss_mib > e.baseline_rss_mib > 0 and e.bundle_rss_mib == pytest.approx(
        e.peak_rss_mib - e.baseline_rss_mib)
    assert e.fits and e.budget_mib == pytest.approx(device.app_budget_gb * 1e9 / 2**20)
    assert e.timings["decode_tok_s"] > 0
    assert "fits" in format_emulation(e)


def test_cli_emulate_passes_within_the_budget(bundle, capsys):
    code = main(["simulate", str(bundle), "--device", DEVICE, "--emulate", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    data = json.loads(out.out)
    assert data["device"] == DEVICE and data["emulation"]["fits"] is True and data["decode_tok_s"] > 0


def test_cli_emulate_fails_over_the_budget(bundle, capsys, tiny_budget):
    code = main(["simulate", str(bundle), "--device", DEVICE, "--emulate"])
    out = capsys.readouterr()
    assert code == 1
    assert "EXCEEDS" in out.out and "emulated on this host" in out.out
    assert out.err.startswith("error: ") and "over snapdragon-8-gen-3's 1 MiB app budget" in out.err
    assert len(out.err.splitlines()) == 1


def test_cli_emulate_needs_a_bundle(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["simulate", "--config", str(tmp_path / "config.json"), "--quant", "q4_0", "--device", DEVICE,
                 "--emulate"]) == 2
    assert "--emulate runs a BUNDLE" in capsys.readouterr().err
