"""The pynetdicom version guard: the node refuses to start on internals it was not written for."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import pytest
from node_proc import REPO
from peers import free_port

from node.dimse.compat import guard


@pytest.fixture
def fresh_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard, "_passed", False)


@pytest.mark.timeout(30)
def test_installed_pynetdicom_passes(fresh_guard: None) -> None:
    assert guard.missing_attributes() == []
    guard.check()
    assert guard._passed


@pytest.mark.timeout(10)
def test_setup_cfg_pins_the_guarded_version() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    requires = [r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip()]
    assert f"pynetdicom=={guard.PYNETDICOM_VERSION}" in requires


@pytest.mark.timeout(30)
def test_another_version_is_refused(fresh_guard: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import pynetdicom

    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    with pytest.raises(guard.IncompatibleLibrary) as err:
        guard.check()
    assert "pynetdicom 3.1.0 is installed" in str(err.value)
    assert f"pynetdicom=={guard.PYNETDICOM_VERSION}" in str(err.value)
    assert not guard._passed


@pytest.mark.timeout(30)
def test_a_renamed_method_is_named(fresh_guard: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from pynetdicom.dul import DULServiceProvider

    monkeypatch.delattr(DULServiceProvider, "_read_pdu_data")
    with pytest.raises(guard.IncompatibleLibrary) as err:
        guard.check()
    assert "pynetdicom.dul:DULServiceProvider._read_pdu_data" in str(err.value)
    assert "pynetdicom 3.0.4 lacks 1 attribute" in str(err.value)


@pytest.mark.timeout(30)
def test_a_renamed_instance_attribute_is_named(fresh_guard: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from pynetdicom.association import Association

    library_init = Association.__init__

    def init_without_pause_flag(self, *args, **kwargs) -> None:
        library_init(self, *args, **kwargs)
        del self._is_paused

    monkeypatch.setattr(Association, "__init__", init_without_pause_flag)
    with pytest.raises(guard.IncompatibleLibrary) as err:
        guard.check()
    assert "Association._is_paused" in str(err.value)


@pytest.mark.timeout(60)
def test_serve_refuses_to_start_and_says_why(tmp_path: Path) -> None:
    # A real `modelnode serve` whose pynetdicom lacks a patched name: it must exit before
    # binding its port, with a message naming the version and the attribute.
    script = (
        "import sys; from pynetdicom.dimse import DIMSEServiceProvider as D; del D.send_msg; "
        "from node.cli import main; sys.exit(main())"
    )
    res = subprocess.run(
        [sys.executable, "-c", script, "--data-dir", str(tmp_path / "data"), "serve", "--port", str(free_port()),
         "--bind", "127.0.0.1"],
        capture_output=True, text=True, timeout=50, cwd=REPO,
    )
    assert res.returncode == 1, res.stderr
    assert "refusing to start" in res.stderr
    assert "pynetdicom 3.0.4 lacks" in res.stderr
    assert "pynetdicom.dimse:DIMSEServiceProvider.send_msg" in res.stderr
    assert "listening as" not in res.stderr
