"""The MLflow model registry: champion / challenger aliases, the promotion rule, the promotion log,
rollback, and ``champion_onnx_path`` for the API. Imports mlflow only (never torch).

Promotion rule (``promotion_decision``), applied when a challenger is registered and by
``tickcast model promote``:

1. Both models are scored on the challenger's validation origins (the champion's ONNX file is
   re-run with onnxruntime on exactly those windows; the metrics are logged on the challenger's run
   as ``val_<target>_pinball`` and ``champion_val_<target>_pinball``, with the champion's version in
   the tag ``champion_ref_version``).
2. The challenger is promoted only if
   a. the mean over the targets (close at H, rv, range) of pinball(challenger) / pinball(champion)
      is at most ``1 - MIN_MEAN_GAIN`` (1% better on average),
   b. no target's pinball is more than ``MAX_TARGET_LOSS`` (2%) worse, and
   c. every target's validation coverage of [q0.1, q0.9] lies in ``COVERAGE_BAND`` (0.70-0.90).
   With no champion yet, (c) alone decides. If the champion could not be scored on the
   challenger's data (other variates) or the reference is stale (the champion moved since), the
   challenger is not promoted automatically; ``--force`` overrides, and says so in the log.

Every alias move is appended to the promotion log: registered-model tags ``promotion.<seq>``
(JSON: time, action, from, to, reason) mirrored to ``<data_dir>/mlflow/promotions.jsonl``.
``rollback`` moves ``champion`` back to the version that held it before the current one.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

TARGETS = ("close", "rv", "range")
MIN_MEAN_GAIN = 0.01
MAX_TARGET_LOSS = 0.02
COVERAGE_BAND = (0.70, 0.90)
CHAMPION, CHALLENGER = "champion", "challenger"


class NoChampionError(LookupError):
    """No model version holds the champion alias yet."""


@dataclass
class Decision:
    promote: bool
    reason: str


def promotion_decision(challenger: dict, champion: dict | None) -> Decision:
    """``challenger``/``champion``: {target: {"pinball": .., "coverage": ..}} on the same validation
    origins (``champion`` None when there is no champion)."""
    for t in TARGETS:
        if t not in challenger:
            return Decision(False, f"challenger has no validation metrics for {t}")
    lo, hi = COVERAGE_BAND
    bad_cov = [f"{t}={challenger[t]['coverage']:.3f}" for t in TARGETS
               if not (lo <= challenger[t]["coverage"] <= hi)]
    if bad_cov:
        return Decision(False, f"validation coverage of [q0.1,q0.9] outside {lo:.2f}-{hi:.2f}: {', '.join(bad_cov)}")
    unusable = [f"{who} {t}={m[t].get('pinball')!r}" for who, m in (("challenger", challenger), ("champion", champion))
                if m is not None for t in TARGETS
                if not (isinstance(m.get(t, {}).get("pinball"), (int, float)) and math.isfinite(m[t]["pinball"])
                        and m[t]["pinball"] > 0)]
    if unusable:  # a NaN ratio would pass every comparison below
        return Decision(False, f"validation pinball not a positive finite number: {', '.join(unusable)}")
    if champion is None:
        return Decision(True, "no champion yet; challenger's validation coverage is within the band")
    ratios = {t: challenger[t]["pinball"] / champion[t]["pinball"] for t in TARGETS}
    mean_ratio = sum(ratios.values()) / len(ratios)
    worst = max(ratios, key=ratios.get)
    detail = ", ".join(f"{t} {r:.4f}" for t, r in ratios.items())
    if ratios[worst] > 1 + MAX_TARGET_LOSS:
        return Decision(False, f"{worst} pinball {100 * (ratios[worst] - 1):.2f}% worse than the champion ({detail})")
    if mean_ratio > 1 - MIN_MEAN_GAIN:
        return Decision(False, f"mean pinball ratio {mean_ratio:.4f} > {1 - MIN_MEAN_GAIN:.2f} ({detail})")
    return Decision(True, f"mean pinball ratio {mean_ratio:.4f} vs champion ({detail})")


# -------------------------------------------------------------------------------------- the client
def _ensure_local_store(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)


def client(settings):
    from mlflow import MlflowClient

    uri = settings.mlflow_tracking_uri
    _ensure_local_store(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def artifact_root(settings) -> str:
    return (Path(settings.data_dir).resolve() / "mlflow" / "artifacts").as_uri()


def ensure_experiment(settings, name: str = "tickcast") -> str:
    c = client(settings)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    loc = artifact_root(settings) if settings.mlflow_tracking_uri.startswith("sqlite") else None
    try:
        return c.create_experiment(name, artifact_location=loc)
    except Exception:  # created concurrently
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def alias_version(settings, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client(settings).get_model_version_by_alias(settings.model_name, alias).version)
    except MlflowException:
        return None


def _cache_dir(settings) -> Path:
    return Path(settings.data_dir) / "model_cache" / settings.model_name


def version_onnx_path(settings, version: str) -> Path:
    """Download (once per version and origin) the ONNX file of a model version and return its path."""
    import mlflow.artifacts

    version = str(version)
    if not version.isdigit():
        raise ValueError(f"model version must be a number, got {version!r}")
    dest = _cache_dir(settings) / version
    target, origin = dest / "model.onnx", dest / "origin.txt"
    c = client(settings)
    mv = c.get_model_version(settings.model_name, version)
    # version numbers restart when a registered model is deleted or the MLflow store is reset: the
    # cached file is this version's only if it came from the same run and source
    ident = f"{mv.run_id}\n{mv.source}"
    if target.is_file() and origin.is_file() and origin.read_text() == ident:
        return target
    tmp = dest.with_name(f".{version}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    got = None
    errors = []
    for uri in (f"{mv.source.rstrip('/')}/model.onnx", f"runs:/{mv.run_id}/onnx/model.onnx"):
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp),
                                                           tracking_uri=settings.mlflow_tracking_uri))
            break
        except Exception as exc:  # try the next location
            errors.append(f"{uri}: {exc}")
    if got is None or not got.is_file():
        raise FileNotFoundError(f"no ONNX file for {settings.model_name} v{version}: {'; '.join(errors)}")
    dest.mkdir(parents=True, exist_ok=True)
    os.replace(got, target)
    origin.write_text(ident)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return target


def champion_onnx_path(settings) -> tuple[str, Path]:
    """(version, local path of the champion's model.onnx); raises NoChampionError without one."""
    version = alias_version(settings, CHAMPION)
    if version is None:
        raise NoChampionError(f"no version of {settings.model_name} holds the '{CHAMPION}' alias "
                              f"in {settings.mlflow_tracking_uri}")
    return version, version_onnx_path(settings, version)


# ----------------------------------------------------------------------------------- promotion log
def _log_file(settings) -> Path:
    return Path(settings.data_dir) / "mlflow" / "promotions.jsonl"


def promotion_log(settings) -> list[dict]:
    """Every alias move, oldest first (from the registered model's tags)."""
    from mlflow.exceptions import MlflowException

    try:
        rm = client(settings).get_registered_model(settings.model_name)
    except MlflowException:
        return []
    entries = []
    for k, v in (rm.tags or {}).items():
        if k.startswith("promotion."):
            try:
                e = json.loads(v)
                e["seq"] = int(k.split(".", 1)[1])
                entries.append(e)
            except (ValueError, json.JSONDecodeError):
                continue
    return sorted(entries, key=lambda e: e["seq"])


def _append_log(settings, entry: dict) -> dict:
    c = client(settings)
    seq = (max((e["seq"] for e in promotion_log(settings)), default=0) + 1)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry}
    c.set_registered_model_tag(settings.model_name, f"promotion.{seq:06d}", json.dumps(entry, sort_keys=True))
    f = _log_file(settings)
    f.parent.mkdir(parents=True, exist_ok=True)
    with f.open("a") as fh:
        fh.write(json.dumps({"seq": seq, **entry}, sort_keys=True) + "\n")
    return {"seq": seq, **entry}


