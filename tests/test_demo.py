import numpy as np
import pytest
from PIL import Image

from primis.demo import chest_phantom, train_demo_model
from primis.modelstore import load_model
from tests.conftest import assert_clean_failure, run_cli


@pytest.mark.slow
def test_demo_writes_the_figure_and_reports(tmp_path, tiny_model_dir):
    result = run_cli("demo", "--model", tiny_model_dir, "--out", tmp_path / "demo", check=True)
    assert "with the key:" in result.stdout and "without the key:" in result.stdout
    figure = Image.open(tmp_path / "demo" / "demo.png")
    assert figure.size == (4 * 362 + 3 * 10, 384 + 24)  # four panels of the bundled chest
    assert "chest-cr-8bit.jpg (384x362)" in result.stdout
    for name in ("image.primis", "image.primiskey", "authorized.png"):
        assert (tmp_path / "demo" / name).is_file()


@pytest.mark.slow
def test_demo_on_the_users_image(tmp_path, tiny_model_dir):
    Image.fromarray(chest_phantom(96, seed=3)).convert("RGB").save(tmp_path / "mine.jpg")
    result = run_cli(
        "demo",
        "--model",
        tiny_model_dir,
        "--image",
        tmp_path / "mine.jpg",
        "--out",
        tmp_path / "d",
        check=True,
    )
    assert "mine.jpg (96x96)" in result.stdout
    assert_clean_failure(
        run_cli("demo", "--model", "no-such-model", "--out", tmp_path / "x"),
        "no such run directory or bundled model",
    )


@pytest.mark.slow
def test_the_fallback_demo_model_trains_on_phantoms(tmp_path):
    run = train_demo_model(tmp_path / "model", minutes=0.05)
    assert load_model(run).network.config.n == 128
    phantom = chest_phantom(128)
    assert phantom.dtype == np.uint8 and phantom.std() > 10


def test_on_a_terminal_model_loading_and_refinement_show_progress(tmp_path, tiny_model_dir):
    import contextlib
    import io

    from primis.cli import main

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    Image.fromarray(chest_phantom(64, seed=3)).save(tmp_path / "mine.png")
    args = ["demo", "--model", tiny_model_dir, "--image", tmp_path / "mine.png"]
    args += ["--out", tmp_path / "d", "--refine-steps", "3"]
    err = Terminal()
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet, contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        main([str(arg) for arg in args])
    assert exit_.value.code == 0, err.getvalue()
    assert "loading the model..." in err.getvalue()
    assert "refining the code: " in err.getvalue() and "/3 [" in err.getvalue()
