"""`python -m publish app`: the front end bundle, pushed to a local bare repo, runs from its own clone.

Proves: the clone holds app.py, the inference core and the trainer modules it imports (plus their
templates), pinned requirements with torch, packages.txt with git-lfs, a README with the Space front
matter, and the MODEL_REPO preset; those modules import in a fresh isolated interpreter from the
clone alone; `python app.py` started in the clone with MODEL_REPO=<the published model repo> fetches
the model and answers the identity question through gradio_client with growing partials;
republishing makes no commit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import publish
import yaml

from fake_hub import isolated_git_env
from ports import start_app, stop

ROOT = Path(publish.__file__).resolve().parent.parent    # the project root: `python -m publish` runs there


def publish(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "publish", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def git(*args, cwd=None, env=None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


def test_publish_app_clone_imports_and_serves(merged_model, identity_files, tmp_path):
    env = isolated_git_env(tmp_path / "home")
    model_repo, app_repo = tmp_path / "lumi.git", tmp_path / "lumi-app.git"
    for repo in (model_repo, app_repo):
        git("init", "-q", "--bare", "-b", "main", str(repo))
    assert publish("model", str(merged_model), "--to", str(model_repo), env=env).returncode == 0

    r = publish("app", "--to", f"git:{app_repo}", "--model-repo", str(model_repo), env=env)
    assert r.returncode == 0, r.stderr
    assert "project modules import from the bundle alone" in r.stdout

    clone = tmp_path / "app"
    git("clone", "-q", str(app_repo), str(clone), env=env)
    files = {p.relative_to(clone).as_posix() for p in clone.rglob("*") if p.is_file() and ".git" not in p.parts}
    assert {"app.py", "inference/loader.py", "inference/engine.py", "inference/errors.py", "inference/chat_format.py",
            "inference/templates/chatml.jinja", "requirements.txt", "packages.txt", "README.md",
            "space_config.json"} <= files
    assert not any(f.startswith(("tests/", "publish/", "trainer/")) for f in files)   # the core only: no training code
    front = yaml.safe_load((clone / "README.md").read_text().split("---")[1])
    assert front["sdk"] == "gradio" and front["app_file"] == "app.py"
    assert json.loads((clone / "space_config.json").read_text()) == {"MODEL_REPO": str(model_repo)}
    req = (clone / "requirements.txt").read_text()
    assert "torch==" in req and "gradio==" in req and "transformers==" in req and "peft==" in req
    assert not any(pkg in req for pkg in ("streamlit", "matplotlib", "pyyaml", "gguf"))   # serving packages only
    assert "git-lfs" in (clone / "packages.txt").read_text()

    # The core imports from the clone alone (isolated: no project root, no PYTHONPATH, no user site).
    mods = sorted(f[:-3].replace("/", ".").removesuffix(".__init__") for f in files
                  if f.endswith(".py") and f != "app.py")
    check = subprocess.run([sys.executable, "-I", "-c", "import importlib, sys; sys.path.insert(0, '.');"
                            f"[importlib.import_module(m) for m in {mods!r}]; import inference; "
                            "print(inference.__file__)"], cwd=clone, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-2000:]
    assert check.stdout.strip().startswith(str(clone))

    head = git("rev-parse", "main", cwd=app_repo)
    r = publish("app", "--to", f"git:{app_repo}", "--model-repo", str(model_repo), env=env)
    assert r.returncode == 0 and "already up to date" in r.stdout, r.stdout + r.stderr
    assert git("rev-parse", "main", cwd=app_repo) == head

    # Serve: app.py from the clone, pointed at the model repo, answers through the /chat API.
    from gradio_client import Client

    env.pop("PYTHONPATH", None)          # only the clone's own files may serve
    # A Space image has git-lfs installed and set up (`git lfs install`); the app's fetch relies on it.
    subprocess.run(["git", "lfs", "install"], env=env, check=True, capture_output=True)
    run_env = {**env, "MODEL_REPO": str(model_repo), "OWN_ASSISTANT_CACHE": str(tmp_path / "cache"),
               "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    proc, url = start_app([sys.executable, "-s", "app.py"], clone, run_env, tmp_path / "app.log")
    try:
        client = Client(url, verbose=False)
        # Greedy, no system prompt (as trained): the tuned model from the published repo names itself.
        partials = [str(p) for p in client.submit("你是谁？", "", 0.0, 0.9, 48, api_name="/chat")]
        assert not partials[-1].startswith("⚠️"), partials[-1]          # the app's "model not loaded" reply
        assert len(partials) >= 2 and all(b.startswith(a) for a, b in zip(partials, partials[1:]))
        assert identity_files["name"] in partials[-1], partials[-1]
    finally:
        stop(proc)


def test_publish_app_to_hf_space(tmp_path):
    """`hf:` + app = a Gradio Space, created and filled through the Hub API (fake hub, token required)."""
    from fake_hub import FakeHub

    hub = FakeHub(tmp_path / "hub", token="hf_space_test_token").start()
    try:
        env = isolated_git_env(tmp_path / "home")
        env.update(HF_ENDPOINT=hub.url, HF_TOKEN="hf_space_test_token", HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_PROGRESS_BARS="1")
        r = publish("app", "--to", "hf:alice/lumi-chat", "--model-repo", "openxlab:alice/lumi", env=env)
        assert r.returncode == 0, r.stderr
        assert "/spaces/alice/lumi-chat" in r.stdout
        files = hub.files("alice/lumi-chat", "space")
        assert {"app.py", "inference/loader.py", "README.md", "space_config.json"} <= set(files)
        assert files["app.py"] == (ROOT / "app.py").read_bytes()
        assert json.loads(files["space_config.json"]) == {"MODEL_REPO": "https://code.openxlab.org.cn/alice/lumi.git"}
        assert ("POST", "/api/validate-yaml") in hub.requests           # the Space README's metadata was checked
        assert yaml.safe_load(files["README.md"].decode().split("---")[1])["sdk"] == "gradio"
    finally:
        hub.stop()


def test_import_walk_and_check_on_a_toy_project(tmp_path):
    """The walk follows lazy and relative imports and takes package data; what it cannot see (a
    dynamic import) is caught by the isolated import check before anything is pushed."""
    from publish.app_bundle import app_bundle, check_imports
    from inference.errors import UserError

    root = tmp_path / "proj"
    (root / "pkg" / "data").mkdir(parents=True)
    (root / "app.py").write_text("def main():\n    from pkg import a\n")
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "a.py").write_text("from . import b\n")
    (root / "pkg" / "b.py").write_text("import importlib\nimportlib.import_module('pkg.hidden')\n")
    (root / "pkg" / "hidden.py").write_text("")
    (root / "pkg" / "unused.py").write_text("")
    (root / "pkg" / "data" / "t.jinja").write_text("{{ x }}")
    (root / "requirements.txt").write_text("torch==2.13.0\ngradio==6.31.0\n")
    bundle, modules = app_bundle("https://example.com/m.git", "toy", root)
    assert modules == ["pkg", "pkg.a", "pkg.b"]
    assert {"app.py", "pkg/__init__.py", "pkg/a.py", "pkg/b.py", "pkg/data/t.jinja"} <= set(bundle)
    assert "pkg/unused.py" not in bundle and "pkg/hidden.py" not in bundle
    with pytest.raises(UserError, match="does not import on its own: ModuleNotFoundError: No module named 'pkg.hidden'"):
        check_imports(bundle, modules, echo=lambda s: None)
    bundle["pkg/hidden.py"] = root / "pkg" / "hidden.py"
    check_imports(bundle, modules, echo=lambda s: None)