def set_alias(settings, alias: str, version: str, reason: str, action: str | None = None) -> dict:
    if alias not in (CHAMPION, CHALLENGER):
        raise ValueError(f"alias must be {CHAMPION} or {CHALLENGER}")
    c = client(settings)
    c.get_model_version(settings.model_name, str(version))  # raises for an unknown version
    previous = alias_version(settings, alias)
    c.set_registered_model_alias(settings.model_name, alias, str(version))
    return _append_log(settings, {"action": action or f"set_{alias}", "alias": alias, "from": previous,
                                  "to": str(version), "reason": reason})


def version_val_metrics(settings, version: str) -> tuple[dict, dict | None, str | None]:
    """(challenger metrics, champion reference metrics or None, champion_ref_version) logged on the
    version's run."""
    c = client(settings)
    mv = c.get_model_version(settings.model_name, str(version))
    run = c.get_run(mv.run_id)
    m = run.data.metrics
    mine = {t: {"pinball": m.get(f"val_{t}_pinball"), "coverage": m.get(f"val_{t}_coverage")} for t in TARGETS}
    if any(v["pinball"] is None or v["coverage"] is None for v in mine.values()):
        mine = {}
    ref_ver = run.data.tags.get("champion_ref_version")
    ref = None
    if ref_ver and all(f"champion_val_{t}_pinball" in m for t in TARGETS):
        ref = {t: {"pinball": m[f"champion_val_{t}_pinball"], "coverage": m.get(f"champion_val_{t}_coverage")}
               for t in TARGETS}
    return mine, ref, ref_ver


