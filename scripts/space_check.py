"""What the Space builder runs, without docker: `make space-check`.

    python scripts/space_check.py [--keep] [--json out.json]

1. Copies the working tree's files (tracked and not ignored: what a fresh clone has) to a temp folder.
2. Creates a fresh venv and runs exactly the Dockerfile's `RUN pip install` steps in it, in order
   (`--user` dropped: the venv is the user's site). One difference where the Dockerfile's
   `--index-url` cannot be reached (this machine reaches PyPI only): that step runs without it, so
   `torch==2.13.0` comes through plain pip (here a CPU wheel on the local disk) — said in the output.
3. Starts the Dockerfile's CMD (`python app.py`) with its ENV, as a Space does: SPACE_ID set (public
   mode), an empty ACIP_STUDIO_CACHE and HOME, nothing else from this machine's caches.
4. As a visitor, through gradio_client (run with the fresh venv's python): the page load (/start)
   must load the default artifact, and a chat message (/chat) must get a reply.
Prints the seconds of each phase; exit status 1 on any failure. Stdlib only (step 4 runs this file
again in the venv with --client URL).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def dockerfile_steps(text: str) -> tuple[dict, dict, list[list[str]], list[str]]:
    """(ARG defaults, ENV, pip install commands as argv lists, CMD argv) of a Dockerfile."""
    logical = re.sub(r"\\\n", " ", text)  # join continued lines
    args, env, pips, cmd = {}, {}, [], []
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key.strip()] = value.strip()
        elif word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
        elif word == "RUN":
            for part in rest.split("&&"):
                argv = shlex.split(re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), part))
                if argv[:2] == ["pip", "install"]:
                    pips.append(argv[2:])
        elif word == "CMD":
            cmd = json.loads(rest)
    return args, env, pips, cmd


def reachable(url: str, timeout: float = 5.0) -> bool:
    host = urllib.parse.urlparse(url).hostname
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def copy_tree(dest: Path) -> int:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    n = 0
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file() and not src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
            n += 1
    return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_check(url: str) -> dict:
    """Step 4, run in the fresh venv: the default artifact loads and a chat reply arrives."""
    from gradio_client import Client

    times, start = {}, time.perf_counter()
    client = Client(url, verbose=False, download_files=False)
    out = client.predict(api_name="/start")
    artifact, status = out[0], out[1]
    if isinstance(artifact, dict):  # an update: the listed value, else the first choice (the default)
        artifact = artifact.get("value") or artifact["choices"][0][1]
    times["start_s"] = round(time.perf_counter() - start, 1)
    if "Ready" not in str(status):  # the status line of a loaded artifact (texts.describe_text)
        raise SystemExit(f"the default artifact did not load: {status!r}")
    start = time.perf_counter()
    hist_a, _hist_b, _speed, _msg = client.predict(artifact, 1.0, artifact, 1.0, False, "What is the capital of France?",
                                                   [], [], 24, 1.15, "float32", api_name="/chat")
    reply = hist_a[-1]["content"]  # a string, or a list of parts ({"type": "text", "text": ...})
    reply = reply if isinstance(reply, str) else " ".join(p.get("text", "") for p in reply if isinstance(p, dict))
    times["chat_s"] = round(time.perf_counter() - start, 1)
    if not reply.strip():
        raise SystemExit("the chat reply is empty")
    return dict(times, status=str(status)[:200], reply=reply[:200])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    parser.add_argument("--json", help="write the timings here")
    parser.add_argument("--python", default=sys.executable, help="the python that makes the venv (3.11)")
    opts = parser.parse_args()
    if opts.client:
        print("CLIENT " + json.dumps(client_check(opts.client)))
        return 0

    report, t0 = {}, time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="acip-space-check-"))
    app_dir, venv, cache, home = work / "app", work / "venv", work / "cache", work / "home"
    for d in (app_dir, cache, home):
        d.mkdir()
    proc = None
    try:
        report["files"] = copy_tree(app_dir)
        args, env, pips, cmd = dockerfile_steps((app_dir / "Dockerfile").read_text())
        if not pips or cmd[:1] != ["python"]:
            raise SystemExit(f"no pip steps or no python CMD in the Dockerfile: {pips} {cmd}")
        start = time.perf_counter()
        subprocess.run([opts.python, "-m", "venv", str(venv)], check=True)
        py = str(venv / "bin" / "python")
        pip_env = dict(os.environ, **{k: v for k, v in env.items() if k.startswith("PIP_")})
        report["pip_steps"] = []
        for argv in pips:
            argv = [a for a in argv if a != "--user"]
            if "--index-url" in argv:
                i = argv.index("--index-url")
                if not reachable(argv[i + 1]):
                    print(f"note: {argv[i + 1]} is not reachable from here; installing {argv[i + 2:]} "
                          "through plain pip instead (this machine's local CPU wheel)", flush=True)
                    argv = argv[:i] + argv[i + 2:]
            print("$ pip install " + " ".join(argv), flush=True)
            subprocess.run([py, "-m", "pip", "install", "-q"] + argv, cwd=app_dir, env=pip_env, check=True)
            report["pip_steps"].append(" ".join(argv))
        report["install_s"] = round(time.perf_counter() - start, 1)

        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        app_env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("ACIP_", "HF_", "GRADIO_", "SPACE_", "VIRTUAL_ENV"))}
        app_env.update(env, SPACE_ID="space-check/acip-studio", ACIP_STUDIO_CACHE=str(cache), HOME=str(home),
                       GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
                       PATH=f"{venv / 'bin'}:{os.environ.get('PATH', '')}")
        log_path = work / "app.log"
        start = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen([py] + cmd[1:], cwd=app_dir, env=app_env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"app.py exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit(f"app.py did not answer in 600 s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        report["http_up_s"] = round(time.perf_counter() - start, 1)
        client = subprocess.run([py, str(app_dir / "scripts" / "space_check.py"), "--client", url],
                                cwd=app_dir, env=app_env, capture_output=True, text=True, timeout=3600)
        line = [x for x in client.stdout.splitlines() if x.startswith("CLIENT ")]
        if client.returncode or not line:
            raise SystemExit(f"the visitor's check failed:\n{client.stdout[-2000:]}\n{client.stderr[-3000:]}\n"
                             f"app log:\n{log_path.read_text()[-3000:]}")
        report.update(json.loads(line[0][len("CLIENT "):]))
        report["first_start_to_reply_s"] = round(time.perf_counter() - start, 1)
        report["total_s"] = round(time.perf_counter() - t0, 1)
        print("space-check passed: " + json.dumps(report, indent=1))
        if opts.json:
            Path(opts.json).write_text(json.dumps(report, indent=1) + "\n")
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if opts.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
