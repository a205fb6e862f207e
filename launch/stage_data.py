#!/usr/bin/env python3
"""Stage datasets, corpora, indexes and model folders onto this host, verified against a manifest.

Every host of a pod runs this before training (launch/tpu_pod.sh does it with --worker=all), so
each one reads its inputs from local disk. Sources are ``gs://`` (copied with ``gsutil -m cp`` or
``gcloud storage cp``, whichever is installed), ``file://`` URLs or local paths. Each file's size
and sha256 are checked against the manifest; files already present and verified are skipped (a
small state file remembers size+mtime of verified files so reruns do not re-hash gigabytes); a
present file that does not match is fetched again, and a fetched file that still does not match
stops the run naming the file.

    # once, where the data lives: write (or extend) a manifest, one entry per folder
    python launch/stage_data.py --make-manifest /data/models/Qwen2.5-3B --name models/Qwen2.5-3B \
        --source gs://BUCKET/models/Qwen2.5-3B --out launch/manifest.json
    # on every host: copy what is missing, verify everything
    python launch/stage_data.py --manifest launch/manifest.json --dest /data

Manifest (JSON): {"format": "stepsearch-stage-manifest/1", "entries": [{"name": "models/Qwen2.5-3B",
"source": "gs://...", "files": [{"path": "config.json", "size": 684, "sha256": "..."}, ...]}]};
``name`` is the folder under --dest. --manifest may itself be a gs:// or file:// URL.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

FORMAT = "stepsearch-stage-manifest/1"
STATE_DIR = ".stage_state"
TMP_DIR = ".stage_tmp"
_CHUNK = 8 << 20
_ARGS_PER_CALL = 100


class StageError(RuntimeError):
  """A file is missing, corrupt or not copyable; the message names it."""


def log(msg: str) -> None:
  print(f"stage_data: {msg}", file=sys.stderr, flush=True)


def sha256_file(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(_CHUNK):
      h.update(block)
  return h.hexdigest()


def _is_remote(url: str) -> bool:
  return "://" in url and not url.startswith("file://")


def _local_path(url: str) -> str:
  return url[len("file://"):] if url.startswith("file://") else url


def pick_tool(tool: str, source: str) -> str:
  """'gsutil', 'gcloud' or 'local' for this source; 'auto' prefers gsutil for remote URLs."""
  if tool == "auto":
    if not _is_remote(source):
      return "local"
    tool = "gsutil" if shutil.which("gsutil") else "gcloud" if shutil.which("gcloud") else ""
    if not tool:
      raise StageError(f"{source}: neither gsutil nor gcloud is on PATH (install google-cloud-cli)")
    return tool
  if tool == "local" and _is_remote(source):
    raise StageError(f"{source}: --tool local cannot read a remote URL")
  if tool != "local" and not shutil.which(tool):
    raise StageError(f"--tool {tool}: {tool} is not on PATH")
  return tool


def _tool_url(source: str) -> str:
  if "://" in source:
    return source.rstrip("/")
  return "file://" + os.path.abspath(source)


def _run(cmd: list[str]) -> None:
  shown = " ".join(cmd[:6]) + (" ..." if len(cmd) > 6 else "")
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise StageError(f"`{shown}` failed (exit {proc.returncode}): {' | '.join(tail)}")


def _copy_cmd(tool: str, sources: list[str], dest_dir: str, recursive: bool) -> list[str]:
  flags = ["-r"] if recursive else []
  if tool == "gsutil":
    return ["gsutil", "-q", "-m", "cp", *flags, *sources, dest_dir.rstrip("/") + "/"]
  return ["gcloud", "storage", "cp", "--no-user-output-enabled", *flags, *sources,
          dest_dir.rstrip("/") + "/"]


def fetch(tool: str, source: str, paths: list[str], dest: str, all_files: bool,
          jobs: int = 8) -> None:
  """Copy `paths` (relative to `source`) into the folder `dest` (same relative layout)."""
  os.makedirs(dest, exist_ok=True)
  if tool == "local":
    src = _local_path(source)

    def one(rel):
      target = os.path.join(dest, rel)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      try:
        shutil.copyfile(os.path.join(src, rel), target)
      except FileNotFoundError:
        pass                    # reported by the verification that follows, naming the entry
      except OSError as e:
        raise StageError(f"{os.path.join(src, rel)}: cannot copy ({e.strerror})") from None

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
      list(pool.map(one, paths))
    return
  url = _tool_url(source)
  if all_files:
    # One recursive copy of the whole folder: `cp -r SRC PARENT/` lands in PARENT/basename(SRC).
    parent = tempfile.mkdtemp(dir=dest, prefix="r-")
    _run(_copy_cmd(tool, [url], parent, recursive=True))
    landed = os.path.join(parent, url.rsplit("/", 1)[-1])
    for rel in paths:
      target = os.path.join(dest, rel)
      if os.path.exists(os.path.join(landed, rel)):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(landed, rel), target)
    shutil.rmtree(parent, ignore_errors=True)
    return
  by_dir: dict[str, list[str]] = {}
  for rel in paths:
    by_dir.setdefault(os.path.dirname(rel), []).append(rel)
  for sub, rels in sorted(by_dir.items()):
    os.makedirs(os.path.join(dest, sub), exist_ok=True)
    for i in range(0, len(rels), _ARGS_PER_CALL):
      chunk = [f"{url}/{rel}" for rel in rels[i:i + _ARGS_PER_CALL]]
      _run(_copy_cmd(tool, chunk, os.path.join(dest, sub), recursive=False))


def _state_path(dest: str, name: str) -> str:
  return os.path.join(dest, STATE_DIR, name.replace("/", "__") + ".json")


def _load_state(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _save_state(path: str, state: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(state, f, indent=0, sort_keys=True)
  os.replace(path + ".tmp", path)


def _stamp(path: str) -> list[int]:
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns]


def _check_entry(entry: dict, where: str) -> None:
  for key in ("name", "source", "files"):
    if key not in entry:
      raise StageError(f"{where}: entry is missing '{key}'")
  name = entry["name"]
  if os.path.isabs(name) or ".." in pathlib.PurePosixPath(name).parts or not name.strip("/"):
    raise StageError(f"{where}: entry name {name!r} must be a relative folder without '..'")
  for i, f in enumerate(entry["files"]):
    if not {"path", "size", "sha256"} <= set(f):
      raise StageError(f"{where}: {name} files[{i}] needs path, size and sha256")
    if os.path.isabs(f["path"]) or ".." in pathlib.PurePosixPath(f["path"]).parts:
      raise StageError(f"{where}: {name} files[{i}].path {f['path']!r} escapes the folder")


def load_manifest(path_or_url: str, tool: str = "auto") -> dict:
  """Read a manifest from a local path or a gs:// / file:// URL and check its shape."""
  if "://" in path_or_url and not path_or_url.startswith("file://"):
    with tempfile.TemporaryDirectory() as tmp:
      used = pick_tool(tool, path_or_url)
      _run(_copy_cmd(used, [path_or_url], tmp, recursive=False))
      return load_manifest(os.path.join(tmp, path_or_url.rsplit("/", 1)[-1]))
  path = _local_path(path_or_url)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except OSError as e:
    raise StageError(f"{path}: cannot read manifest ({e.strerror})") from None
  except ValueError as e:
    raise StageError(f"{path}: manifest is not valid JSON ({e})") from None
  if manifest.get("format") != FORMAT or not isinstance(manifest.get("entries"), list):
    raise StageError(f"{path}: not a stage manifest (need format={FORMAT!r} and an entries list)")
  for entry in manifest["entries"]:
    _check_entry(entry, path)
  return manifest


