"""The Space's definition agrees with itself: README front matter, Dockerfile, Makefile, requirements.txt
(what `make space-check` runs for real, see scripts/space_check.py)."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import space_check  # noqa: E402


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n")
    block = text.split("---\n")[1]
    return dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)


def test_readme_front_matter_and_dockerfile_say_the_same():
    meta = front_matter()
    args, env, pips, cmd = space_check.dockerfile_steps((ROOT / "Dockerfile").read_text())
    assert meta["sdk"] == "docker"  # the Space builds the Dockerfile, which installs the embedded model
    assert meta["app_port"] == env["GRADIO_SERVER_PORT"] == "7860"
    assert re.search(r"^EXPOSE 7860$", (ROOT / "Dockerfile").read_text(), re.M)
    assert env["GRADIO_SERVER_NAME"] == "0.0.0.0" and cmd == ["python", "app.py"]
    assert "sdk_version" not in meta and "app_file" not in meta  # gradio-SDK keys would mislead


def test_the_image_installs_cpu_torch_then_the_makefiles_steps():
    args, _env, pips, _cmd = space_check.dockerfile_steps((ROOT / "Dockerfile").read_text())
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    torch_step = next(p for p in pips if any(a.startswith("torch==") for a in p))
    assert torch_step[torch_step.index("--index-url") + 1] == args["TORCH_INDEX"]
    # the same pins, in the same order, as the Makefile (CI) and requirements.txt
    makefile = (ROOT / "Makefile").read_text()
    choose_index = "$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "  # make run TORCH_INDEX=... (README)
    assert choose_index + "torch==" in makefile
    makefile = makefile.replace(choose_index, "")
    make_steps = [line.split("pip install -q ", 1)[1].split() for line in makefile.splitlines()
                  if "pip install -q " in line and "$(TF4)" not in line]  # transformers 4.x: tests only
    docker_steps = [[a for a in p if a not in ("--user", "--index-url", args["TORCH_INDEX"])] for p in pips]
    assert docker_steps == make_steps
    pinned = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("torch==")]
    assert pinned == [a for a in torch_step if a.startswith("torch==")]
