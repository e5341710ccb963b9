"""``--help`` for the Hydra entry points, without Hydra's slow group listing.

Hydra's own ``--help`` lists every config group's options by re-reading the whole config repository
once per group, which costs several seconds with this package's schemas. This module prints the
same three parts (the entry point's header from ``hydra.help.header``, the config groups with their
options, and the composed config) from one ``compose`` call and a walk of the ``conf`` folder.
Overrides on the command line are applied, so ``python -m dllm_rl objective=gdsd --help`` shows
GDSD's keys. ``--hydra-help`` is left to Hydra.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import resources

CONF_PACKAGE = "dllm_rl.conf"
HELP_FLAGS = ("--help", "-h")


def config_groups() -> dict[str, list[str]]:
    """Each config group under ``conf/`` (``model``, ``objective/mask``, …) and its options, sorted."""
    groups: dict[str, list[str]] = {}

    def walk(folder, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir() and not entry.name.startswith(("_", ".")):
                walk(entry, f"{prefix}{entry.name}/")
            elif prefix and entry.name.endswith(".yaml"):
                groups.setdefault(prefix.rstrip("/"), []).append(entry.name[: -len(".yaml")])

    walk(resources.files(CONF_PACKAGE), "")
    return {name: sorted(options) for name, options in sorted(groups.items())}


def help_text(config_name: str, overrides: Sequence[str] = ()) -> str:
    """What ``--help`` prints for the entry point whose primary config is ``conf/<config_name>.yaml``."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf, open_dict

    with initialize_config_module(CONF_PACKAGE, version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    header = str(cfg.hydra.help.header).rstrip("\n")
    with open_dict(cfg):
        del cfg["hydra"]
    groups = "\n".join(f"{name}: {', '.join(options)}" for name, options in config_groups().items())
    return (
        f"{header}\n\n== Configuration groups ==\nCompose your configuration from those groups (group=option)\n\n"
        f"{groups}\n\n\n== Config ==\nOverride anything in the config (foo.bar=value)\n\n{OmegaConf.to_yaml(cfg)}\n\n"
        "Use --hydra-help to view Hydra specific help\n"
    )


def exit_with_help_if_asked(config_name: str, argv: Sequence[str] | None = None) -> None:
    """Print the help and exit 0 when ``argv`` asks for it (``--help`` / ``-h``); return otherwise.

    A config error in the overrides given with ``--help`` is one line on stderr and exit 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(flag in argv for flag in HELP_FLAGS):
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [arg for arg in argv if not arg.startswith("-")]
    try:
        text = help_text(config_name, overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)
    print(text, end="")
    sys.exit(0)
