"""launch/stage_data.py: copy, skip on rerun, repair and corrupt-source detection, with the real
gsutil on file:// URLs and with plain local paths."""

import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("stage_data", ROOT / "launch" / "stage_data.py")
stage_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stage_data)

needs_gsutil = pytest.mark.skipif(shutil.which("gsutil") is None,
                                  reason="gsutil (google-cloud-cli) is not installed")


def _tree(root: pathlib.Path) -> dict:
  """A small model-like folder: a binary shard, nested files, an empty file."""
  files = {"config.json": b'{"a": 1}', "model.safetensors": os.urandom(70_000),
           "sub/deeper/vocab.txt": b"hello\nworld\n", "empty.txt": b""}
  for rel, data in files.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)
  return files


@pytest.fixture()
def setup(tmp_path):
  src = tmp_path / "bucket" / "Qwen-tiny"
  files = _tree(src)
  manifest = tmp_path / "manifest.json"
  code = stage_data.main(["--make-manifest", str(src), "--name", "models/Qwen-tiny",
                          "--out", str(manifest)])
  assert code == 0
  return src, files, manifest, tmp_path / "dest"


def _run_cli(*args):
  return subprocess.run([sys.executable, str(ROOT / "launch" / "stage_data.py"), *args],
                        capture_output=True, text=True, timeout=120)


def test_make_manifest_records_sizes_and_sha256(setup):
  src, files, manifest, _ = setup
  m = json.loads(manifest.read_text())
  assert m["format"] == stage_data.FORMAT
  (entry,) = m["entries"]
  assert entry["name"] == "models/Qwen-tiny" and entry["source"] == str(src)
  got = {f["path"]: (f["size"], f["sha256"]) for f in entry["files"]}
  assert got == {rel: (len(d), hashlib.sha256(d).hexdigest()) for rel, d in files.items()}
  # A second folder extends the manifest; re-adding a name replaces it.
  other = src.parent / "corpus"
  other.mkdir()
  (other / "wiki.jsonl").write_bytes(b'{"id": "0"}\n')
  stage_data.main(["--make-manifest", str(other), "--out", str(manifest)])
  stage_data.main(["--make-manifest", str(other), "--out", str(manifest)])
  assert [e["name"] for e in json.loads(manifest.read_text())["entries"]] == ["models/Qwen-tiny",
                                                                             "corpus"]


@pytest.mark.parametrize("tool,url", [
    pytest.param("gsutil", "file://", marks=needs_gsutil),
    ("local", ""),
    ("auto", "file://")])
def test_copy_then_skip_then_repair(setup, tool, url):
  src, files, manifest, dest = setup
  m = stage_data.load_manifest(str(manifest))
  m["entries"][0]["source"] = url + str(src)
  (r,) = stage_data.stage(m, str(dest), tool=tool)
  assert r["fetched"] == len(files) and r["present"] == 0
  assert r["tool"] == ("gsutil" if tool == "gsutil" else "local")
  for rel, data in files.items():
    assert (dest / "models/Qwen-tiny" / rel).read_bytes() == data
  assert not (dest / stage_data.TMP_DIR).exists()
  # Rerun: everything present and verified, nothing copied.
  (r,) = stage_data.stage(m, str(dest), tool=tool)
  assert r["fetched"] == 0 and r["present"] == len(files)
  # A corrupted local copy (same size, different bytes) is fetched again and repaired.
  shard = dest / "models/Qwen-tiny/model.safetensors"
  shard.write_bytes(b"\0" * len(files["model.safetensors"]))
  (dest / "models/Qwen-tiny/config.json").unlink()
  (r,) = stage_data.stage(m, str(dest), tool=tool)
  assert r["fetched"] == 2 and r["present"] == len(files) - 2
  assert shard.read_bytes() == files["model.safetensors"]


@pytest.mark.parametrize("tool", [pytest.param("gsutil", marks=needs_gsutil), "local"])
def test_corrupt_or_missing_source_fails_naming_the_file(setup, tool):
  src, files, manifest, dest = setup
  (src / "sub/deeper/vocab.txt").write_bytes(b"HELLO\nWORLD\n")   # same size, new bytes
  proc = _run_cli("--manifest", str(manifest), "--dest", str(dest), "--tool", tool)
  assert proc.returncode == 1
  assert "models/Qwen-tiny/sub/deeper/vocab.txt: sha256 mismatch" in proc.stderr, proc.stderr
  # Nothing unverified was left in place.
  assert not (dest / "models/Qwen-tiny/sub/deeper/vocab.txt").exists()
  (src / "sub/deeper/vocab.txt").write_bytes(files["sub/deeper/vocab.txt"])
  (src / "config.json").unlink()
  proc = _run_cli("--manifest", str(manifest), "--dest", str(dest), "--tool", tool)
  assert proc.returncode == 1 and "models/Qwen-tiny/config.json" in proc.stderr, proc.stderr


def test_verified_state_survives_but_changed_files_are_rehashed(setup):
  src, files, manifest, dest = setup
  m = stage_data.load_manifest(str(manifest))
  stage_data.stage(m, str(dest), tool="local")
  vocab = dest / "models/Qwen-tiny/sub/deeper/vocab.txt"
  st = vocab.stat()
  vocab.write_bytes(b"HELLO\nWORLD\n")         # same size; mtime changes, so it is re-hashed
  os.utime(vocab, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
  (r,) = stage_data.stage(m, str(dest), tool="local")
  assert r["fetched"] == 1 and vocab.read_bytes() == files["sub/deeper/vocab.txt"]
  (r,) = stage_data.stage(m, str(dest), tool="local", rehash=True)
  assert r["fetched"] == 0


@pytest.mark.parametrize("mutate,match", [
    (lambda m: m.update(format="other"), "not a stage manifest"),
    (lambda m: m["entries"][0].update(name="../etc"), "without '..'"),
    (lambda m: m["entries"][0]["files"][0].pop("sha256"), "files\\[0\\] needs"),
])
def test_bad_manifest_is_rejected_naming_the_problem(setup, mutate, match):
  _, _, manifest, _ = setup
  m = json.loads(manifest.read_text())
  mutate(m)
  manifest.write_text(json.dumps(m))
  with pytest.raises(stage_data.StageError, match=match):
    stage_data.load_manifest(str(manifest))


def test_only_and_unknown_entry(setup):
  _, _, manifest, dest = setup
  m = stage_data.load_manifest(str(manifest))
  with pytest.raises(stage_data.StageError, match="not in the manifest"):
    stage_data.stage(m, str(dest), only=["nope"], tool="local")
  assert stage_data.stage(m, str(dest), only=["models/Qwen-tiny"], tool="local")[0]["fetched"] == 4
