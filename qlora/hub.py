"""Hub ids: the config.json of a Hugging Face hub model, from the local cache or asked of the hub once.

Offline (this project's CI, a lent GPU, an air-gapped cluster) the answer must come in seconds and in one line:
huggingface_hub alone retries an unreachable hub for about 30 s and logs every retry. A hub that cannot be reached
is `HubUnreachable` (exit 1: the same id may work elsewhere); a hub that says no is ConfigError (exit 2).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from qlora import assets
from qlora.config import ConfigError, one_line


class HubUnreachable(assets.AssetError):
    """The Hugging Face hub cannot be reached (no network, offline mode, the hub failing) for a hub id that is not in
    the local cache. Not bad input: the same id may work where the hub is reachable."""


HUB_TIMEOUT_S = 5.0  # one metadata request; HF_HUB_ETAG_TIMEOUT overrides it
HUB_FIX = "pass a local directory with config.json (and safetensors) instead"

def _hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    now = any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
              for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or now


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "no connection": builtin ones (huggingface_hub's OfflineModeIsEnabled is a
    ConnectionError) and the HTTP client's transport errors (httpx2 in huggingface_hub 2, httpx in 1)."""
    import importlib

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


@contextmanager
def _quiet_hub():
    """huggingface_hub logs every retry as a warning; while we ask the hub, only errors (which we raise) count."""
    from huggingface_hub.utils import logging as hub_logging

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)


@contextmanager
def _without_agent_lookup():
    """Before the first request of a process, huggingface_hub's user-agent telemetry fetches an "agent harness"
    registry from the hub (3 s timeout). Where packets to the hub are dropped, that alone would more than double the
    wait of one short availability request, so that request goes without it (HF_HUB_DISABLE_TELEMETRY's switch)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_DISABLE_TELEMETRY
    constants.HF_HUB_DISABLE_TELEMETRY = True
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_TELEMETRY = before


def hub_config_file(repo_id: str) -> Path:
    """Local path of the config.json of hub model `repo_id`: from the Hugging Face cache if it is there, else asked
    of the hub once, with a short timeout and without retries. Raises ConfigError when the hub says the model does
    not exist (or is gated), HubUnreachable when the hub cannot be asked."""
    import huggingface_hub as hub
    from huggingface_hub import constants, errors

    try:
        cached = hub.try_to_load_from_cache(repo_id, "config.json")  # the cache alone: no request, not even telemetry
    except errors.HFValidationError as e:
        raise ConfigError(f"model {repo_id!r} is not a valid hub id: {one_line(e)}") from None
    if isinstance(cached, str):
        return Path(cached)
    if _hub_offline():
        raise HubUnreachable(f"cannot reach the Hugging Face hub for model {repo_id!r} (HF_HUB_OFFLINE is set "
                             f"and the model is not in the local cache); {HUB_FIX}")
    # hf_hub_download alone would retry an unreachable hub for ~30 s with a 60 s timeout when nothing is cached;
    # one metadata request first tells "no network" from "no such model" at once.
    timeout = (constants.HF_HUB_ETAG_TIMEOUT if constants.HF_HUB_ETAG_TIMEOUT != constants.DEFAULT_ETAG_TIMEOUT
               else HUB_TIMEOUT_S)
    with _quiet_hub():
        try:
            with _without_agent_lookup():
                hub.get_hf_file_metadata(hub.hf_hub_url(repo_id, "config.json"), timeout=timeout)
            return Path(hub.hf_hub_download(repo_id, "config.json", etag_timeout=timeout))
        except errors.GatedRepoError:
            raise ConfigError(f"model {repo_id!r} is gated on the Hugging Face hub: accept its terms and log in "
                              f"(`hf auth login`), or {HUB_FIX}") from None
        except errors.RepositoryNotFoundError:
            raise ConfigError(f"model {repo_id!r} does not exist on the Hugging Face hub (or is private: log in "
                              "with `hf auth login`)") from None
        except errors.LocalEntryNotFoundError as e:  # the connection dropped between the two requests
            raise HubUnreachable(f"cannot reach the Hugging Face hub for model {repo_id!r} ({one_line(e)}); "
                                 f"{HUB_FIX}") from None
        except errors.EntryNotFoundError:
            raise ConfigError(f"hub model {repo_id!r} has no config.json") from None
        except errors.HfHubHTTPError as e:
            status = getattr(e.response, "status_code", None)
            if status is not None and (status >= 500 or status in (408, 429)):
                raise HubUnreachable(f"cannot reach the Hugging Face hub for model {repo_id!r} (HTTP {status}); "
                                     f"{HUB_FIX}") from None
            raise ConfigError(f"cannot load config for model {repo_id!r}: {one_line(e)}") from None
        except _network_errors() as e:
            raise HubUnreachable(f"cannot reach the Hugging Face hub for model {repo_id!r} ({one_line(e)}); "
                                 f"{HUB_FIX}") from None
