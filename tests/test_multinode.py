"""Two nodes on one machine: two torchrun launchers (node ranks 0 and 1, one process each).

    pytest -m slow tests/test_multinode.py      # ~1.5 minutes on 2 cores

Two nodes of one process train to the same weights as one node of two processes, bitwise; an
``output_dir`` that is not the same folder on every node stops with one line before training.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import warm_python
from test_train_e2e import REPO, _base, _env, final_weights

pytestmark = pytest.mark.slow

COMMON = ["train.per_device_batch_size=2", "train.max_steps=3", "train.save_steps=3", "data.val=[]"]


def _two_nodes(outputs: tuple[Path, Path], overrides: list[str], timeout: int = 400):
    """Start node ranks 0 and 1 as a cluster scheduler would (one launcher per node); wait for both."""
    port, torchrun = warm_python.free_port(), str(Path(sys.executable).parent / "torchrun")
    procs = [
        subprocess.Popen(
            [
                torchrun,
                "--nnodes",
                "2",
                "--node_rank",
                str(node),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "train/finetune.py",
                "--config",
                "configs/demo.yaml",
                *overrides,
                f"train.output_dir={out}",
            ],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node, out in enumerate(outputs)
    ]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def test_two_nodes_train_the_same_weights_as_one_node_of_two(zero2_two_process_run, tmp_path):
    two = tmp_path / "two-nodes"
    one, args = zero2_two_process_run  # one node of two processes, shared with test_train_resume.py
    assert set(COMMON) <= set(args)
    results = _two_nodes((two, two), [a for a in args if not a.startswith("train.output_dir=")])
    for code, out, err in results:
        assert code == 0, f"{out[-2000:]}\n{err[-3000:]}"
    assert "processes=2" in results[0][1]
    a, b = final_weights(one), final_weights(two)
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not (two / ".rank0-marker").exists()


def test_a_node_local_output_dir_stops_with_one_line(tiny_llava_dir, tmp_path):
    # Two different folders stand for one path on two node-local disks.
    a, b = tmp_path / "node0-disk", tmp_path / "node1-disk"
    args = [x for x in _base(tiny_llava_dir, a) + COMMON if not x.startswith("train.output_dir=")]
    results = _two_nodes((a, b), args)
    # Each worker exits 2 (a usage error); torchrun reports it and exits 1 itself.
    assert [code for code, _, _ in results] == [1, 1], results
    assert all("failed (exitcode: 2)" in err for _, _, err in results), results
    errors = [line for _, _, err in results for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors  # printed once, by rank 0
    assert f"train.output_dir: {a} is not the same folder on every node" in errors[0]
    assert f"missing on {socket.gethostname()}" in errors[0]
    assert not (a / "checkpoint-3").exists() and not (b / "checkpoint-3").exists()