def promote(settings, version: str, force: bool = False) -> Decision:
    """Apply the promotion rule to a registered version and move ``champion`` if it passes."""
    version = str(version)
    current = alias_version(settings, CHAMPION)
    if current == version:
        return Decision(False, f"v{version} is already the champion")
    mine, ref, ref_ver = version_val_metrics(settings, version)
    if not mine:
        d = Decision(False, f"v{version} has no validation metrics on its run")
    elif current is None:
        d = promotion_decision(mine, None)
    elif ref is None or ref_ver != current:
        d = Decision(False, f"v{version} was not compared with the current champion v{current} on the same "
                            f"validation origins (reference: {ref_ver or 'none'})")
    else:
        d = promotion_decision(mine, ref)
    if not d.promote and force:
        d = Decision(True, f"forced by the operator (rule said: {d.reason})")
    if d.promote:
        set_alias(settings, CHAMPION, version, d.reason, action="promote")
    else:
        _append_log(settings, {"action": "rejected", "alias": CHAMPION, "from": current, "to": version,
                               "reason": d.reason})
    return d


def rollback(settings, to_version: str | None = None) -> dict:
    """Move ``champion`` back to the version that held it before the current one (or to_version)."""
    current = alias_version(settings, CHAMPION)
    if current is None:
        raise NoChampionError("nothing to roll back: no champion")
    if to_version is None:
        # the champions as a stack: a promotion pushes, a rollback pops what it rolled back from, so a
        # second rollback goes further back and a version promoted again after a rollback counts again
        stack: list[str] = []
        for e in promotion_log(settings):
            if e.get("alias") != CHAMPION or e.get("action") not in ("promote", "set_champion", "rollback"):
                continue
            if e["action"] == "rollback" and stack and stack[-1] == e.get("from"):
                stack.pop()
            if not stack or stack[-1] != e["to"]:
                stack.append(e["to"])
        if stack and stack[-1] == current:
            stack.pop()
        candidates = [v for v in stack if v != current]
        if not candidates:
            raise LookupError(f"no earlier champion to roll back to (current v{current})")
        to_version = candidates[-1]
    return set_alias(settings, CHAMPION, str(to_version), f"rollback from v{current}", action="rollback")


def list_versions(settings) -> list[dict]:
    c = client(settings)
    from mlflow.exceptions import MlflowException

    try:
        rm = c.get_registered_model(settings.model_name)
    except MlflowException:
        return []
    aliases: dict[str, list[str]] = {}
    for a, v in (rm.aliases or {}).items():
        aliases.setdefault(str(v), []).append(a)
    out = []
    for mv in c.search_model_versions(f"name='{settings.model_name}'"):
        out.append({"version": str(mv.version), "run_id": mv.run_id, "aliases": aliases.get(str(mv.version), []),
                    "created": mv.creation_timestamp, "tags": dict(mv.tags or {})})
    return sorted(out, key=lambda d: int(d["version"]))
