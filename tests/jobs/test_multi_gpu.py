"""Multi-GPU readiness: on a cluster of 2 nodes × 2 (declared) GPUs, EMBED runs one actor per GPU —
each actor given exactly one GPU, never more actors than GPUs — and the shards' rows are embedded on
both nodes; and the CUDA code path (actors on a real GPU) where CUDA exists."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pathlib import Path
from types import SimpleNamespace

from jobs import storage
from jobs.embed_pass import run_embed
from jobs.extras import ExtraSpec
from jobs.shards import shard_of
from jobs.storage import StageDir
from jobs.workers import ModelSpec, gpus_per_actor, model_state_arrays
from oodlib.data.manifest import manifest_from_image_sets

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def digits_rows(digits_sets, n: int, shards: int) -> pa.Table:
    s = digits_sets[("digits", "test")]
    table = manifest_from_image_sets([s]).slice(0, n)
    return table.append_column("shard", pa.array(shard_of(table.column("image_id").to_pylist(), shards)))


@pytest.fixture(scope="module")
def two_nodes():
    """A local cluster: a head with 1 CPU and 2 nodes × (2 CPUs, 2 declared GPUs) — Ray only counts them."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=2, num_gpus=2) for _ in range(2)]
    # the workers import the hook's module from the repository root (a worker that cannot would restart forever)
    ray.init(address=cluster.address, runtime_env={"worker_process_setup_hook": "tests.jobs.fake_gpu_extra.register",
                                                   "env_vars": {"PYTHONPATH": str(ROOT)}})
    ray.data.DataContext.get_current().wait_for_min_actors_s = 300  # a pool that cannot start fails, never hangs
    try:
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_one_actor_per_gpu_and_shards_on_both_nodes(tmp_path, digits_model, digits_sets, two_nodes):
    import ray
    from ray.util.state import list_actors

    _, nodes = two_nodes
    assert ray.cluster_resources()["GPU"] == 4
    num_gpus = gpus_per_actor("auto")
    assert num_gpus == 1.0  # "auto": one GPU per actor on a cluster with GPUs
    rows = digits_rows(digits_sets, 240, 6)
    spec = ModelSpec("digits-cnn", digits_model.num_classes, ray.put(model_state_arrays(digits_model)), "cpu",
                     (ExtraSpec("where_embedded"),), preprocess=digits_model.preprocess)
    targets = {s: StageDir(tmp_path / "shards", f"s{s}", "shard-") for s in range(6)}
    counts = run_embed(rows, targets, spec, batch_size=4, num_actors=4, num_gpus=num_gpus, num_cpus=1, scratch=tmp_path / "scratch")
    assert sum(c["features"] for c in counts.values()) == 240
    actors = [a for a in list_actors(filters=[("class_name", "=", "MapWorker(MapBatches(EmbedActor))")], detail=True)]
    parts = [storage.read_table(t.path / "features", ["node_tag", "gpu_tag"]) for t in targets.values()]
    table = pa.concat_tables([p.append_column("shard", pa.array([s] * p.num_rows, pa.int32())) for s, p in zip(targets, parts)])
    # one actor per GPU: never more actors than GPUs, each with exactly one GPU of its own
    assert 1 <= len(actors) <= 4
    assert all(a.required_resources.get("GPU") == 1.0 for a in actors)
    assert {a.node_id for a in actors} <= {n.node_id for n in nodes}  # GPU actors only on the GPU nodes
    tags = {n.node_id: int(n.node_id[:6], 16) for n in nodes}
    where = table.to_pandas()
    used = set(zip(where.node_tag.astype(int), where.gpu_tag.astype(int)))
    assert all(bin(g - 1).count("1") == 1 for _, g in used)  # every row embedded by an actor holding one GPU
    assert len(used) == len(actors)  # each actor its own (node, GPU)
    # the shards spread over both nodes
    assert set(where.node_tag.astype(int)) == set(tags.values()), f"rows embedded on {set(where.node_tag)}; nodes {tags}"
    assert where.groupby("shard").node_tag.nunique().max() >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the CUDA path of EMBED is not exercised")
