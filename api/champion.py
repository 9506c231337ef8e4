"""Follows the registry's ``champion`` alias and hot-swaps the ONNX model the inference loop uses.

A background thread asks MLflow every ``poll_s`` seconds which version the alias points at. When it
moves, the new version's ONNX file is fetched (``model.registry.champion_onnx_path`` when the model
package provides it, otherwise the registered model version's artifacts), loaded and checked
(``api.modelrt.OnnxModel``: contract metadata, shapes, a dry run) entirely off the inference path,
and only then swapped in with one reference assignment. The inference loop reads the reference once
per minute batch, so a swap never stalls or skips a minute; a model that fails its checks is refused
with the reason and the previous champion keeps serving. No torch anywhere.
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from api.modelrt import ModelContractError, OnnxModel
from tickcast.logs import get_logger

log = get_logger("api.champion")

_SAFE_VERSION = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
ALIAS = "champion"


class ChampionWatcher:
    def __init__(self, settings, *, poll_s: float = 10.0, cache_dir: Path | None = None,
                 on_swap: Callable[[OnnxModel | None, OnnxModel], None] | None = None, threads: int = 1):
        self.settings = settings
        self.poll_s = poll_s
        self.cache_dir = Path(cache_dir or Path(settings.data_dir) / "api" / "models")
        self.on_swap = on_swap
        self.threads = threads
        self.current: OnnxModel | None = None
        self.version_meta: dict = {}
        self.last_check_ts: float | None = None
        self.last_error: str | None = None
        self.swaps: list[dict] = []
        self.refused: dict[str, str] = {}  # version -> why it was refused (not retried until it changes)
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> ChampionWatcher:
        self._thread = threading.Thread(target=self._run, name="api-champion", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        if self._thread:
            self._thread.join(10)

    def kick(self) -> None:
        """Check the registry now instead of at the next poll."""
        self._kick.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive any one bad poll
                self.last_error = f"champion check failed: {type(exc).__name__}: {exc}"[:500]
                log.exception("champion check failed; polling goes on")
            self._kick.wait(self.poll_s)
            self._kick.clear()

    # ------------------------------------------------------------------ registry
    def _mlflow(self):
        if self._client is None:
            import os

            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            from mlflow.tracking import MlflowClient

            uri = self.settings.mlflow_tracking_uri
            self._client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        return self._client

    def check(self) -> bool:
        """One poll; True when a new champion was swapped in."""
        with self._lock:
            self.last_check_ts = time.time()
            try:
                mv = self._mlflow().get_model_version_by_alias(self.settings.model_name, ALIAS)
            except Exception as exc:
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in msg.lower() \
                        or "does not exist" in msg.lower():
                    self.last_error = f"no '{ALIAS}' alias on registered model {self.settings.model_name!r}"
                else:
                    self.last_error = f"registry unreachable: {type(exc).__name__}: {msg[:300]}"
                return False
            version = str(mv.version)
            if self.current is not None and self.current.spec.version == version:
                self.last_error = None
                return False
            if self.refused.get(version):
                self.last_error = f"champion version {version} refused: {self.refused[version]}"
                return False
            try:
                model = self._load(version, mv)
            except ModelContractError as exc:  # the model itself is wrong: refused until the alias moves
                reason = f"{type(exc).__name__}: {exc}"
                self.refused[version] = reason
                self.last_error = f"champion version {version} refused: {reason}"
                log.error("champion refused; the previous model keeps serving",
                          extra={"version": version, "error": reason})
                return False
            except Exception as exc:  # noqa: BLE001 - e.g. the artifact store unreachable: try again next poll
                reason = f"{type(exc).__name__}: {exc}"[:500]
                if self.last_error != f"champion version {version} not loaded yet: {reason}":
                    log.error("champion could not be loaded; retrying at the next poll",
                              extra={"version": version, "error": reason})
                self.last_error = f"champion version {version} not loaded yet: {reason}"
                return False
            if model.spec.version != version:  # the alias moved while loading: describe what is served
                version = model.spec.version
                try:
                    mv = self._mlflow().get_model_version(self.settings.model_name, version)
                except Exception as exc:  # noqa: BLE001 - metadata only: serve the model, say what is missing
                    log.warning("champion metadata unavailable", extra={"version": version, "error": str(exc)[:200]})
            old = self.current
            meta = {
                "version": version, "run_id": getattr(mv, "run_id", None),
                "created_ts": _ms(getattr(mv, "creation_timestamp", None)),
                "updated_ts": _ms(getattr(mv, "last_updated_timestamp", None)),
                "tags": dict(getattr(mv, "tags", {}) or {}),
                "aliases": list(getattr(mv, "aliases", []) or []),
                "promoted_ts": self._promotion_time(version) or _promoted_ts(mv),
                "seen_ts": time.time(),
                "metrics": self._run_metrics(getattr(mv, "run_id", None)),
            }
            # the swap: two reference assignments back to back, everything slow done before them,
            # so a reader can hardly see the new model with the previous version's metadata
            self.current, self.version_meta = model, meta
            self.swaps.append({"from": old.spec.version if old else None, "to": version, "ts": time.time()})
            self.swaps = self.swaps[-50:]
            self.last_error = None
            log.info("champion loaded", extra={"version": version, "previous": old.spec.version if old else None,
                                               "providers": model.providers})
            if self.on_swap:
                self.on_swap(old, model)
            return True

    def _load(self, version: str, mv) -> OnnxModel:
        if not _SAFE_VERSION.match(version):
            raise ModelContractError(f"unexpected model version string {version!r}")
        path, summary = None, None
        try:
            from model.registry import champion_onnx_path  # the model package's fetcher (no torch)
        except ImportError:
            champion_onnx_path = None
        if champion_onnx_path is not None:
            got_version, path = champion_onnx_path(self.settings)
            if str(got_version) != version:  # the alias moved in between: load what we were given
                version = str(got_version)
                if not _SAFE_VERSION.match(version):
                    raise ModelContractError(f"unexpected model version string {version!r}")
            path = Path(path)
        else:
            path = self._download(version)
        summary = self._feature_summary(mv, Path(path).parent)
        model = OnnxModel(path, version, threads=self.threads, feature_summary=summary)
        live = _live_m1_features()
        unknown = [v for v in model.spec.variates if live and v not in live]
        if unknown:  # it would be fed zeros every minute: refuse it, the previous champion keeps serving
            raise ModelContractError(f"variates the live feature flow does not produce: {unknown}")
        return model

    def _download(self, version: str) -> Path:
        import mlflow.artifacts

        dst = self.cache_dir / version
        if dst.is_dir():
            found = sorted(dst.rglob("*.onnx"))
            if found:
                return found[0]
        dst.mkdir(parents=True, exist_ok=True)
        uri = self.settings.mlflow_tracking_uri
        import mlflow

        mlflow.set_registry_uri(uri)
        mlflow.set_tracking_uri(uri)
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{self.settings.model_name}/{version}", dst_path=str(dst)))
        found = sorted(local.rglob("*.onnx")) if local.is_dir() else [local]
        if not found:
            raise ModelContractError(f"model version {version} has no .onnx artifact")
        return found[0]

    def _feature_summary(self, mv, model_dir: Path) -> dict | None:
        """``feature_summary.json`` next to the ONNX file or in the version's run, when present."""
        for cand in (model_dir / "feature_summary.json", model_dir.parent / "feature_summary.json"):
            if cand.is_file():
                try:
                    return json.loads(cand.read_text())
                except (OSError, json.JSONDecodeError):
                    return None
        run_id = getattr(mv, "run_id", None)
        if not run_id:
            return None
        try:
            names = {a.path for a in self._mlflow().list_artifacts(run_id)}
            if "feature_summary.json" not in names:
                return None
            local = self._mlflow().download_artifacts(run_id, "feature_summary.json", str(model_dir))
            return json.loads(Path(local).read_text())
        except Exception:
            return None

    def _run_metrics(self, run_id: str | None) -> dict[str, float]:
        """The metrics the training run logged (validation/test, baselines, the champion reference):
        what the dashboard's Model tab compares. Empty when the run is unreadable."""
        if not run_id:
            return {}
        try:
            return {str(k): float(v) for k, v in self._mlflow().get_run(run_id).data.metrics.items()}
        except Exception as exc:  # the registry is best effort here: serving does not depend on it
            log.warning("training metrics unavailable", extra={"run_id": run_id, "error": str(exc)[:200]})
            return {}

    def _promotion_time(self, version: str) -> int | None:
        """When the alias moved to ``version``, from the model package's promotion log (registered-model
        tags written by model.registry.set_alias), if it keeps one."""
        try:
            from model.registry import promotion_log
        except ImportError:
            return None
        try:
            entries = promotion_log(self.settings)
        except Exception:
            return None
        import datetime as dt

        for e in reversed(entries):
            if e.get("alias") == ALIAS and str(e.get("to")) == version and e.get("action") != "rejected":
                try:
                    t = dt.datetime.strptime(e["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
                    return int(t.timestamp() * 1000)
                except (KeyError, TypeError, ValueError):
                    return None
        return None

    def status(self) -> dict:
        m = self.current
        return {"version": m.spec.version if m else None, "model": m.info() if m else None,
                "registry_version": self.version_meta, "last_check_ts": self.last_check_ts,
                "last_error": self.last_error, "poll_s": self.poll_s, "swaps": list(self.swaps),
                "refused": dict(self.refused)}


def _ms(v) -> int | None:
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _live_m1_features() -> frozenset[str]:
    """The m1 feature names of the registry the feature flow runs (flows/features.yaml); empty
    (nothing checked) when it cannot be read here."""
    try:
        from flows.registry import RegistryError, load_registry

        return frozenset(s.name for s in load_registry().for_cadence("m1"))
    except (ImportError, RegistryError, OSError):
        return frozenset()


def _promoted_ts(mv) -> int | None:
    """Fallback for when the version became champion: a ``promoted_ts``/``promoted_at`` tag (ms or ISO),
    else the version's last update (MLflow itself records no alias timestamp)."""
    tags = dict(getattr(mv, "tags", {}) or {})
    for key in ("promoted_ts", "promoted_at", "champion_since"):
        raw = tags.get(key)
        if raw:
            try:
                return int(float(raw))
            except OverflowError:  # "inf", "1e999": not a time
                continue
            except ValueError:
                try:
                    import datetime as dt

                    return int(dt.datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp() * 1000)
                except ValueError:
                    pass
    return _ms(getattr(mv, "last_updated_timestamp", None))
