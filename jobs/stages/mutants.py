"""MUTANTS (before EMBED): the accepted model mutants and the SPRT threshold τ.

Mutants are rejection-sampled on the ID validation split (a mutant is its (operator, rate, seed)
row, never weights); τ is fitted on the LCR of the correct predictions of the whole validation
part — ID val plus the val part of every labelled extra set (:func:`jobs.stages.errors.validation_part`),
the rows every other error threshold is fitted on. EMBED's ``lcr`` extra regenerates the mutants
from the table and computes the flips per image in the same pass.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from jobs import storage
from jobs.config import ConfigError, JobConfig
from jobs.stages.base import Context, Stage, StageResult, labels_of, rows_hash
from jobs.stages.errors import validation_part
from oodlib.data.decode import decode_batch
from oodlib.errors.lcr import fit_sprt_tau, label_change_rate
from oodlib.errors.mutants import generate_mutants, predict


@dataclass
class MutantsResult(StageResult):
    table: dict  # the mutants' (operator, rate, seed …) columns
    tau: float
    info: dict

    def counts(self) -> dict:
        return {"accepted": self.info["accepted"], "rejected": self.info["rejected"]}


class MutantsStage(Stage):
    name = "mutants"
    version = 1

    def enabled(self, cfg: JobConfig) -> bool:
        return cfg.errors.enabled

    def needs(self, cfg: JobConfig) -> tuple[str, ...]:
        return ("manifest",)

    def key(self, ctx: Context, up: dict) -> dict:
        e = ctx.cfg.errors
        self._val = validation_part(ctx.cfg, up["manifest"].rows)
        return {"model": ctx.model_hash, "val": rows_hash(self._val), "mutants": e.mutants.model_dump(), "sprt": e.sprt.model_dump()}

    def run(self, ctx: Context, up: dict, tmp: Path) -> None:
        e, model, val = ctx.cfg.errors, ctx.model, self._val
        is_id = np.asarray(val.column("dataset").to_pylist()) == ctx.cfg.data.id_dataset
        if not is_id.any():
            raise ConfigError(f"errors: mutants are accepted on the validation split of {ctx.cfg.data.id_dataset!r}, which has no rows")
        x, reasons = decode_batch(val.column("image").to_pylist(), val.column("path").to_pylist(), model.preprocess,
                                  ctx.cfg.data.max_image_bytes)
        ok = np.array([r is None for r in reasons])
        y, is_id = labels_of(val)[ok], is_id[ok]
        m = e.mutants
        ctx.progress(f"searching {m.n_accepted} mutants ({m.operator} {m.rate}) on {int(is_id.sum())} ID val images")
        try:
            mutants = generate_mutants(model, x[is_id], y[is_id], m.operator, m.rate, m.n_accepted, m.max_tries)
        except RuntimeError as exc:  # the rejection-sampling cap: a config problem, not a crash
            raise ConfigError(f"errors.mutants: {exc}") from None
        preds = predict(model, x)
        res = label_change_rate(model, x, mutants.patches(model), preds=preds, batch_size=1024)
        correct = preds.numpy() == y
        tau = fit_sprt_tau(res.lcr[correct], mutants.n_accepted, e.sprt.confidence, e.sprt.band)
        storage.write_table(pa.Table.from_pandas(mutants.to_frame(), preserve_index=False), tmp, "mutants.parquet")
        (tmp / "sprt.json").write_text(json.dumps({
            "tau": tau, "accepted": mutants.n_accepted, "rejected": mutants.n_rejected,
            "original_val_acc": float(np.mean(correct[is_id])), "tau_rows": int(correct.sum()),
        }))

    def load(self, ctx: Context, up: dict, path: Path) -> MutantsResult:
        table = pd.read_parquet(path / "mutants.parquet")
        info = json.loads((path / "sprt.json").read_text())
        m = ctx.cfg.errors.mutants
        ctx.progress(f"{info['accepted']} accepted, {info['rejected']} rejected ({m.operator} {m.rate}); SPRT τ = "
                     f"{info['tau']:.4f} from {info['tau_rows']} correct validation predictions")
        return MutantsResult(path, table.to_dict("list"), info["tau"], info)
