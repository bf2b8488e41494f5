"""A small local stand-in for a Hugging Face Hub / OpenXLab git server, for offline publish tests.

Every repo is a real bare git repo on disk plus a git-lfs object store, served three ways:
- file downloads at /{id}/resolve/{rev}/{path} (HEAD + GET, as `snapshot_download` uses them);
- the Hub API parts that `create_repo` + `upload_folder` use (huggingface_hub 2.4, with
  HF_HUB_DISABLE_XET=1): POST /api/repos/create, /api/validate-yaml, /api/{type}s/{id}/preupload/{rev},
  /api/{type}s/{id}/commit/{rev} (NDJSON, written as a git commit), GET .../tree/{rev}, .../revision/{rev};
- git smart HTTP (`git http-backend`) at /{id}.git and /spaces/{id}.git, so clients clone and push;
- the git-lfs batch API and basic transfer at {repo}.git/info/lfs/ (used by git-lfs and by
  huggingface_hub's LFS upload).
With `token=` set, the API wants `Authorization: Bearer TOKEN` and git wants Basic auth with that token
as the password (and `user` as the user name), like the real hosts. Object PUT/GET URLs handed out by
the batch API need no auth (they stand for pre-signed storage URLs).

    hub = FakeHub(tmp_path, token="secret"); hub.start(); ...; hub.stop()
"""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath

POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
HF_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in (
    "*.bin", "*.safetensors", "*.model", "*.pt", "*.pth", "*.gguf", "*.h5", "*.onnx", "*.msgpack", "*.zip"))
REPO = r"(?P<type>spaces/)?(?P<id>[\w.-]+/[\w.-]+?)"
API = re.compile(r"^/api/(?P<type>models|spaces|datasets)/(?P<id>[\w.-]+/[\w.-]+)(?:/(?P<op>preupload|commit|tree|"
                 r"revision)/(?P<rev>[^/]+)(?P<rest>/.*)?)?$")
