"""The routing pyfunc model behind ``lifecycle serve NAME --canary ALIAS`` / ``--shadow ALIAS``.

One MLflow pyfunc endpoint (``mlflow models serve`` underneath) that holds two versions of a
registered model, each in its own :class:`~lifecycle.serving.engine.Engine` (so each coalesces
its own batches) with the same :class:`~lifecycle.serving.settings.ServingConfig` limits:

* **canary**: a share of the requests is answered by the challenger (the version behind the
  challenger alias), sticky by routing key (:func:`~lifecycle.serving.router.to_canary`);
* **shadow**: production answers every request; a copy goes to the challenger through a bounded
  queue (:class:`~lifecycle.serving.router.ShadowQueue`) and its answer is only recorded, with its
  agreement with production's.

Every inference record says which version answered and in which role. The router follows the
registry: a daemon thread re-reads the registered model every ``refresh_s`` seconds (its aliases
and the ``lifecycle.canary.share`` tag). A challenger alias that is gone (``lifecycle canary
--act`` deletes it on a rollback) or names production's version takes the challenger out at once;
an alias that moved to a new version is loaded in that thread and swapped in when ready; a new
share applies from the next request. Production never goes without a model: if its alias
vanishes, the version already loaded keeps answering.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

import mlflow.pyfunc

from lifecycle.config import from_mapping
from lifecycle.errors import ConfigError
from lifecycle.serving import body_limit
from lifecycle.serving.model import _ENGINES, _install_strict_params, _widen_scoring_server_threads, answer
from lifecycle.serving.records import DROPPED
from lifecycle.serving.router import (
    CANARY,
    PRODUCTION,
    ROUTING_PARAM,
    SHADOW,
    SHARE_TAG,
    RoutingKeyError,
    RoutingKeyHeader,
    ShadowQueue,
    agreement,
    header_key,
    request_key,
    tag_share,
    to_canary,
)

log = logging.getLogger(__name__)

MODES = ("canary", "shadow")


@dataclass
class RouterConfig:
    """What the router serves: a registered model, its production alias and the challenger's."""

    model_name: str = ""
    production_alias: str = "production"
    challenger_alias: str = ""
    #: ``canary`` (a share of requests answered by the challenger) or ``shadow`` (copies only).
    mode: str = "canary"
    #: Share of requests for the canary until the registry's ``lifecycle.canary.share`` tag says otherwise.
    share: float = 0.0
    #: Seconds between two reads of the registry (aliases, share).
    refresh_s: float = 5.0
    #: Shadow copies waiting at most; one more is dropped and counted.
    shadow_queue: int = 8

    def __post_init__(self) -> None:
        if not self.model_name or not self.challenger_alias:
            raise ConfigError("router: model_name and challenger_alias are required")
        if self.mode not in MODES:
            raise ConfigError(f"router.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0.0 <= self.share <= 1.0:
            raise ConfigError(f"router.share must be between 0 and 1, got {self.share}")
        # Event.wait() needs a finite timeout it can represent (nan or inf would kill the follower thread).
        if not 0 < self.refresh_s <= threading.TIMEOUT_MAX:
            raise ConfigError(f"router.refresh_s must be a number of seconds > 0, got {self.refresh_s}")
        if self.shadow_queue < 1:
            raise ConfigError(f"router.shadow_queue must be >= 1, got {self.shadow_queue}")


def router_config(model_config: Mapping[str, Any] | None) -> RouterConfig:
    """The ``router`` section of the model config as a validated :class:`RouterConfig`."""
    return from_mapping(RouterConfig, dict((model_config or {}).get("router") or {}), prefix="router.")


def share_from_tags(tags: Mapping[str, str] | None, default: float) -> float:
    """The share the registry tag names (0..1), else ``default`` (a bad tag is logged and ignored)."""
    raw = (tags or {}).get(SHARE_TAG)
    value = tag_share(raw)
    if value is None:
        if raw is not None:
            log.warning("ignoring tag %s=%r: not a share between 0 and 1", SHARE_TAG, raw)
        return default
    return value


@dataclass(frozen=True)
class Arm:
    """One loaded version."""

    version: str
    engine: Any


@dataclass(frozen=True)
class RouteState:
    """What requests are routed to now (replaced whole, so a request reads one consistent state)."""

    production: Arm
    challenger: Arm | None
    share: float


@dataclass
class _ShadowJob:
    arm: Arm
    model_input: Any
    params: Any
    request_id: str
    answers: list[str]


class RouterModel(mlflow.pyfunc.PythonModel):
    """Production and a challenger behind one pyfunc endpoint (see the module docstring)."""

    def __init__(self) -> None:
        self.state: RouteState | None = None
        self.config: RouterConfig | None = None
        self.shadow: ShadowQueue | None = None
        self._engines: dict[str, Any] = {}
        self._retired: list[Any] = []
        self._stop: threading.Event | None = None  # made at load time: a pickled model holds no lock
        self._client: Any = None
        self._serving: Any = None

    # ------------------------------------------------------------------ loading
    def load_context(self, context: Any) -> None:
        """Resolve both aliases, load both versions, start following the registry."""
        from mlflow.tracking import MlflowClient

        from lifecycle.serving.settings import serving_config

        model_config = getattr(context, "model_config", None) or {}
        self.config = router_config(model_config)
        self._serving = serving_config({k: v for k, v in model_config.items() if k != "router"})
        self._client = MlflowClient()
        self._stop = threading.Event()
        self.shadow = ShadowQueue(self._run_shadow, size=self.config.shadow_queue, on_drop=self._record_drop)
        self.refresh()
        if self.state is None:
            raise ConfigError(f"router: {self.config.model_name}@{self.config.production_alias} does not exist")
        _ENGINES["router"] = self  # requests MLflow refuses before predict are recorded by production
        _install_strict_params()
        body_limit.install(self._serving.max_body_bytes, also=(RoutingKeyHeader,))
        if self._serving.coalesce:
            # Both arms may run a full batch while the next ones queue.
            _widen_scoring_server_threads(2 * self._serving.max_batch_size)
        threading.Thread(target=self._follow, name="lifecycle-router", daemon=True).start()
        log.info("router: %s production v%s, %s %s (share %.3g)", self.config.model_name,
                 self.state.production.version, self.config.mode,
                 f"v{self.state.challenger.version}" if self.state.challenger else "none", self.state.share)

    def _engine(self, version: str) -> Any:
        """The engine of ``version``, loaded on first use (the one model loader: resolve, then Engine)."""
        if version not in self._engines:
            from lifecycle.serving.engine import Engine
            from lifecycle.serving.records import InferenceRecorder
            from lifecycle.tracking import resolve_model_dir

            cfg = self.config
            model_dir = resolve_model_dir(f"models:/{cfg.model_name}/{version}")
            settings = dataclasses.replace(self._serving, model_name=cfg.model_name, model_version=version)
            recorder = InferenceRecorder.from_env(model_name=cfg.model_name, model_version=version)
            engine = Engine(model_dir, settings, recorder=recorder)
            if settings.warmup:
                engine.warmup()
            self._engines[version] = engine
        return self._engines[version]

    def refresh(self) -> RouteState | None:
        """Read the registry once and route accordingly (loading a new version first); the new state."""
        cfg = self.config
        model = self._client.get_registered_model(cfg.model_name)
        aliases = {str(k): str(v) for k, v in (model.aliases or {}).items()}
        current = self.state
        prod_v = aliases.get(cfg.production_alias) or (current.production.version if current else None)
        if prod_v is None:
            return None
        chal_v = aliases.get(cfg.challenger_alias)
        share = share_from_tags(model.tags, cfg.share)
        if chal_v is None or chal_v == prod_v:
            # Gone or promoted: out at once, before any loading below can delay it.
            challenger = None
        elif current is not None and current.challenger is not None and current.challenger.version == chal_v:
            challenger = current.challenger
        else:
            if current is not None and current.challenger is not None:
                # Moved to another version: the old one stops now, the new one starts once loaded.
                self.state = dataclasses.replace(current, challenger=None)
            challenger = Arm(chal_v, self._engine(chal_v))
        production = Arm(prod_v, self._engine(prod_v))
        state = RouteState(production=production, challenger=challenger, share=share)
        if state != current:
            log.info("router: production v%s, challenger %s, share %.3g", prod_v,
                     f"v{chal_v}" if challenger else "none", share)
        self.state = state
        self._retire({prod_v, *([chal_v] if challenger else [])})
        return state

    def _retire(self, keep: set[str]) -> None:
        # Close an engine one refresh after it left, so requests still in it finish and are recorded.
        for engine in self._retired:
            engine.close()
        self._retired = [self._engines.pop(v) for v in list(self._engines) if v not in keep]

    def _follow(self) -> None:
        while not self._stop.wait(self.config.refresh_s):
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - a registry hiccup must not stop serving
                log.warning("router: could not re-read the registry (routing unchanged): %s", exc)

    def close(self) -> None:
        """Stop following the registry and close every engine."""
        if self._stop is not None:
            self._stop.set()
        for engine in [*self._engines.values(), *self._retired]:
            engine.close()

    # ------------------------------------------------------------------ serving
    # model_input and params stay unannotated on purpose (see LanguageModel.predict).
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        """Answer from production or the canary; in shadow mode also queue a copy for the challenger."""
        from mlflow.exceptions import MlflowException

        state = self.state
        params = dict(params) if isinstance(params, Mapping) else params
        request_id = uuid.uuid4().hex
        try:
            given = params.pop(ROUTING_PARAM, None) if isinstance(params, dict) else None
            key = request_key(given, header_key.get())
        except RoutingKeyError as exc:
            state.production.engine.record_refusal(str(exc), params=params, extra=_fields(PRODUCTION, request_id))
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        canary = self.config.mode == "canary" and state.challenger is not None and to_canary(state.share, key)
        arm, role = (state.challenger, CANARY) if canary else (state.production, PRODUCTION)
        out = answer(arm.engine, model_input, params, extra=lambda _texts: _fields(role, request_id))
        if self.config.mode == "shadow" and state.challenger is not None:
            self.shadow.offer(_ShadowJob(state.challenger, model_input, params, request_id, out["text"].tolist()))
        return out

    def record_refusal(self, message: str, *, start: float | None = None, params: Any = None) -> None:
        """A request refused before :meth:`predict` (MLflow's param checks): recorded as production's."""
        self.state.production.engine.record_refusal(message, start=start, params=params,
                                                    extra=_fields(PRODUCTION, uuid.uuid4().hex))

    def _run_shadow(self, job: _ShadowJob) -> None:
        def extra(texts: list[str]) -> dict[str, Any]:
            fields = _fields(SHADOW, job.request_id)
            if texts:
                fields["agreement"] = agreement(job.answers, texts)
            return fields

        job.arm.engine.predict(job.model_input, job.params, extra=extra)

    def _record_drop(self, job: _ShadowJob) -> None:
        recorder = job.arm.engine.recorder
        if recorder is not None:
            recorder.record(latency_ms=0.0, status=DROPPED, error="shadow queue full: copy dropped",
                            extra=_fields(SHADOW, job.request_id))


def _fields(role: str, request_id: str) -> dict[str, Any]:
    return {"role": role, "request_id": request_id}
