"""`clipcond.hub`: a one-slash argument under an existing folder is a path, so its typo fails at once by name."""

import pytest

from clipcond import hub


def test_one_slash_under_an_existing_folder_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert hub.looks_like_path("runs/unet")  # a typo of a run folder, not a Hub id
    assert not hub.looks_like_path("stabilityai/sd-vae")  # no folder `stabilityai` here: a Hub id
    with pytest.raises(FileNotFoundError, match="`--init-unet` folder 'runs/unet' does not exist"):
        hub.check_local_folder("runs/unet", "--init-unet")