def stage_entry(entry: dict, dest: str, tool: str = "auto", rehash: bool = False,
                jobs: int = 8) -> dict:
  """Make DEST/entry.name hold exactly the manifest's bytes; returns counts for the log."""
  name, source = entry["name"], entry["source"]
  root = os.path.join(dest, name)
  state_file = _state_path(dest, name)
  state = {} if rehash else _load_state(state_file)
  files = {f["path"]: f for f in entry["files"]}

  def verify(rel: str, path: str) -> str:
    """'ok', 'missing', 'size' or 'sha256' for one file against the manifest."""
    want = files[rel]
    if not os.path.isfile(path):
      return "missing"
    if os.path.getsize(path) != want["size"]:
      return "size"
    stamp = _stamp(path)
    if state.get(rel) == [*stamp, want["sha256"]]:
      return "ok"
    if sha256_file(path) != want["sha256"]:
      return "sha256"
    state[rel] = [*stamp, want["sha256"]]
    return "ok"

  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    status = dict(zip(files, pool.map(lambda r: verify(r, os.path.join(root, r)), files)))
  need = sorted(r for r, s in status.items() if s != "ok")
  for rel in need:
    if status[rel] in ("size", "sha256"):
      log(f"{name}/{rel}: present but {status[rel]} differs from the manifest; fetching again")
  used = "none"
  if need:
    used = pick_tool(tool, source)
    tmp = os.path.join(dest, TMP_DIR, f"{name.replace('/', '__')}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
      try:
        fetch(used, source, need, tmp, all_files=len(need) == len(files), jobs=jobs)
      except StageError as e:
        raise StageError(f"{name}: {e}") from None
      with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        got = dict(zip(need, pool.map(lambda r: verify(r, os.path.join(tmp, r)), need)))
      for rel in need:
        want = files[rel]
        if got[rel] == "missing":
          raise StageError(f"{name}/{rel}: not found at the source {source}/{rel}")
        if got[rel] != "ok":
          actual = (os.path.getsize(os.path.join(tmp, rel)) if got[rel] == "size"
                    else sha256_file(os.path.join(tmp, rel)))
          expected = want["size"] if got[rel] == "size" else want["sha256"]
          raise StageError(f"{name}/{rel}: {got[rel]} mismatch after copying from {source}: "
                           f"got {actual}, manifest says {expected}")
      for rel in need:
        target = os.path.join(root, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(tmp, rel), target)
        state[rel] = [*_stamp(target), files[rel]["sha256"]]
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
      with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(tmp))
  _save_state(state_file, {r: state[r] for r in files if r in state})
  result = dict(name=name, files=len(files), present=len(files) - len(need), fetched=len(need),
                bytes_fetched=sum(files[r]["size"] for r in need), tool=used)
  log(f"{name}: {result['files']} files verified ({result['present']} already present, "
      f"{result['fetched']} fetched, {result['bytes_fetched']} bytes, tool {used})")
  return result


