"""Public mode (issue 14): strangers name no server paths, their work and disk use are bounded, runs
belong to whoever started them, and what is echoed is text. Library level; the app's wiring is in
test_public_app.py."""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from acip_core.serving import public
from acip_core.artifacts.artifact import ArtifactError, load_artifact, problem
from acip_core.sources.data import load_text
from acip_core.serving.jobs import ScoringJobs
from acip_core.sources.models import ModelSourceError, load_base


@pytest.fixture
def public_mode(monkeypatch, tmp_path):
    """ACIP_PUBLIC=1 with its own cache (uploads, bases) and an admin token."""
    monkeypatch.setenv("ACIP_PUBLIC", "1")
    monkeypatch.setenv("ACIP_ADMIN_TOKEN", "s3cret")
    monkeypatch.setenv("ACIP_STUDIO_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_public_mode_is_detected_from_space_id_or_acip_public():
    assert public.is_public({"SPACE_ID": "user/space"})
    assert public.is_public({"ACIP_PUBLIC": "1"})
    assert not public.is_public({})
    assert not public.is_public({"SPACE_ID": "user/space", "ACIP_PUBLIC": "0"})  # forced local
    local, space = public.limits({}), public.limits({"SPACE_ID": "u/s"})
    assert not local.public and local.scoring == "open"
    assert space.public and space.scoring == "off"  # no token set: scoring off
    assert public.limits({"SPACE_ID": "u/s", "ACIP_ADMIN_TOKEN": "t"}).scoring == "token"
    assert space.max_batch_size < local.max_batch_size and space.chat_tokens < local.chat_tokens
    tuned = public.limits({"SPACE_ID": "u/s", "ACIP_LIMIT_MAX_STEPS": "50", "ACIP_LIMIT_MAX_RUN_SECONDS": "90"})
    assert tuned.max_steps == 50 and tuned.max_run_seconds == 90.0
    with pytest.raises(ValueError, match="ACIP_LIMIT_MAX_STEPS"):
        public.limits({"ACIP_LIMIT_MAX_STEPS": "-1"})


def test_admin_token(monkeypatch):
    env = {"SPACE_ID": "u/s"}
    with pytest.raises(ValueError, match="off on this public Space"):
        public.check_may_score("anything", env)
    env["ACIP_ADMIN_TOKEN"] = "s3cret"
    with pytest.raises(ValueError, match="admin token"):
        public.check_may_score("wrong", env)
    with pytest.raises(ValueError, match="admin token"):
        public.check_may_score(None, env)
    public.check_may_score("s3cret", env)
    public.check_may_score(None, {})  # local: open
    assert public.owner("s3cret", "sess", env) == public.ADMIN
    assert public.owner(None, "a", env) != public.owner(None, "b", env)
    assert public.owner(None, "a", {}) is None  # local: the machine's single user


# -- no server paths from visitors --------------------------------------------------------------
SERVER_PATHS = ["/etc/passwd", "/etc", "../../etc/passwd", "~/.ssh/id_rsa", "assets/corpus/fortunes.txt"]


@pytest.mark.parametrize("path", SERVER_PATHS + ["hf:wikitext:wikitext-2-raw-v1"])
def test_a_server_path_as_data_is_refused_in_public_mode(public_mode, path):
    with pytest.raises(ValueError, match="server paths"):
        load_text(path)
    with pytest.raises(ValueError, match="server paths"):
        public.check_data(path)
    assert load_text("corpus:fortunes")  # offered names still work


def test_a_server_path_as_data_still_works_locally(tmp_path):
    (tmp_path / "mine.txt").write_text("my own text")
    assert load_text(str(tmp_path / "mine.txt")) == "my own text"


@pytest.mark.parametrize("path", ["/etc", "../x", "./precomputed", "~/models", "/tmp/x/y", "a/../../b"])
def test_a_server_path_as_model_is_refused_in_public_mode(public_mode, path):
    with pytest.raises(ValueError, match="server paths are not accepted"):
        public.check_model(path)


def test_a_local_model_folder_is_never_read_in_public_mode(public_mode, tiny_llama, monkeypatch):
    jobs = ScoringJobs(public_mode / "runs")
    with pytest.raises(ValueError, match="server paths"):
        jobs.start("r", model=tiny_llama, data="corpus:train")  # an absolute server path
    # a relative folder shaped like a hub id (transformers would read it from disk) is refused too,
    # whether relative to the working directory or to the repository (where scoring processes run)
    monkeypatch.chdir(os.path.dirname(os.path.dirname(tiny_llama)))
    relative = os.path.basename(os.path.dirname(tiny_llama)) + "/" + os.path.basename(tiny_llama)
    assert os.path.isdir(relative)
    for name in (relative, "precomputed/smollm2-135m-instruct", "assets/corpus"):
        with pytest.raises(ValueError, match="server paths"):
            jobs.start("r", model=name, data="corpus:train")
    assert not (public_mode / "runs").exists()
    assert public.check_model("HuggingFaceTB/SmolLM2-360M-Instruct")  # a real hub id is accepted
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="not in the local Hugging Face cache"):
        load_base("someone/not-a-folder-here")  # and goes to the hub (offline here), never to disk