def test_embed_on_cuda_equals_cpu(tmp_path, digits_model, digits_sets):
    import ray

    from jobs.embed_pass import embed_batch
    from jobs.extras import build_extras

    rows = digits_rows(digits_sets, 64, 2)
    specs = (ExtraSpec("odin", {"temperature": 1000.0, "epsilon": 0.0014}),)
    cpu = embed_batch(digits_model, rows, torch.device("cpu"), build_extras(specs, digits_model, torch.device("cpu")))
    gpu_model = digits_model.to("cuda")
    try:
        gpu = embed_batch(gpu_model, rows, torch.device("cuda"), build_extras(specs, gpu_model, torch.device("cuda")))
    finally:
        digits_model.to("cpu")
    for c in ("features", "logits", "odin"):
        np.testing.assert_allclose(storage.column_numpy(gpu.column(c)), storage.column_numpy(cpu.column(c)), rtol=1e-3, atol=1e-3)
    # and through Ray: an actor per GPU on the real device
    ray.init(address="local", num_cpus=2, num_gpus=torch.cuda.device_count(), include_dashboard=False)
    try:
        spec = ModelSpec("digits-cnn", digits_model.num_classes, ray.put(model_state_arrays(digits_model)), "cuda",
                         specs, preprocess=digits_model.preprocess)
        targets = {s: StageDir(tmp_path / "shards", f"s{s}", "shard-") for s in range(2)}
        counts = run_embed(rows, targets, spec, batch_size=16, num_actors=torch.cuda.device_count(), num_gpus=1.0,
                           num_cpus=1, scratch=tmp_path / "scratch")
    finally:
        ray.shutdown()
    assert sum(c["features"] for c in counts.values()) == 64


class SlowScoreWorker:
    """:class:`jobs.stages.score.ScoreWorker` taking a second per shard: SCORE's pool gives work to
    the actors that are up first, and tiny shards would all be done before the other nodes' actors
    come up (so one node would hold every actor that ran)."""

    def __init__(self, specs_ref) -> None:
        from jobs.stages.score import ScoreWorker

        self.worker = ScoreWorker(specs_ref)

    def score_shard(self, *args) -> int:
        import time

        time.sleep(1.0)
        return self.worker.score_shard(*args)


def test_score_actors_get_the_bank_once_per_node(tmp_path, two_nodes, monkeypatch):
    """SCORE puts the fitted detectors (a KNN bank here) into the object store once; every ScoreWorker
    receives the reference, so each node holding workers pulls one copy — not one per actor — and
    the scores equal the driver's."""
    import ray
    from ray.util.state import list_actors

    from jobs.shards import commit_shard
    from jobs.stages import score
    from oodlib.detectors import make_detector

    _, nodes = two_nodes
    rng = np.random.default_rng(0)
    bank_h = rng.normal(size=(4000, 32)).astype(np.float32)  # 512 KB: stored in the object store, not inlined
    knn = make_detector("knn", k=5).fit_bank(bank_h, None)
    features, expected = {}, {}
    for s in range(8):
        n = 40
        h = rng.normal(size=(n, 32)).astype(np.float32)
        ids = [f"r/{s}/{i}" for i in range(n)]
        t = pa.table({"image_id": ids, "split": ["test"] * n, "label": pa.array([0] * n, pa.int32()),
                      "subset": pa.nulls(n, pa.string()), "batch": pa.nulls(n, pa.string()), "pred": pa.array([0] * n, pa.int32()),
                      "features": storage.vector_column(h), "logits": storage.vector_column(h[:, :4])})
        part = tmp_path / f"scratch{s}" / "features"
        storage.write_table(t, part / "dataset=d")
        target = StageDir(tmp_path / "features", f"f{s}", "shard-")
        commit_shard(target, {"features": part}, {})
        features[f"f{s}"] = target.path / "features"
        expected.update(zip(ids, knn.score(score.ScoreInputs(h, h[:, :4], {}))))
    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value, **kw: puts.append(real_put(value, **kw)) or puts[-1])
    monkeypatch.setattr(score, "ScoreWorker", SlowScoreWorker)
    ctx = SimpleNamespace(cfg=SimpleNamespace(runtime=SimpleNamespace(stall_timeout_s=300)), scratch=tmp_path / "scratch")
    targets = {k: StageDir(tmp_path / "scores", k, "shard-") for k in features}
    score.run_score(ctx, features, targets, {"knn": knn}, {"d": None})
    assert len(puts) == 1  # the detectors' state: one object for every actor
    workers = list_actors(filters=[("class_name", "=", "SlowScoreWorker")], detail=True)
    assert len(workers) == 5  # one per CPU of the cluster (head 1 + 2 × 2), 8 shards
    worker_nodes = {a.node_id for a in workers} - {None}  # placed (a pool's last actors may end unplaced)
    assert {n.node_id for n in nodes} <= worker_nodes
    # a copy on each node that ran workers (Ray keeps one per node's object store; the driver's node
    # holds the primary), none elsewhere
    where = set(ray.experimental.get_object_locations(puts)[puts[0]]["node_ids"])
    assert worker_nodes <= where <= worker_nodes | {ray.get_runtime_context().get_node_id()}, (where, worker_nodes)
    got = storage.read_table([t.path / "scores" for t in targets.values()], ["image_id", "score_knn"])
    assert got.num_rows == len(expected) == 320
    np.testing.assert_allclose(storage.column_numpy(got.column("score_knn")),
                               [expected[i] for i in got.column("image_id").to_pylist()], rtol=1e-5)
