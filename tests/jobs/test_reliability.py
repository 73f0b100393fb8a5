"""Never silently wrong: damaged commits are recomputed, FIT is byte-reproducible, hostile rows
are counted, bad configs exit 2 before Ray, nothing hangs on a one-CPU cluster, local Ray listens
on the loopback interface only."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs import cli, pipeline, shards, storage
from jobs.config import parse_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def one_cpu_ray():
    """A local Ray with one CPU: every stage must get through with a single free CPU."""
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def small(tmp_path: Path, **data) -> dict:
    return {
        "experiment": "r", "output": str(tmp_path / "out"),
        "data": {"source": "digits", "limit_per_split": 30, **data},
        "embed": {"batch_size": 32, "num_actors": 1, "num_shards": 3},
        "detectors": ["msp", "mahalanobis", "react", {"name": "knn", "params": {"k": 5}}, "line"],
        "mlflow": {"enabled": False},
        "runtime": {"stall_timeout_s": 600},
    }


def metrics_of(summary: dict) -> pd.DataFrame:
    df = pd.read_parquet(Path(summary["stages"]["evaluate"]) / "metrics.parquet")
    return df.sort_values(["task", "method", "dataset", "metric"]).reset_index(drop=True)


def first_file(directory: Path, pattern: str = "*.parquet") -> Path:
    return sorted(Path(directory).rglob(pattern))[0]


def test_damaged_commits_are_recomputed_and_tables_equal_an_undamaged_run(tmp_path, one_cpu_ray):
    cfg = parse_config(small(tmp_path))
    ref = pipeline.run(cfg)
    expected = metrics_of(ref)
    feature_dirs = shards.index_dirs(Path(ref["stages"]["embed"]), "features")

    # 1. a truncated features file: its shard is re-embedded, everything downstream equals the reference
    f = first_file(feature_dirs[0])
    f.write_bytes(f.read_bytes()[:200])
    again = pipeline.run(cfg)
    assert again["counts"]["embed"]["shards_recomputed"] == 1 and not again["reused"]["embed"]
    pd.testing.assert_frame_equal(metrics_of(again), expected)

    # 2. the reported case: a truncated score file and the metrics directory removed
    s = first_file(shards.index_dirs(Path(again["stages"]["score"]), "scores")[1])
    s.write_bytes(s.read_bytes()[:-30])
    storage.discard(Path(again["stages"]["evaluate"]))
    third = pipeline.run(cfg)
    assert not third["reused"]["score"] and not third["reused"]["evaluate"]
    pd.testing.assert_frame_equal(metrics_of(third), expected)

    # 3. a bit flipped in a fitted detector (same size): `oodlib verify --repair` finds it, the rerun refits
    det = Path(third["stages"]["fit"]) / "detectors" / "mahalanobis.safetensors"
    data = bytearray(det.read_bytes())
    data[-5] ^= 0x10
    det.write_bytes(bytes(data))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(small(tmp_path)))
    assert cli.main(["verify", "--config", str(path)]) == 1
    assert cli.main(["verify", "--config", str(path), "--repair"]) == 1
    assert cli.main(["verify", "--config", str(path)]) == 0
    fourth = pipeline.run(cfg)
    assert not fourth["reused"]["fit"] and fourth["reused"]["embed"]
    pd.testing.assert_frame_equal(metrics_of(fourth), expected)
    # FIT is reproducible: the refitted state has the bytes of the first fit
    assert det.read_bytes() != bytes(data)
    ref_fit = json.loads((Path(ref["stages"]["fit"]) / storage.FILES).read_text())
    new_fit = json.loads((Path(fourth["stages"]["fit"]) / storage.FILES).read_text())
    assert ref_fit == new_fit


def test_fit_merges_partials_in_file_order_whatever_finishes_first(one_cpu_ray):
    import ray

    from jobs.workers import ordered_map

    @ray.remote(num_cpus=0)
    def slow(i):  # later items finish first
        time.sleep(0.05 * (5 - i))
        return i

    assert list(ordered_map(lambda i: slow.remote(i), list(range(5)), 5, 60, "test")) == [0, 1, 2, 3, 4]


def test_stalled_stage_fails_with_a_clear_message(one_cpu_ray):
    import ray

    from jobs.workers import StageStalled, ordered_map

    @ray.remote(num_cpus=2)  # more CPUs than this cluster has: never scheduled
    def needs_two():
        return 1

    with pytest.raises(StageStalled, match="no progress for 2 s.*CPU"):
        list(ordered_map(lambda _: needs_two.remote(), [0], 1, 2, "TEST"))


class Doubler:
    """A pool actor for :func:`jobs.workers.actor_map`; its process dies on ``die_on`` the first
    time (the marker file says it happened)."""

    def __init__(self, fail: bool = False):
        if fail:
            raise ValueError("cannot load the detectors")

    def work(self, i: int, die_on: int = -1, marker: str = "") -> int:
        if i == die_on and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)  # as when the actor's node is lost
        if i == 99:
            raise ValueError("item 99 is bad")
        return 2 * i


def test_actor_map_gives_no_work_to_an_actor_that_never_comes_up(one_cpu_ray):
    """The CI failure: a node killed just before SCORE (not yet marked dead) got an actor, and the
    shards dealt to it round-robin waited for it forever."""
    import ray

    from jobs.workers import StageStalled, actor_map

    made = []

    def make():  # the first actor needs a resource no node has: it is never placed
        opts = {"resources": {"lost_node": 1}} if not made else {"num_cpus": 0}
        made.append(ray.remote(Doubler).options(**opts).remote())
        return made[-1]

    out = list(actor_map(make, lambda a, i: a.work.remote(i), list(range(7)), 3, 60, "TEST"))
    assert out == [2 * i for i in range(7)] and len(made) == 3
    # and with no actor that can come up, the map fails after the stall timeout, saying so
    never = lambda: ray.remote(Doubler).options(resources={"lost_node": 1}).remote()  # noqa: E731
    with pytest.raises(StageStalled, match=r"no progress for 2 s \(0 of 2 done, 0 actors up, 1 not yet placed\)"):
        list(actor_map(never, lambda a, i: a.work.remote(i), [0, 1], 1, 2, "TEST"))


def test_actor_map_reruns_the_item_of_a_lost_actor_elsewhere(one_cpu_ray, tmp_path):
    import ray

    from jobs.workers import actor_map

    made, marker, done = [], tmp_path / "died", []

    def make():
        made.append(ray.remote(num_cpus=0)(Doubler).remote())
        return made[-1]

    out = list(actor_map(make, lambda a, i: a.work.remote(i, 4, str(marker)), list(range(9)), 2, 60, "TEST",
                         progress=lambda n, total: done.append((n, total))))
    assert marker.exists()  # an actor died on item 4
    assert out == [2 * i for i in range(9)]  # and item 4 still has its result, in order
    assert len(made) == 3  # the two, and one replacement
    assert done == [(n, 9) for n in range(1, 10)]


def test_actor_map_fails_at_once_on_a_bug(one_cpu_ray):
    import ray

    from jobs.workers import actor_map

    make = lambda: ray.remote(num_cpus=0)(Doubler).remote()  # noqa: E731
    with pytest.raises(ValueError, match="item 99 is bad"):
        list(actor_map(make, lambda a, i: a.work.remote(i), [1, 99, 2], 1, 60, "TEST"))
    broken = lambda: ray.remote(num_cpus=0)(Doubler).remote(fail=True)  # noqa: E731
    with pytest.raises(Exception, match="cannot load the detectors"):
        list(actor_map(broken, lambda a, i: a.work.remote(i), [1, 2], 1, 60, "TEST"))


def test_manifest_rows_of_unknown_or_null_datasets_are_quarantined(tmp_path, one_cpu_ray, digits_sets):
    from oodlib.data.digits import ImageSet
    from oodlib.data.manifest import manifest_from_image_sets

    sets = [digits_sets[k] for k in [("digits", "train"), ("digits", "test"), ("noise", "test")]]
    sets = [ImageSet(s.dataset, s.split, s.images[:40], s.labels[:40], s.image_ids[:40]) for s in sets]
    table = manifest_from_image_sets(sets)
    datasets = table.column("dataset").to_pylist()
    datasets[0], datasets[1], datasets[45] = "Digits", None, ""  # misspelt, null, empty
    table = table.set_column(table.schema.get_field_index("dataset"), "dataset", pa.array(datasets, pa.string()))
    pq.write_table(table, tmp_path / "m.parquet")
    raw = {**small(tmp_path, source="manifest", manifest=str(tmp_path / "m.parquet"), ood_datasets=["noise"]),
           "detectors": ["msp"]}
    raw["data"].pop("limit_per_split")
    summary = pipeline.run(parse_config(raw))
    images = summary["images"]
    assert images["input"] == table.num_rows == images["features"] + images["quarantined"]
    q = pq.read_table(Path(summary["stages"]["manifest"]) / "quarantine.parquet").to_pandas().set_index("image_id")
    ids = table.column("image_id").to_pylist()
    assert "'Digits' is not configured" in q.loc[ids[0], "reason"]
    assert q.loc[ids[1], "reason"] == q.loc[ids[45], "reason"] == "dataset is null or empty"


@pytest.mark.parametrize("setting, field", [
    ("embed.batch_size=[1,", "--set 'embed.batch_size=[1,'"),
    ("model.device=tpu", "model.device"),
    ("embed.batch_size=true", "embed.batch_size"),
    ("output=FILE", "output"),
    ("detectors=[odin, {name: odin, params: {temperature: 2}, column: odin_t2}]", "`odin` column"),
])
def test_config_errors_exit_2_naming_the_field_before_ray(tmp_path, monkeypatch, capsys, setting, field):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray must not start")))
    (tmp_path / "FILE").write_text("a file, not a directory")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(small(tmp_path)))
    assert cli.main(["run", "--config", str(path), "--set", setting.replace("FILE", str(tmp_path / "FILE"))]) == 2
    assert field in capsys.readouterr().err


def test_list_topped_config_exits_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("- experiment: x\n")
    assert cli.main(["run", "--config", str(path), "--set", "embed.batch_size=8"]) == 2
    assert "top level must be a mapping" in capsys.readouterr().err


def test_local_ray_listens_on_loopback_only(tmp_path):
    """Every socket the job's process tree listens on (GCS, raylet, object manager, workers,
    agents, metrics) is bound to 127.0.0.1 / ::1, sampled while the job runs."""
    import psutil

    path = tmp_path / "c.yaml"
    raw = small(tmp_path)
    raw["embed"]["num_actors"] = 1
    path.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.nightly", "--config", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = {}
    try:
        while proc.poll() is None:
            try:
                tree = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)} | {proc.pid}
            except psutil.NoSuchProcess:
                break
            for c in psutil.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN and c.pid in tree:
                    seen[(c.laddr.ip, c.laddr.port)] = c.pid
            time.sleep(0.5)
        out = proc.communicate(timeout=600)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert len(seen) >= 3  # GCS, raylet, workers … were seen
    loopback = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
    assert {ip for ip, _ in seen} <= loopback, f"non-loopback listeners: {[k for k in seen if k[0] not in loopback]}"


def test_copied_output_tree_is_self_contained(tmp_path, one_cpu_ray):
    """Pointer files hold relative paths: a copied output tree is reused as it is, never the original."""
    import shutil

    raw = {**small(tmp_path), "detectors": ["msp"]}
    first = pipeline.run(parse_config(raw))
    shutil.copytree(tmp_path / "out", tmp_path / "copy")
    shutil.rmtree(tmp_path / "out")
    again = pipeline.run(parse_config({**raw, "output": str(tmp_path / "copy")}))
    assert all(again["reused"].values()) and all(str(tmp_path / "copy") in p for p in again["stages"].values())
    feats = storage.read_table(shards.index_dirs(Path(again["stages"]["embed"]), "features"), ["dataset", "split"]).to_pandas()
    assert len(feats) == first["images"]["features"]
    scored = int((~((feats.dataset == "digits") & (feats.split == "train"))).sum())  # all but the fitting data
    assert storage.read_table(shards.index_dirs(Path(again["stages"]["score"]), "scores")).num_rows == scored


def test_embed_actor_the_cluster_cannot_place_fails_instead_of_hanging(tmp_path, one_cpu_ray):
    from jobs.workers import StageStalled

    raw = small(tmp_path)
    raw["embed"]["cpus_per_actor"] = 2.0  # this cluster has one CPU
    raw["runtime"]["stall_timeout_s"] = 5
    with pytest.raises(StageStalled, match="EMBED.*an actor needs 2 CPU"):
        pipeline.run(parse_config(raw))
    assert not list((tmp_path / "out" / "r" / "embed").glob("key=*"))  # nothing that looks complete
