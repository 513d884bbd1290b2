"""One skip marker for everything a test needs that a machine may lack, in the manner of Lightning's ``RunIf``.

``run_if(prometheus=True, alertmanager=True)`` is one ``pytest.mark.skipif``, usable as a decorator or as
``pytestmark``, whose reason names every missing requirement and where it comes from, so that a skipped
test says what to install. Binaries are looked up on PATH with :func:`shutil.which`, the way the tests then
run them.
"""

from __future__ import annotations

import shutil

import pytest

# The binaries the tests run, and the Debian package of each.
DEBIAN_PACKAGES = {
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "prometheus-alertmanager": "prometheus-alertmanager",
    "amtool": "prometheus-alertmanager",
    "docker-compose": "docker-compose",
}


def _gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def run_if(
    *,
    promtool: bool = False,
    prometheus: bool = False,
    alertmanager: bool = False,
    amtool: bool = False,
    docker_compose: bool = False,
    gloo: bool = False,
) -> pytest.MarkDecorator:
    """Skip unless every requirement asked for is met: each flag names one binary on PATH
    (``alertmanager`` is ``prometheus-alertmanager``), ``gloo`` torch.distributed with the gloo backend
    (what the tests' torchrun runs on the CPU use)."""
    wanted = {
        "promtool": promtool,
        "prometheus": prometheus,
        "prometheus-alertmanager": alertmanager,
        "amtool": amtool,
        "docker-compose": docker_compose,
    }
    binaries = [f"{name} on PATH (Debian package {DEBIAN_PACKAGES[name]})"
                for name, asked in wanted.items() if asked and shutil.which(name) is None]
    missing = binaries + (["torch.distributed with the gloo backend"] if gloo and not _gloo_available() else [])
    if not missing:
        return pytest.mark.skipif(False, reason="every requirement is met")
    setup = "; `make setup` installs the Debian packages as root" if binaries else ""
    return pytest.mark.skipif(True, reason="needs " + " and ".join(missing) + setup)
