"""Fault tolerance: worker nodes killed during EMBED and before SCORE, a driver killed mid-job, a failing actor."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from jobs import pipeline, shards, storage
from jobs.embed_pass import run_embed
from jobs.workers import ModelSpec, model_state_arrays
from jobs.config import parse_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_ray_left_behind():
    """Each test here starts its own Ray (a cluster, or the job's local one): none may leak."""
    import ray

    yield
    ray.shutdown()


def job_config(tmp_path, **embed_cfg) -> dict:
    return {
        "experiment": "ft",
        "output": str(tmp_path / "out"),
        "data": {"source": "digits", "limit_per_split": 40, "ood_datasets": ["digits-near", "noise"]},
        "embed": {"batch_size": 8, "num_actors": 2, "num_shards": 6, **embed_cfg},
        "mlflow": {"enabled": False},
    }


def scores_of(summary):
    df = storage.read_table(shards.index_dirs(summary["stages"]["score"], "scores")).to_pandas()
    return df.sort_values("image_id").reset_index(drop=True)


def test_worker_nodes_killed_during_embed_and_before_score(tmp_path, monkeypatch):
    """One node is lost mid-EMBED; another just as SCORE starts, before Ray has marked it dead (so
    SCORE's pool still counts its CPU and places an actor there). The job completes, losing nothing."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from jobs.stages import score

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(3)]  # fake GPUs
    ray.init(address=cluster.address)
    lost, run_score = [], score.run_score

    def lose_a_node_then_score(*args, **kwargs):
        node = next(w for w in workers if w not in lost)
        lost.append(node)
        cluster.remove_node(node, allow_graceful=False)
        return run_score(*args, **kwargs)

    monkeypatch.setattr(score, "run_score", lose_a_node_then_score)
    try:
        cfg = parse_config(job_config(tmp_path, num_gpus_per_actor=1))
        result = {}
        job = threading.Thread(target=lambda: result.update(summary=pipeline.run(cfg)), daemon=True)
        job.start()
        victim, deadline = None, time.time() + 120
        while victim is None and time.time() < deadline and job.is_alive():
            alive = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "EmbedActor" in a.class_name]
            on_worker = [a for a in alive if a.node_id in {w.node_id for w in workers}]
            victim = next((w for w in workers if on_worker and w.node_id == on_worker[0].node_id), None)
            time.sleep(0.2)
        assert victim is not None, "no EMBED actor came up on a worker node"
        lost.append(victim)
        cluster.remove_node(victim, allow_graceful=False)  # mid-EMBED, without warning
        job.join(timeout=400)
        assert not job.is_alive() and "summary" in result
        summary = result["summary"]
        features = storage.read_table(shards.index_dirs(summary["stages"]["embed"], "features")).to_pandas()
        ids = features.image_id.tolist()
        assert len(ids) == len(set(ids)) == summary["counts"]["embed"]["input"]  # no loss, no duplicates
        assert len(lost) == 2 and len(scores_of(summary)) == len(ids) - 40  # every row but the 40 ID-train ones scored
    finally:
        ray.shutdown()
        cluster.shutdown()


def run_job_process(config_path: Path, log: Path) -> subprocess.Popen:
    """The job as its own process group; its output goes to ``log`` (read when it ends early)."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "jobs.nightly", "--config", str(config_path)], cwd=REPO, env=env,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )


def test_driver_killed_mid_job_resumes_with_equal_tables(tmp_path):
    raw = job_config(tmp_path, shards_per_wave=1, num_actors=1)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    log = tmp_path / "job.log"
    proc = run_job_process(tmp_path / "job.yaml", log)
    shard_root = tmp_path / "out" / "ft" / "tables" / "features"  # EMBED commits its shards into the table
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(shard_root.glob("shard-*/_SUCCESS"))) < 2:
        time.sleep(0.2)
    assert proc.poll() is None, f"the job ended (rc {proc.returncode}) before the kill:\n{log.read_text()[-4000:]}"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait(timeout=30)
    committed = len(list(shard_root.glob("shard-*/_SUCCESS")))
    assert 2 <= committed < 6, f"kill did not land mid-EMBED ({committed} shards committed)"
    assert not (tmp_path / "out" / "ft" / "last_run.json").exists()

    resumed = pipeline.run(parse_config(raw))
    assert resumed["counts"]["embed"]["shards_recomputed"] == 6 - committed
    reference = pipeline.run(parse_config({**raw, "output": str(tmp_path / "ref")}))
    a, b = scores_of(resumed), scores_of(reference)
    assert len(a) == resumed["counts"]["embed"]["input"] - 40 and a.image_id.is_unique  # all but the 40 ID-train images
    assert a.equals(b)  # row for row, value for value


def test_actor_failure_fails_stage_without_committing(tmp_path):
    import ray

    from oodlib.models import load_model

    ray.init(address="local", num_cpus=1, include_dashboard=False)  # a fresh local instance
    try:
        model = load_model("digits-cnn")
        state = model_state_arrays(model)
        state["head.weight"] = state["head.weight"][:, :10]  # does not fit the architecture
        spec = ModelSpec("digits-cnn", 8, ray.put(state), "cpu")
        from oodlib.data.digits import build_digits
        from oodlib.data.manifest import manifest_from_image_sets
        import pyarrow as pa

        rows = manifest_from_image_sets([s for s in build_digits(0) if s.dataset == "noise"])
        rows = rows.append_column("shard", pa.array(np.zeros(rows.num_rows, np.int32)))
        target = storage.StageDir(tmp_path / "embed", "k")
        with pytest.raises(Exception, match="size mismatch"):
            run_embed(rows, {0: target}, spec, 64, 1, 0.0, 1.0, tmp_path / "scratch")
        assert not target.committed()
        assert not (tmp_path / "embed").exists() or not any((tmp_path / "embed").iterdir())  # no half-written result
    finally:
        ray.shutdown()