LFS = re.compile(rf"^/{REPO}\.git/info/lfs/(?P<what>objects/batch|objects/(?P<oid>[0-9a-f]{{64}})|locks/verify|locks)$")
RESOLVE = re.compile(rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
GIT = re.compile(rf"^/{REPO}(?:\.git)?(?P<rest>/(?:info/refs|git-upload-pack|git-receive-pack|HEAD))$")


def git(*args, cwd=None, env=None, input: bytes | None = None) -> bytes:
    out = subprocess.run(["git", *args], cwd=cwd, env=env, input=input, capture_output=True)
    if out.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {out.stderr.decode(errors='replace')}")
    return out.stdout


class FakeHub:
    def __init__(self, root: Path, token: str | None = None, user: str = "alice"):
        self.root, self.token, self.user = Path(root), token, user
        self.requests: list[tuple[str, str]] = []      # (method, path): what clients did
        self.authorizations: list[str] = []            # every Authorization header received ("" = none)
        self.any_login = False       # True: a host that asks for a login and takes any (one harvesting tokens)
        self.lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "FakeHub":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- storage -------------------------------------------------------------------------------
    def repo_dir(self, repo_id: str, repo_type: str = "model") -> Path:
        return self.root / f"{repo_type}s" / f"{repo_id}.git"

    def lfs_dir(self, repo_id: str, repo_type: str = "model") -> Path:
        return self.root / f"{repo_type}s" / f"{repo_id}.lfs"

    def create(self, repo_id: str, repo_type: str = "model", initial: bool = True, private: bool = False) -> Path:
        """A bare repo on branch main; `initial` adds the Hub's first commit (.gitattributes)."""
        d = self.repo_dir(repo_id, repo_type)
        git("init", "-q", "--bare", "-b", "main", str(d))
        self.lfs_dir(repo_id, repo_type).mkdir(parents=True, exist_ok=True)
        (d / "fake-hub.json").write_text(json.dumps({"private": private}))
        if initial:
            self.commit(repo_id, repo_type, [("file", ".gitattributes", HF_GITATTRIBUTES.encode())], "initial commit")
        return d

    def head(self, repo_id: str, repo_type: str = "model") -> str | None:
        out = subprocess.run(["git", "rev-parse", "-q", "--verify", "refs/heads/main"],
                             cwd=self.repo_dir(repo_id, repo_type), capture_output=True, text=True)
        return out.stdout.strip() or None

    def tree(self, repo_id: str, repo_type: str = "model") -> dict[str, dict]:
        """{path: {"blob", "size", "lfs": {"oid", "size"} | None}} at main."""
        d = self.repo_dir(repo_id, repo_type)
        if not self.head(repo_id, repo_type):
            return {}
        out = {}
        for line in git("ls-tree", "-r", "-l", "-z", "main", cwd=d).decode().split("\0"):
            if not line:
                continue
            meta, path = line.split("\t", 1)
            _, _, blob, size = meta.split()
            lfs = None
            if int(size) < 1024:
                m = re.match(r"version https://git-lfs.github.com/spec/v1\noid sha256:([0-9a-f]{64})\nsize (\d+)\n",
                             git("cat-file", "blob", blob, cwd=d).decode(errors="replace"))
                lfs = {"oid": m.group(1), "size": int(m.group(2)), "pointerSize": int(size)} if m else None
            out[path] = {"blob": blob, "size": int(size), "lfs": lfs}
        return out

    def files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        """Content at main, LFS files resolved from the object store."""
        d, store = self.repo_dir(repo_id, repo_type), self.lfs_dir(repo_id, repo_type)
        return {path: (store / e["lfs"]["oid"]).read_bytes() if e["lfs"] else git("cat-file", "blob", e["blob"], cwd=d)
                for path, e in self.tree(repo_id, repo_type).items()}

    def commit(self, repo_id: str, repo_type: str, ops: list[tuple], summary: str) -> str:
        """ops: ("file", path, bytes) | ("lfs", path, oid, size) | ("delete", path) -> new commit on main."""
        d = self.repo_dir(repo_id, repo_type)
        with self.lock:
            env = {**os.environ, "GIT_DIR": str(d), "GIT_INDEX_FILE": str(d / "fake-index"),
                   "GIT_AUTHOR_NAME": "fake-hub", "GIT_AUTHOR_EMAIL": "hub@localhost",
                   "GIT_COMMITTER_NAME": "fake-hub", "GIT_COMMITTER_EMAIL": "hub@localhost"}
            parent = self.head(repo_id, repo_type)
            (d / "fake-index").unlink(missing_ok=True)
            if parent:
                git("read-tree", parent, env=env)
            for op in ops:
                if op[0] == "delete":
                    git("update-index", "--force-remove", op[1], env=env)
                    continue
                data = op[2] if op[0] == "file" else POINTER.format(oid=op[2], size=op[3]).encode()
                blob = git("hash-object", "-w", "--stdin", env=env, input=data).decode().strip()
                git("update-index", "--add", "--cacheinfo", f"100644,{blob},{op[1]}", env=env)
            tree = git("write-tree", env=env).decode().strip()
            commit = git("commit-tree", tree, *(["-p", parent] if parent else []), "-m", summary,
                         env=env).decode().strip()
            git("update-ref", "refs/heads/main", commit, env=env)
            (d / "fake-index").unlink(missing_ok=True)
            return commit

    def lfs_patterns(self, repo_id: str, repo_type: str) -> list[str]:
        text = self.files(repo_id, repo_type).get(".gitattributes", b"").decode()
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line]

    def raw_bytes(self, repo_id: str, repo_type: str = "model") -> bytes:
        """Everything the server stores for a repo, decompressed: for secret scans."""
        d = self.repo_dir(repo_id, repo_type)
        parts = [git("cat-file", "--batch-all-objects", "--batch", cwd=d)]
        for base in (d, self.lfs_dir(repo_id, repo_type)):
            parts += [p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()]
        return b"".join(parts)


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):          # keep test output clean
        pass

    # --- plumbing ------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                n = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if n == 0:
                    while self.rfile.readline().strip():
                        pass
                    return bytes(out)
                out += self.rfile.read(n)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json", headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data, ctype: str = "application/json"):
        self._send(status, json.dumps(data).encode(), ctype)

    def _authorized(self, git_style: bool) -> bool:
        hub = self.hub
        if hub.any_login:
            return bool(self.headers.get("Authorization"))
        if hub.token is None:
            return True
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and auth[7:] == hub.token:
            return True
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode(errors="replace").partition(":")
            return password == hub.token and (user == hub.user or not git_style)
        return False

    def _deny(self, git_style: bool):
        if git_style:
            self._send(401, b"authentication required\n", "text/plain",
                       {"WWW-Authenticate": 'Basic realm="fake-hub"'})
        else:
            self._json(401, {"error": "Invalid credentials in Authorization header"})

    # --- dispatch ------------------------------------------------------------------------------
    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    def do_HEAD(self):
        self._route("HEAD")

    def _route(self, method: str):
        path, _, query = self.path.partition("?")
        self.hub.requests.append((method, path))
        self.hub.authorizations.append(self.headers.get("Authorization", ""))
        body = self._body()
        if path == "/api/validate-yaml":
            return self._validate_yaml(body)
        if path == "/api/repos/create":
            return self._create(body) if self._authorized(False) else self._deny(False)
        if m := API.match(path):
            if not self._authorized(False):
                return self._deny(False)
            return self._api(method, m["type"][:-1], m["id"], m["op"], body)
        if m := RESOLVE.match(path):
            if not self._authorized(False):
                return self._deny(False)
            return self._resolve(method, "space" if m["type"] else "model", m["id"], m["file"])
        if m := LFS.match(path):
            repo_type = "space" if m["type"] else "model"
            if m["oid"]:                   # object storage: a pre-signed URL in real life
                return self._lfs_object(method, m["id"], repo_type, m["oid"], body)
            if not self._authorized(True):
                return self._deny(True)
            if m["what"] == "objects/batch":
                return self._lfs_batch(m["id"], repo_type, json.loads(body or b"{}"))
            return self._json(200, {"ours": [], "theirs": [], "locks": []}, "application/vnd.git-lfs+json")
        if m := GIT.match(path):
            if not self._authorized(True):
                return self._deny(True)
            return self._git(method, "space" if m["type"] else "model", m["id"], m["rest"], query, body)
        self._json(404, {"error": f"no route {method} {path}"})

    # --- Hub API -------------------------------------------------------------------------------
    def _validate_yaml(self, body: bytes):
        import yaml

        content = json.loads(body).get("content", "")
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else {}
            assert meta is None or isinstance(meta, dict), "metadata must be a mapping"
        except Exception as exc:          # noqa: BLE001 -- any YAML error is a 400 for the client
            return self._json(400, {"errors": [{"message": str(exc)}]})
        self._json(200, {"errors": [], "warnings": []})

    def _create(self, body: bytes):
        data = json.loads(body)
        repo_type = data.get("type") or "model"
        repo_id = f"{data.get('organization') or self.hub.user}/{data['name']}"
        prefix = "spaces/" if repo_type == "space" else ""
        url = f"{self.hub.url}/{prefix}{repo_id}"
        if self.hub.repo_dir(repo_id, repo_type).exists():
            return self._json(409, {"error": "You already created this repo", "url": url})
        self.hub.create(repo_id, repo_type, private=data.get("visibility") == "private" or bool(data.get("private")))
        self._json(200, {"url": url, "name": repo_id})

    def _api(self, method: str, repo_type: str, repo_id: str, op: str | None, body: bytes):
        hub = self.hub
        if not hub.repo_dir(repo_id, repo_type).exists():
            return self._send(404, b'{"error": "Repository not found"}', headers={"X-Error-Code": "RepoNotFound"})
        tree = hub.tree(repo_id, repo_type)
        if op == "tree" or (op is None and method == "GET") or op == "revision":
            if op == "tree":
                return self._json(200, [{"type": "file", "path": p, "oid": e["blob"],
                                         "size": e["lfs"]["size"] if e["lfs"] else e["size"],
                                         **({"lfs": e["lfs"]} if e["lfs"] else {})} for p, e in sorted(tree.items())])
            return self._json(200, {"id": repo_id, "sha": hub.head(repo_id, repo_type), "private": False,
                                    "siblings": [{"rfilename": p} for p in sorted(tree)]})
        if op == "preupload":
            patterns = hub.lfs_patterns(repo_id, repo_type)
            out = []
            for f in json.loads(body)["files"]:
                name = PurePosixPath(f["path"]).name
                lfs = (f["size"] >= 10 * 1024 * 1024 or b"\0" in base64.b64decode(f["sample"])
                       or any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(f["path"], p) for p in patterns))
                have = tree.get(f["path"])
                oid = (have["lfs"]["oid"] if have["lfs"] else have["blob"]) if have else None
                out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})
            return self._json(200, {"files": out, "commitOid": hub.head(repo_id, repo_type)})
        if op == "commit":
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            summary, ops = "commit", []
            for item in lines:
                key, v = item["key"], item["value"]
                if key == "header":
                    summary = v["summary"]
                elif key == "file":
                    ops.append(("file", v["path"], base64.b64decode(v["content"])))
                elif key == "lfsFile":
                    if not (hub.lfs_dir(repo_id, repo_type) / v["oid"]).is_file():
                        return self._json(422, {"error": f"LFS object {v['oid']} was never uploaded"})
                    ops.append(("lfs", v["path"], v["oid"], v["size"]))
                elif key in ("deletedFile", "deletedFolder"):
                    ops.append(("delete", v["path"]))
            sha = hub.commit(repo_id, repo_type, ops, summary)
            return self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                                    "pullRequestUrl": None})
        self._json(404, {"error": f"unsupported {method} {op}"})

    def _resolve(self, method: str, repo_type: str, repo_id: str, path: str):
        """File download (`hf_hub_download`): the content at main, with the Hub's metadata headers."""
        entry = self.hub.tree(repo_id, repo_type).get(path)
        if entry is None:
            return self._send(404, b'{"error": "Entry not found"}', headers={"X-Error-Code": "EntryNotFound"})
        data = self.hub.files(repo_id, repo_type)[path]
        headers = {"X-Repo-Commit": self.hub.head(repo_id, repo_type), "ETag": f'"{entry["blob"]}"'}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{entry["lfs"]["oid"]}"', "X-Linked-Size": str(len(data))})
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    # --- git-lfs -------------------------------------------------------------------------------
    def _lfs_batch(self, repo_id: str, repo_type: str, req: dict):
        store = self.hub.lfs_dir(repo_id, repo_type)
        if not store.exists():
            return self._json(404, {"message": "Repository not found"}, "application/vnd.git-lfs+json")
        prefix = "spaces/" if repo_type == "space" else ""
        objects = []
        for obj in req.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            href = f"{self.hub.url}/{prefix}{repo_id}.git/info/lfs/objects/{oid}"
            have = (store / oid).is_file()
            if req.get("operation") == "upload":
                objects.append({"oid": oid, "size": size, **({} if have else {
                    "authenticated": True, "actions": {"upload": {"href": href, "header": {}, "expires_in": 3600}}})})
            elif have:
                objects.append({"oid": oid, "size": size, "authenticated": True,
                                "actions": {"download": {"href": href, "header": {}, "expires_in": 3600}}})
            else:
                objects.append({"oid": oid, "size": size, "error": {"code": 404, "message": "Object does not exist"}})
        self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   "application/vnd.git-lfs+json")

    def _lfs_object(self, method: str, repo_id: str, repo_type: str, oid: str, body: bytes):
        path = self.hub.lfs_dir(repo_id, repo_type) / oid
        if method == "PUT":
            if hashlib.sha256(body).hexdigest() != oid:
                return self._json(400, {"message": "sha256 mismatch"})
            path.write_bytes(body)
            return self._send(200)
        if path.is_file():
            return self._send(200, path.read_bytes(), "application/octet-stream")
        self._json(404, {"message": "Object does not exist"})

    # --- git smart HTTP ------------------------------------------------------------------------
    def _git(self, method: str, repo_type: str, repo_id: str, rest: str, query: str, body: bytes):
        if not self.hub.repo_dir(repo_id, repo_type).exists():
            return self._send(404, b"Repository not found\n", "text/plain")
        env = {"PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": str(self.hub.root), "GIT_HTTP_EXPORT_ALL": "1",
               "PATH_INFO": f"/{repo_type}s/{repo_id}.git{rest}", "REQUEST_METHOD": method, "QUERY_STRING": query,
               "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
               "REMOTE_USER": self.hub.user, "REMOTE_ADDR": "127.0.0.1",
               "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
               "HTTP_GIT_PROTOCOL": self.headers.get("Git-Protocol", ""), "GIT_CONFIG_NOSYSTEM": "1",
               "HOME": str(self.hub.root)}
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
        sep = b"\r\n\r\n" if b"\r\n\r\n" in out else b"\n\n"
        head, _, payload = out.partition(sep)
        status, headers = 200, {}
        for line in head.decode(errors="replace").splitlines():
            k, _, v = line.partition(":")
            if k.lower() == "status":
                status = int(v.strip().split()[0])
            elif k.lower() not in ("content-length",):
                headers[k.strip()] = v.strip()
        ctype = headers.pop("Content-Type", "application/octet-stream")
        self._send(status, payload, ctype, headers)


# --- helpers for the publish tests: an isolated git setup and a remote's on-disk state ---------------
def isolated_git_env(home: Path) -> dict:
    """os.environ with a fresh HOME and no system git config: no stray credential helper, identity or
    global git-lfs install of the machine leaks into a test; and no publish token set. HF_HUB_OFFLINE and
    TRANSFORMERS_OFFLINE (set for the whole test session; huggingface_hub honours both) are dropped too:
    publishing is online by nature, and here the "hub" is the loopback fake above."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GIT_", "HF_TOKEN", "OPENXLAB_"))
           and k not in ("HF_ENDPOINT", "SSH_ASKPASS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "GIT_CONFIG_NOSYSTEM": "1"}


def remote_snapshot(path: Path) -> dict[str, str]:
    """{file: sha256} of everything under a bare repo (or any dir): equal before/after = untouched."""
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}
