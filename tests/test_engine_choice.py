"""Choosing an engine: the embedded one is the default and never imports Ray; bad choices
are refused before anything starts."""
from __future__ import annotations

import subprocess
import sys

import pytest

import hookwire.server as hs
from hookwire.server.cli import build_parser, main

NO_RAY_PROGRAM = r"""
import sys
import torch
import hookwire.server as hs
from hookwire.client import Connection

srv = hs.start(models=["tiny-gpt2"], port=0)
try:
    conn = Connection(srv.url)
    graph = {"model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"}, "sites": [],
             "nodes": [], "forward": {"return_type": "logits"}}
    out = conn.run(graph, {"input_ids": torch.tensor([[1, 2, 3]])})
    assert out.values["__logits__"].shape == (1, 3, 257), out.values.keys()
    conn.close()
finally:
    srv.stop()
loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
print("RAY_MODULES", loaded)
sys.exit(1 if loaded else 0)
"""


def test_embedded_server_never_imports_ray():
    """A fresh interpreter imports hookwire.server, serves a request on the default engine
    and stops: no ray module was imported (the extra may well be installed)."""
    done = subprocess.run([sys.executable, "-c", NO_RAY_PROGRAM], capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "RAY_MODULES []" in done.stdout


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="unknown engine"):
        hs.start(models=["tiny-gpt2"], engine="spark")


def test_ray_engine_wants_model_names_not_objects(hosted):
    with pytest.raises(TypeError, match="pass a list"):
        hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, engine="ray")


def test_cli_serve_knows_the_ray_options():
    args = build_parser().parse_args(["serve", "--engine", "ray", "--model", "tiny-gpt2",
                                      "--replicas", "3", "--gpus-per-replica", "2",
                                      "--device-map", "auto"])
    assert (args.engine, args.replicas, args.gpus_per_replica, args.device_map) == \
        ("ray", 3, 2.0, "auto")


def test_cli_refuses_a_bad_device_map(capsys):
    assert main(["serve", "--model", "tiny-gpt2", "--device-map", "[1, 2]"]) == 2
    assert "--device-map" in capsys.readouterr().err
