"""The dataflow graph engine (foldattn.graph): tracing that other threads cannot see."""

from __future__ import annotations

import threading
import time
import warnings

import torch
import torchvision

import foldattn
from foldattn.graph import build_graph, graph_from_run


def test_tracing_leaves_models_in_other_threads_alone() -> None:
    """torch.fx patches nn.Module.__call__/__getattr__ for the whole process while it traces: models
    served by other threads (the traced model itself included) must run as if nothing traced."""
    served = foldattn.create_model("cifar_resnet20", attention="se", asr=True).eval()
    other = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = served(x)
    stop = threading.Event()
    failures: list[str] = []
    calls = [0]

    def serve() -> None:
        while not stop.is_set():
            try:
                with torch.no_grad():
                    y = served(x)
                if not torch.equal(y, ref):
                    failures.append("different output")
                calls[0] += 1
            except Exception as e:  # every failure counts, whatever it is
                failures.append(repr(e)[:120])

    threads = [threading.Thread(target=serve) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        deadline, rounds = time.time() + 3.0, 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            while time.time() < deadline or rounds < 2:
                foldattn.attach(other, "se")                       # traces another model
                foldattn.fold(served, fuse_bn=True)                # traces a copy of the served one
                foldattn.find_sites(served, allow_existing=True)   # traces the served model itself
                graph_from_run(served, x)                          # hooks on the served model
                rounds += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert calls[0] > 0 and rounds >= 2
    assert failures == [], f"{len(failures)} failures in serving threads, e.g. {failures[:3]}"


def test_recorded_graph_matches_the_fx_graph_calls() -> None:
    model = foldattn.create_model("cifar_resnet20", attention="se", asr=True)
    fx, _ = build_graph(model)
    run = graph_from_run(model, torch.randn(1, 3, 32, 32))
    assert fx is not None and fx.calls() == run.calls()
