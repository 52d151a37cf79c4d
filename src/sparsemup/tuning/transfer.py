"""``sparsemup transfer``: a target config that is its tuned proxy's whole config but for the listed changes.

The proxy is a run directory, a run's config file or a sweep store (its best run). The target holds every
setting of the proxy with the ``--set`` changes, and a ``[transfer]`` table recording the proxy's settings and
the keys allowed to differ; a run started from it refuses any other difference (``train.validate``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

from ..core.atomic import write_text_atomic
from ..train.config import apply_overrides, load_config, to_toml
from ..train.schema import Config, ConfigError, field_specs, flatten, run_identity, with_defaults
from .report import best_runs
from .store import STORE_NAME, ConfigValue, ResultStore, StoreError

__all__ = ["Transfer", "proxy_config", "write_transfer"]

RUN_CONFIGS = ("config.toml", "config.yaml")


class Transfer(TypedDict):
    """What ``write_transfer`` wrote: where the proxy came from, the changed keys (proxy value, target value) and
    the keys a run may change further."""

    proxy: str
    changed: dict[str, list[ConfigValue]]
    allow: list[str]


def _nested(flat: dict[str, ConfigValue]) -> dict[str, dict[str, ConfigValue]]:
    out: dict[str, dict[str, ConfigValue]] = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = value
    return out


def proxy_config(proxy: Path) -> tuple[Config, str]:
    """The resolved config of ``proxy`` (a run directory, a config file, or a sweep store: its best completed
    run) and a description of where it came from."""
    proxy = Path(proxy)
    if (proxy / STORE_NAME).is_file():
        best = best_runs(list(ResultStore(proxy / STORE_NAME).records.values()), 1)
        if not best:
            raise StoreError(f"{proxy} has no completed run to transfer from")
        flat = with_defaults(best[0]["config"])
        return Config.from_dict(_nested(flat), f"{proxy} run {best[0]['id']}"), f"best run {best[0]['id']} of {proxy}"
    if proxy.is_dir():
        found = next((proxy / name for name in RUN_CONFIGS if (proxy / name).is_file()), None)
        if found is None:
            raise ConfigError(f"{proxy} is neither a run directory (with {' or '.join(RUN_CONFIGS)}) nor a sweep "
                              f"directory (with {STORE_NAME}); give the proxy's run or sweep directory")
        return load_config(found), str(proxy)
    return load_config(proxy), str(proxy)


def write_transfer(proxy: Path, out: Path, changes: Sequence[str], allow: Sequence[str] = ()) -> Transfer:
    """Write ``out``: ``proxy``'s whole config with ``changes`` (``section.key=value``) and a ``[transfer]`` table;
    return {"proxy": its description, "changed": {key: [proxy value, target value]}, "allow": the allowed keys}."""
    if Path(out).suffix != ".toml":
        raise ConfigError(f"--out {out}: the target config is written as TOML; name it *.toml")
    cfg, origin = proxy_config(proxy)
    known = field_specs()
    for key in allow:
        if key not in known:
            raise ConfigError(f"--allow {key}: not a config key; see sparsemup train --help for the keys")
    before = run_identity(flatten(cfg.to_dict()))
    target = apply_overrides(cfg, list(changes))
    after = run_identity(flatten(target.to_dict()))
    changed = {k: [before[k], after[k]] for k in after if k in before and after[k] != before[k]}
    allowed = sorted({item.partition("=")[0].strip() for item in changes} | set(allow))
    target.transfer.proxy = str(proxy)
    target.transfer.proxy_config = json.dumps(before, sort_keys=True)
    target.transfer.allow = ",".join(allowed)
    write_text_atomic(Path(out), to_toml(target))
    return {"proxy": origin, "changed": changed, "allow": allowed}
