"""The Ray executor on a real two-node cluster started inside the test (``ray.cluster_utils``):
trials go to both nodes, each trial's report names the node that ran it."""

from __future__ import annotations

import importlib.util
import json

import builders
import pytest

pytest.importorskip("optuna", reason="search needs optuna (the [search] extra)")

from onnxcomp.search import search

FAST = {"runs": 3, "min_seconds": 0.0, "progress": lambda message: None}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="ray is not installed (the [search] extra)")
def test_trials_run_on_both_nodes_of_a_two_node_cluster(tmp_path):
    from ray.cluster_utils import Cluster

    # 1 CPU per node and 1 CPU per trial: two trials at once cannot share a node
    node = {"num_cpus": 1, "object_store_memory": 100 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        nodes = {n.node_id for n in cluster.list_all_nodes()}
        assert len(nodes) == 2
        result = search(builders.mlp(), calib="random:4", eval_data="random:4",
                        constraints=["cosine>=0.9"], objectives="size", n_trials=4,
                        out_dir=tmp_path, executor="ray", ray_address=cluster.address,
                        workers=2, seed=1, **FAST)
    finally:
        cluster.shutdown()
    assert len(result.trials) == 4 and all(t.state == "COMPLETE" for t in result.trials)
    ran_on = [json.loads((tmp_path / "trials" / f"{t.number:04d}" / "report.json").read_text())
              ["node"] for t in result.trials]
    assert set(ran_on) == nodes  # both nodes ran trials, and only the cluster's nodes