def test_server_paths_in_a_scoring_run_are_refused_and_leave_no_folder(public_mode):
    jobs = ScoringJobs(public_mode / "runs")
    for path in SERVER_PATHS:
        with pytest.raises(ValueError, match="server paths"):
            jobs.start("r1", model=path, data="corpus:train")
        with pytest.raises(ValueError, match="server paths"):
            jobs.start("r1", model="smollm2-135m-instruct", data=path)
    assert not (public_mode / "runs").exists()


def test_an_upload_is_checked_kept_once_and_its_temp_removed(public_mode, monkeypatch):
    src = public_mode / "upload.txt"
    src.write_text("some calibration text\n" * 100)
    kept = public.accept_upload(src)
    assert not src.exists() and kept.parent == public.uploads_dir() and kept.read_text().startswith("some")
    assert public.check_data(str(kept)) == str(kept)  # accepted as data in public mode
    assert load_text(str(kept)).startswith("some")
    for data, why in ((b"\x00\x01binary", "not text"), (b"\xff\xfe latin", "not UTF-8"),
                      (b"x" * (10 * 10**6 + 1), "limit is 10 MB")):
        src.write_bytes(data)
        with pytest.raises(ValueError, match=why):
            public.accept_upload(src)
        assert not src.exists()  # refused uploads are removed too


def test_uploads_are_bounded_oldest_first(public_mode, monkeypatch):
    monkeypatch.setenv("ACIP_LIMIT_UPLOADS_BYTES", "2500")
    kept = []
    for i in range(4):
        src = public_mode / f"u{i}.txt"
        src.write_text(str(i) * 1000)
        kept.append(public.accept_upload(src))
        os.utime(kept[-1], (time.time() - 100 + i, time.time() - 100 + i))
    assert [k.exists() for k in kept] == [False, False, True, True]


# -- bounded work -------------------------------------------------------------------------------
@pytest.mark.parametrize("option,value", [("batch_size", 16), ("seq_len", 4096), ("steps", 100_000),
                                          ("post_tune_steps", 100_000)])
def test_oversize_scoring_runs_are_refused_and_leave_no_folder(public_mode, option, value):
    jobs = ScoringJobs(public_mode / "runs")
    kwargs = dict(model="smollm2-135m-instruct", data="corpus:train", steps=100)
    kwargs[option] = value
    with pytest.raises(ValueError, match=f"{option} {value} is above the limit"):
        jobs.start("big", **kwargs)
    assert not (public_mode / "runs" / "big").exists()