@contextlib.contextmanager
def _host_lock(dest: str):
  """Two stagers on one host (e.g. one per GPU process) take turns instead of racing."""
  os.makedirs(os.path.join(dest, STATE_DIR), exist_ok=True)
  with open(os.path.join(dest, STATE_DIR, "lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def stage(manifest: dict, dest: str, only: list[str] | None = None, tool: str = "auto",
          rehash: bool = False, jobs: int = 8) -> list[dict]:
  """Stage every entry (or those named in `only`) under `dest`."""
  names = [e["name"] for e in manifest["entries"]]
  unknown = sorted(set(only or []) - set(names))
  if unknown:
    raise StageError(f"--only {unknown}: not in the manifest (entries: {names})")
  with _host_lock(dest):
    return [stage_entry(e, dest, tool, rehash, jobs) for e in manifest["entries"]
            if not only or e["name"] in only]


def make_entry(src: str, name: str | None = None, source: str | None = None,
               tool: str = "auto", jobs: int = 8) -> dict:
  """Hash every file under the folder `src` (local, file:// or, after a download, gs://)."""
  if _is_remote(src):
    with tempfile.TemporaryDirectory() as tmp:
      used = pick_tool(tool, src)
      _run(_copy_cmd(used, [src.rstrip("/")], tmp, recursive=True))
      return make_entry(os.path.join(tmp, src.rstrip("/").rsplit("/", 1)[-1]),
                        name or src.rstrip("/").rsplit("/", 1)[-1], source or src, jobs=jobs)
  folder = os.path.abspath(_local_path(src))
  if not os.path.isdir(folder):
    raise StageError(f"{src}: --make-manifest needs an existing folder")
  rels = sorted(str(p.relative_to(folder)) for p in pathlib.Path(folder).rglob("*")
                if p.is_file() and not p.is_symlink())
  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    sums = list(pool.map(lambda r: sha256_file(os.path.join(folder, r)), rels))
  files = [dict(path=r, size=os.path.getsize(os.path.join(folder, r)), sha256=s)
           for r, s in zip(rels, sums)]
  return dict(name=name or os.path.basename(folder), source=source or folder, files=files)


def write_manifest(entry: dict, out: str) -> dict:
  """Add `entry` to the manifest at `out` (replacing one with the same name)."""
  manifest = load_manifest(out) if os.path.exists(out) else dict(format=FORMAT, entries=[])
  manifest["entries"] = [e for e in manifest["entries"] if e["name"] != entry["name"]] + [entry]
  _check_entry(entry, out)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".tmp", "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(out + ".tmp", out)
  return manifest


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--manifest", help="manifest to stage (path, file:// or gs:// URL)")
  p.add_argument("--dest", help="local root; entry NAME goes to DEST/NAME")
  p.add_argument("--only", nargs="*", help="stage only these entry names")
  p.add_argument("--make-manifest", metavar="SRC", help="hash folder SRC into a manifest entry")
  p.add_argument("--name", help="entry name for --make-manifest (default: basename of SRC)")
  p.add_argument("--source", help="URL hosts copy from (default: SRC itself)")
  p.add_argument("--out", help="manifest file --make-manifest writes or extends")
  p.add_argument("--tool", default="auto", choices=("auto", "gsutil", "gcloud", "local"),
                 help="copier; auto = gsutil, else gcloud, for gs://; plain copy for local paths")
  p.add_argument("--rehash", action="store_true", help="re-hash files verified on earlier runs")
  p.add_argument("--jobs", type=int, default=8, help="parallel hash/copy threads")
  args = p.parse_args(argv)
  start = time.time()
  try:
    if args.make_manifest:
      if not args.out:
        p.error("--make-manifest needs --out")
      entry = make_entry(args.make_manifest, args.name, args.source, args.tool, args.jobs)
      write_manifest(entry, args.out)
      log(f"{args.out}: entry {entry['name']} with {len(entry['files'])} files "
          f"({sum(f['size'] for f in entry['files'])} bytes) from {entry['source']}")
      return 0
    if not (args.manifest and args.dest):
      p.error("give --manifest and --dest (or --make-manifest SRC --out M.json)")
    results = stage(load_manifest(args.manifest, args.tool), args.dest, args.only, args.tool,
                    args.rehash, args.jobs)
  except StageError as e:
    log(f"ERROR {e}")
    return 1
  log(f"OK {sum(r['files'] for r in results)} files in {len(results)} entries verified under "
      f"{args.dest} in {time.time() - start:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