@pytest.fixture
def busy_run(tmp_path):
    """A run folder whose process is alive (a sleeping python whose command line names the folder,
    as a scoring process's does): the one scoring slot is taken."""
    folder = tmp_path / "runs" / "busy"
    folder.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "acip_core", str(folder)])
    (folder / "run.json").write_text(json.dumps(dict(name="busy", args=["x"], model="m", created=1.0,
                                                     pid=proc.pid, owner="session-a", config={})))
    yield folder
    proc.kill()
    proc.wait()


def test_a_second_run_is_refused_while_one_runs_and_leaves_no_folder(busy_run):
    jobs = ScoringJobs(busy_run.parent)
    for i in range(150):
        with pytest.raises(ValueError, match=r"already running \(busy\)"):
            jobs.start(f"second-{i}", model="smollm2-135m-instruct", data="corpus:train")
    assert [f.name for f in busy_run.parent.iterdir()] == ["busy"]
    assert [r["state"] for r in jobs.list()] == ["starting"]


def test_another_session_cannot_cancel_resume_or_delete_a_run(busy_run):
    jobs = ScoringJobs(busy_run.parent)
    for action in (jobs.cancel, jobs.resume, jobs.delete):
        with pytest.raises(ValueError, match="belongs to whoever started it"):
            action("busy", who="session-b")
    assert jobs.status("busy")["state"] == "starting"
    assert jobs.cancel("busy", who=public.ADMIN)["state"] == "cancelled"  # the token holder may
    jobs.delete("busy", who="session-a")  # and so may its owner
    assert not busy_run.exists()


def test_a_running_run_cannot_be_deleted(busy_run):
    with pytest.raises(ValueError, match="cancel it first"):
        ScoringJobs(busy_run.parent).delete("busy")


def test_a_run_is_stopped_at_its_wall_time_and_stays_resumable(public_mode, monkeypatch, tiny_llama):
    monkeypatch.setenv("ACIP_PUBLIC", "0")  # the tiny model is a local folder; the bound is the same code
    monkeypatch.setenv("ACIP_LIMIT_MAX_RUN_SECONDS", "4")
    jobs = ScoringJobs(public_mode / "runs")
    start = time.time()
    jobs.start("slow", model=tiny_llama, data="corpus:train", steps=400, batch_size=2, seq_len=32,
               post_tune_steps=5, precision="fp32")
    while time.time() - start < 60 and jobs.status("slow")["state"] in ("starting", "running", "evaluating"):
        time.sleep(0.2)
    status = jobs.status("slow")
    assert status["state"] == "stopped" and "wall-time limit" in status["message"], status
    assert time.time() - start < 30


def test_runs_folder_is_bounded_oldest_first(tmp_path, monkeypatch):
    monkeypatch.setenv("ACIP_LIMIT_RUNS_BYTES", "3000")
    root = tmp_path / "runs"
    for i in range(4):
        (root / f"old-{i}").mkdir(parents=True)
        (root / f"old-{i}" / "run.json").write_text(json.dumps(dict(name=f"old-{i}", args=[], created=i)))
        (root / f"old-{i}" / "checkpoint.bin").write_bytes(b"x" * 1000)
        os.utime(root / f"old-{i}", (1000 + i, 1000 + i))
    jobs = ScoringJobs(root)
    jobs._bound_disk(public.limits().runs_bytes)
    assert sorted(f.name for f in root.iterdir()) == ["old-2", "old-3"]


def test_the_runs_folder_is_scanned_once_per_tick(tmp_path):
    root = tmp_path / "runs"
    for i in range(300):
        (root / f"r{i}").mkdir(parents=True)
        (root / f"r{i}" / "run.json").write_text(json.dumps(dict(name=f"r{i}", args=[], created=i)))
        (root / f"r{i}" / "log.jsonl").write_text("\n".join(json.dumps(dict(step=s, phase="acip", seconds=s))
                                                            for s in range(2000)) + "\n")
    jobs = ScoringJobs(root)
    start = time.perf_counter()
    first = jobs.list()
    elapsed = time.perf_counter() - start
    for _ in range(3):  # the tick's other readers (artifacts, the runs table) share that scan
        assert jobs.list() == first and jobs.artifacts() == []
    assert jobs.scans == 1 and len(first) == 300 and first[0]["step"] == 1999
    assert elapsed < 3.0, f"one scan of 300 runs took {elapsed:.1f} s"


# -- chat history -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def explorer(tiny_artifact):
    from acip_core.serving.explorer import Explorer

    return Explorer.open(tiny_artifact, cache_size=2)


def test_a_forged_long_history_is_refused(explorer):
    forged = [dict(role="user", content="a" * 80_000), dict(role="assistant", content="ok")]
    with pytest.raises(ValueError, match="history holds a user message of 80,000 characters"):
        explorer.start_chat(1.0, forged, "hi", 4)
    many = [dict(role="user" if i % 2 == 0 else "assistant", content="word " * 1500) for i in range(60)]
    with pytest.raises(ValueError, match="history is 450,000 characters long"):
        explorer.start_chat(1.0, many, "hi", 4)


def test_a_long_history_is_capped_by_tokens(explorer, monkeypatch):
    monkeypatch.setenv("ACIP_LIMIT_CHAT_TOKENS", "64")
    history = [dict(role="user" if i % 2 == 0 else "assistant", content=f"turn {i} " + "word " * 50)
               for i in range(20)]
    ids, truncated = explorer._chat_ids(history, "the newest question", 4)
    assert truncated and ids.shape[1] <= 64
    assert "newest question" in explorer.tokenizer.decode(ids[0])


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def templated(explorer, monkeypatch):
    """The explorer's tokenizer with a ChatML template (SmolLM2's kind), counting its templatings."""
    calls = []
    original = type(explorer.tokenizer).apply_chat_template

    def counting(self, messages, *args, **kwargs):
        calls.append(len(messages))
        return original(self, messages, *args, **kwargs)

    monkeypatch.setattr(explorer.tokenizer, "chat_template", CHATML, raising=False)
    monkeypatch.setattr(type(explorer.tokenizer), "apply_chat_template", counting)
    return calls


def test_a_history_of_too_many_tiny_messages_is_refused_before_any_templating(explorer, templated, public_mode):
    tiny = [dict(role="user" if i % 2 == 0 else "assistant", content="a") for i in range(12_000)]
    start = time.perf_counter()
    with pytest.raises(ValueError, match="holds 12,000 messages \\(the limit is 400\\)"):
        explorer.start_chat(1.0, tiny, "hi", 4)
    assert templated == [] and time.perf_counter() - start < 1.0


def test_the_largest_allowed_history_costs_a_few_templatings_and_fits_with_the_templates_tokens(
        explorer, templated, public_mode, monkeypatch):
    monkeypatch.setenv("ACIP_LIMIT_CHAT_TOKENS", "200")
    tiny = [dict(role="user" if i % 2 == 0 else "assistant", content=f"m{i}") for i in range(400)]
    ids, truncated = explorer._chat_ids(tiny, "the newest question", 4)
    text = explorer.tokenizer.decode(ids[0])
    assert truncated and ids.shape[1] <= 200 and text.endswith("<|im_start|>assistant\n")
    assert "newest question" in text and "m399" in text and "m0<" not in text
    assert len(templated) <= 12, templated  # bisection, not one templating per dropped turn
    # the template's tokens count: the same turns without it would have let more through
    kept = text.count("<|im_start|>") - 2  # the newest question and the generation prompt
    plain = sum(len(explorer.tokenizer(f"m{i}").input_ids) for i in range(400 - kept, 400))
    assert plain < 200 - 10 and kept < 100
    # one more turn would not have fitted (the most that fit, not merely some)
    more = explorer._chat_ids(tiny[-(kept + 1):], "the newest question", 4)
    assert more[1]


def test_closing_a_chat_stream_stops_its_generation(explorer, monkeypatch):
    """Gradio closes a streaming handler's generator when its client goes away: the generation
    thread must stop then, not run to max_new_tokens."""
    from acip_core.serving import chat as engine

    started = []
    real = engine.Generation

    class Recorded(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(engine, "Generation", Recorded)
    stream = explorer.stream_chat(1.0, [], "tell me a long story", 1000)
    first = next(stream)
    assert first["tokens"] >= 1 and not first["done"]
    stream.close()
    gen = started[0]
    assert gen.join(timeout=10), "the generation thread kept running after its stream was closed"
    assert gen.tokens < 1000


def test_lm_eval_items_are_capped_in_public_mode(explorer, public_mode):
    with pytest.raises(ValueError, match=r"limit must be a whole number in \[1, 100\]"):
        explorer.measure_lm_eval(1.0, ["any"], limit=100_000)
    with pytest.raises(ValueError, match=r"batch size must be a whole number in \[1, 16\]"):
        explorer.measure_lm_eval(1.0, ["any"], limit=10, batch_size=512)  # batch × length × vocab floats
    with pytest.raises(ValueError, match=r"windows must be a whole number in \[1, 64\]"):
        explorer.measure_perplexity(1.0, windows=1000)


def test_perplexity_on_a_server_path_is_refused_in_public_mode(explorer, public_mode):
    with pytest.raises(ValueError, match="server paths"):
        explorer.measure_perplexity(1.0, data="/etc/services", windows=1)


def test_a_huge_budget_fits_the_whole_model(explorer):
    for budget in (1e308, 1e30, float("inf")):
        fit = explorer.any_size.size_for_budget(budget)
        assert fit.size_ratio == 1.0
    assert explorer.size_for_budget(1e308)["size_ratio"] == 1.0


# -- echoed strings -----------------------------------------------------------------------------
def test_markdown_and_html_are_escaped():
    evil = "![beacon](http://evil.example/b.png) [click](http://phish.example) <img src=x onerror=alert(1)> **b**"
    shown = public.md_escape(evil)
    assert "](" not in shown and "<img" not in shown and "**" not in shown
    assert shown.replace("\\", "").replace("&lt;", "<").replace("&gt;", ">") == evil


# -- artifacts ----------------------------------------------------------------------------------
@pytest.fixture
def copy(tiny_artifact, tmp_path):
    import shutil

    dst = tmp_path / "a"
    shutil.copytree(tiny_artifact, dst)
    return dst


def _edit_meta(folder, **changes):
    meta = json.loads((folder / "acip.json").read_text())
    meta.update(changes)
    (folder / "acip.json").write_text(json.dumps(meta))
    return meta


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/scores.safetensors", "..", ".hidden"])
def test_the_files_map_holds_plain_names_inside_the_folder(copy, name):
    meta = json.loads((copy / "acip.json").read_text())
    files = dict(meta["files"], **{name: "0" * 64})
    _edit_meta(copy, files=files)
    with pytest.raises(ArtifactError, match="'files' lists .* plain file names"):
        load_artifact(copy)


@pytest.mark.parametrize("files", [["scores.safetensors"], "scores.safetensors", None, 3])
def test_files_that_is_not_a_map_is_refused_by_name(copy, files):
    _edit_meta(copy, files=files)
    with pytest.raises(ArtifactError, match="'files' must map file names"):
        load_artifact(copy)


def test_broken_artifacts_are_validated_before_listing(copy):
    assert problem(copy) is None
    _edit_meta(copy, files=["x"])
    assert "'files' must map" in problem(copy)


# -- disk -----------------------------------------------------------------------------------------
def test_exports_are_evicted_oldest_first(tmp_path):
    for i in range(5):
        d = tmp_path / f"e{i}"
        d.mkdir()
        (d / "model.zip").write_bytes(b"z" * 1000)
        os.utime(d, (1000 + i, 1000 + i))
    removed = public.evict_oldest(tmp_path, 2500, keep=[tmp_path / "e0"])
    assert sorted(p.name for p in removed) == ["e1", "e2", "e3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e0", "e4"]


def test_the_exports_limit_bounds_the_apps_downloads(tmp_path, monkeypatch):
    """ACIP_LIMIT_EXPORTS_BYTES (public default 2 GB) is the bound the app prunes its downloads to
    (it was documented but unused: a public load test reached 4.3 GB with a 0.6 GB limit)."""
    from acip_core.serving.studio import Studio, StudioConfig

    monkeypatch.setenv("ACIP_PUBLIC", "1")
    assert StudioConfig().downloads_max_bytes == 2 * public.GB
    monkeypatch.setenv("ACIP_LIMIT_EXPORTS_BYTES", "2500")
    studio = Studio(StudioConfig(downloads=tmp_path / "dl", runs=tmp_path / "runs", precomputed=tmp_path / "pre"))
    for i in range(4):
        (studio.download_dir("exports") / "model.zip").write_bytes(b"z" * 1000)
    # each new download prunes the rest to the bound first: 2 old ones (2000 bytes) stay beside the new one
    assert len(list((tmp_path / "dl" / "exports").iterdir())) == 3


def test_bases_are_evicted_least_recently_used(monkeypatch, tmp_path):
    from acip_core.engine.basis import Factors, cached_basis

    def build():
        return {"l": Factors(torch.zeros(8, 8), torch.zeros(8), torch.zeros(8, 8))}

    paths = []
    for i in range(3):
        cached_basis(dict(kind="svd", i=i), build, tmp_path)
        if i == 0:  # room for three bases
            size = next((tmp_path / "bases").glob("*.safetensors")).stat().st_size
            monkeypatch.setenv("ACIP_LIMIT_BASES_BYTES", str(int(3.5 * size)))
        paths.append(sorted((tmp_path / "bases").glob("*.safetensors"), key=os.path.getmtime)[-1])
        time.sleep(0.05)
    assert len(list((tmp_path / "bases").glob("*.safetensors"))) == 3
    cached_basis(dict(kind="svd", i=0), lambda: pytest.fail("rebuilt"), tmp_path)  # loaded: most recent
    cached_basis(dict(kind="svd", i=3), build, tmp_path)  # a fourth: the least recently used goes
    left = {p.name for p in (tmp_path / "bases").glob("*.safetensors")}
    assert left == {paths[0].name, paths[2].name} | (left - set(p.name for p in paths)) and len(left) == 3
    assert paths[1].name not in left


def test_leftovers_and_stale_exports_are_removed_at_start(tmp_path):
    cache, exports = tmp_path / "cache", tmp_path / "exports"
    old = time.time() - 3600
    (cache / "bases").mkdir(parents=True)
    (cache / "models" / ".smollm2-135m-instruct-abc.tmp").mkdir(parents=True)
    (cache / "bases" / "x.tmp").write_bytes(b"half")
    (cache / "bases" / "svd-1.safetensors").write_bytes(b"kept")
    (exports / "a1" / "model").mkdir(parents=True)
    (exports / "a1" / ".model.zip.x.tmp").write_bytes(b"half a zip")
    (exports / "b2").mkdir()
    fresh = cache / "bases" / "live.tmp"  # another live process's: too young to remove
    fresh.write_bytes(b"")
    for p in (cache / "models" / ".smollm2-135m-instruct-abc.tmp", cache / "bases" / "x.tmp", exports / "a1"):
        os.utime(p, (old, old))
    removed = public.clean_at_start(exports=exports, roots=[cache])
    assert {p.name for p in removed} == {".smollm2-135m-instruct-abc.tmp", "x.tmp", "a1"}
    assert (cache / "bases" / "svd-1.safetensors").exists() and fresh.exists() and (exports / "b2").exists()


def test_a_hub_id_fails_fast_when_offline(monkeypatch):
    from acip_core.sources import models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(ModelSourceError, match="cannot be reached"):
        load_base("someone/some-model")
    assert time.perf_counter() - start < 10
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")  # huggingface_hub's spellings count too
    with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE is set"):
        load_base("someone/some-model")


def test_one_offline_check_per_concept_reads_every_spelling(monkeypatch):
    """sources.models: hub_offline (models, uploads, imports, the Score tab's hub check) and
    datasets_offline (hf: texts, lm-eval's paper tasks), each as its library reads its switch."""
    from acip_core.serving.studio import check_model_source
    from acip_core.sources.models import datasets_offline, hub_offline

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    for value, offline in (("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub_offline() is offline and datasets_offline() is offline, value
    monkeypatch.setenv("HF_HUB_OFFLINE", "on")  # the spelling the Score tab's own check used to miss
    with pytest.raises(ValueError, match="switched off"):
        check_model_source("someone/no-such-model", reachable=lambda: True)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "on")  # datasets only: models may still come from the hub
    assert datasets_offline() and not hub_offline()


def test_a_session_over_its_hourly_quota_of_heavy_jobs_is_refused_and_others_are_not():
    now = [0.0]
    quota = public.SessionQuota(per_hour=3, clock=lambda: now[0])
    for _ in range(3):
        quota.take("a")
    with pytest.raises(ValueError, match="3 measurements/exports in the last hour.*60 min"):
        quota.take("a")
    quota.take("b")  # another visitor is not affected
    now[0] = 3601.0  # an hour after the first start the session may start again
    quota.take("a")
    assert public.SessionQuota(per_hour=math.inf).take("a") is None  # local mode: no quota
    assert public.limits({"SPACE_ID": "x/y"}).heavy_per_hour == 20 and "per hour" in public.describe(
        public.limits({"SPACE_ID": "x/y"}))


# -- issue 28: who a visitor is, what they may upload, what is kept for them ---------------------------
def _request(xff=None, host="10.0.0.9", session="s1"):
    from types import SimpleNamespace

    headers = {"x-forwarded-for": xff} if xff else {}
    return SimpleNamespace(headers=headers, client=SimpleNamespace(host=host), session_hash=session)


def test_the_client_ip_is_the_proxys_entry_of_x_forwarded_for_never_the_clients_own():
    local, space = {}, {"SPACE_ID": "me/space"}
    assert public.client_ip(_request("6.6.6.6"), local) == "10.0.0.9"  # no proxy: the header is ignored
    assert public.client_ip(_request("6.6.6.6, 1.2.3.4"), space) == "1.2.3.4"  # the Space proxy's entry
    assert public.client_ip(_request("1.2.3.4, 5.6.7.8"), {"ACIP_PROXY_HOPS": "2"}) == "1.2.3.4"
    assert public.client_ip(_request(None), space) == "10.0.0.9"
    assert public.visitor_keys(_request("6.6.6.6, 1.2.3.4", session="abc"), space) == ["session:abc", "ip:1.2.3.4"]
    with pytest.raises(ValueError, match="ACIP_PROXY_HOPS"):
        public.client_ip(_request(), {"ACIP_PROXY_HOPS": "x"})


def test_the_quota_counts_every_key_and_gives_back_a_refused_start():
    now = [0.0]
    quota = public.SessionQuota(2, clock=lambda: now[0])
    quota.take(["session:a", "ip:1"])
    with pytest.raises(ValueError, match="bad input"), quota.job(["session:b", "ip:1"]):
        raise ValueError("bad input")  # refused: given back
    quota.take(["session:b", "ip:1"])
    with pytest.raises(ValueError, match="this address has started 2"):
        quota.take(["session:c", "ip:1"])  # a new session, the same address
    quota.take(["session:c", "ip:2"])
    now[0] = 3601.0
    quota.take(["session:d", "ip:1"])  # an hour later


def test_uploads_are_bounded_per_address_and_in_total():
    now = [0.0]
    quota = public.UploadQuota(per_visitor=30, total=50, clock=lambda: now[0])
    quota.take("ip:1", 20)
    with pytest.raises(ValueError, match="from this address reached"):
        quota.take("ip:1", 11)
    quota.take("ip:2", 25)
    with pytest.raises(ValueError, match="to this Space reached"):
        quota.take("ip:3", 6)
    now[0] = 3600.5
    quota.take("ip:3", 30)


def test_nul_files_are_found(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"text\n" * 1000)
    (tmp_path / "b.txt").write_bytes(b"x" * 2_000_000 + b"\0")
    assert public.nul_files([tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "gone"]) == [str(tmp_path / "b.txt")]


def test_a_visitors_newest_download_is_not_pruned_by_another_visitors_export(tmp_path, monkeypatch):
    """Another visitor's export link answered 403 20 s after a later export: the size bound removed it."""
    from acip_core.serving.studio import Studio, StudioConfig

    monkeypatch.setenv("ACIP_LIMIT_EXPORTS_BYTES", "1500")
    studio = Studio(StudioConfig(downloads=tmp_path / "dl", runs=tmp_path / "runs", precomputed=tmp_path / "pre"))
    mine = studio.download_dir("exports", "visitor-a")
    (mine / "model.zip").write_bytes(b"z" * 1000)
    older = studio.download_dir("exports", "visitor-b")
    (older / "model.zip").write_bytes(b"z" * 1000)
    newer = studio.download_dir("exports", "visitor-b")  # over the bound: b's older one goes, a's stays
    assert mine.exists() and newer.exists() and not older.exists()
    old = time.time() - 3 * 3600  # past the age limit even the newest goes
    os.utime(mine, (old, old))
    studio.download_dir("exports", "visitor-c")
    assert not mine.exists()


def test_a_run_without_an_owner_is_the_admins_alone(tmp_path):
    """A run started from the command line (or in local mode) records no owner: on a public Space no
    visitor may cancel, resume or delete it; the admin token may, and so may local mode (who=None)."""
    folder = tmp_path / "runs" / "cli-run"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(dict(name="cli-run", args=["x"], model="m", created=1.0,
                                                     pid=None, config={})))
    jobs = ScoringJobs(tmp_path / "runs")
    for action in (jobs.cancel, jobs.resume, jobs.delete):
        with pytest.raises(ValueError, match="belongs to whoever started it"):
            action("cli-run", who="session-b")
    assert folder.is_dir()
    assert public.may_control(None, public.ADMIN) and public.may_control(None, None)
    jobs.delete("cli-run", who=public.ADMIN)
    assert not folder.exists()


def test_a_run_name_or_targets_with_a_trailing_newline_are_refused(tmp_path):
    jobs = ScoringJobs(tmp_path / "runs")
    with pytest.raises(ValueError):
        jobs.folder("run\n")  # a regex's `$` alone would take it (a folder name with a newline)
    with pytest.raises(ValueError, match="targets"):
        jobs.start("fine", model="smollm2-135m-instruct", data="corpus:train", targets="q_proj,k_proj\nx")
    assert not (tmp_path / "runs" / "fine").exists()


@pytest.mark.parametrize("length", ["+5", "1_0", "-1", "٣", ""])
def test_an_upload_with_an_odd_content_length_is_refused_before_its_body(length):
    import asyncio

    from app_uploads import UploadGuard

    sent = []

    async def app(scope, receive, send):
        raise AssertionError("reached Gradio")

    async def send(message):
        sent.append(message)

    async def receive():
        raise AssertionError("body read")

    guard = UploadGuard(app, public.limits({"ACIP_PUBLIC": "1"}))
    headers = [(b"content-length", length.encode())] if length else []
    scope = dict(type="http", method="POST", path="/gradio_api/upload", headers=headers, client=("1.2.3.4", 1))
    asyncio.run(guard(scope, receive, send))
    assert sent[0]["status"] == 411
