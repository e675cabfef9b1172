#!/usr/bin/env python3
"""Generate vllm_neuronx/nxdi_keys_table.py: the keys each NxDI release's config classes take.

The keys are read with ``ast`` from the public git history of NxDI
(aws-neuron/neuronx-distributed-inference) and NxD core (aws-neuron/neuronx-distributed),
at the commits listed in RELEASES; nothing is imported. The table records the commit
and the git blob of every file it read, so the result can be checked again:

    scripts/nxdi_keys.py --nxdi <NxDI git dir> --nxd <NxD git dir>          # rewrite
    scripts/nxdi_keys.py --nxdi <NxDI git dir> --nxd <NxD git dir> --check  # compare

NxDI 0.10 (Neuron SDK 2.31, the release requirements/neuron.txt pins) has no public
source: its wheel is on AWS's Neuron index only. The newest public source is the
"2.29-v2" sync on NxDI's main branch (version 0.9.0); on a host with NxDI installed,
the installed release's own source is read instead (vllm_neuronx/nxdi_keys.py).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vllm_neuronx import nxdi_keys  # noqa: E402

TABLE = os.path.join(ROOT, "vllm_neuronx", "nxdi_keys_table.py")
NXDI_SRC = "src/neuronx_distributed_inference"
NXD_SRC = "src/neuronx_distributed"

# (Neuron SDK, NxDI ref, NxD core ref): each SDK release's commits in the public repos
# (NxDI tags v0.3-v0.7; the 2.28 and 2.29 releases and NxD before 2.26 are untagged
# commits titled with the release). The label is the NxDI version at that commit.
RELEASES = (
    ("2.23", "v0.3.5591", "e834945"),
    ("2.24", "v0.4.7422", "c9ee222"),
    ("2.25", "v0.5.9230", "c63420c"),
    ("2.26", "v0.6.10598", "v2.26.0"),
    ("2.27", "v0.7.14366", "v2.27.0"),
    ("2.28", "cd3abf3", "v2.28.0"),
    ("2.29", "c63afe0", "fbac349"),
    ("main", "main", "main"),
)
# What the check accepts when NxDI is not installed: the releases of the SDKs that
# run vLLM 0.16 beside NxDI's last public source (2.28 and 2.29), and NxDI's main.
SUPPORTED = ("0.8.0", "0.9.0", "main")


def git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, *args], check=True,
                          capture_output=True, text=True).stdout


def commit_of(git_dir: str, ref: str) -> str:
    return git(git_dir, "rev-parse", f"{ref}^{{commit}}").strip()


def read_files(git_dir: str, commit: str, root: str, files: tuple[str, ...]
               ) -> tuple[list[str], dict[str, str]]:
    """Source texts at ``commit`` and {path under root: blob id}; a file the commit lacks
    is skipped."""
    texts, blobs = [], {}
    for rel in files:
        path = f"{root}/{rel}"
        try:
            blobs[rel] = git(git_dir, "rev-parse", f"{commit}:{path}").strip()
        except subprocess.CalledProcessError:
            continue
        texts.append(git(git_dir, "show", f"{commit}:{path}"))
    return texts, blobs


def nxdi_version(git_dir: str, commit: str) -> str:
    text = git(git_dir, "show", f"{commit}:{NXDI_SRC}/_version.py")
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            return str(node.value.value)
    raise ValueError(f"no __version__ in NxDI {commit}")


def release_entry(nxdi_dir: str, nxd_dir: str, sdk: str, nxdi_commit: str,
                  nxd_commit: str, head: bool) -> tuple[str, dict[str, Any]]:
    """(label, entry) of one release: where it was read and the keys found."""
    nxdi_texts, nxdi_blobs = read_files(nxdi_dir, nxdi_commit, NXDI_SRC, nxdi_keys.NXDI_FILES)
    nxd_texts, nxd_blobs = read_files(nxd_dir, nxd_commit, NXD_SRC, nxdi_keys.NXD_FILES)
    version = nxdi_version(nxdi_dir, nxdi_commit)
    entry = {
        "version": version,
        "sdk": sdk,
        "nxdi_commit": nxdi_commit,
        "nxd_commit": nxd_commit,
        "files": {**{f"nxdi:{p}": b for p, b in nxdi_blobs.items()},
                  **{f"nxd:{p}": b for p, b in nxd_blobs.items()}},
        "keys": nxdi_keys.read_keys(nxdi_texts, nxd_texts),
    }
    return ("main" if head else version), entry


def generate(nxdi_dir: str, nxd_dir: str, pinned: dict[str, dict] | None = None) -> dict:
    """{label: entry} for RELEASES; with ``pinned`` (the committed table), at the commits
    it recorded instead of resolving the refs again."""
    out: dict[str, dict] = {}
    for sdk, nxdi_ref, nxd_ref in RELEASES:
        head = nxdi_ref == "main"
        if pinned is not None:
            match = [e for label, e in pinned.items() if e["sdk"] == sdk]
            if not match:
                raise SystemExit(f"the committed table has no release for SDK {sdk}")
            nxdi_commit, nxd_commit = match[0]["nxdi_commit"], match[0]["nxd_commit"]
        else:
            nxdi_commit, nxd_commit = commit_of(nxdi_dir, nxdi_ref), commit_of(nxd_dir, nxd_ref)
        label, entry = release_entry(nxdi_dir, nxd_dir, sdk, nxdi_commit, nxd_commit, head)
        out[label] = entry
    return out


def _q(text: str) -> str:
    """A string literal in double quotes (json's form is valid Python for these names)."""
    return json.dumps(text)


def _wrap(words: tuple[str, ...], indent: str, width: int = 96) -> list[str]:
    lines, line = [], indent
    for word in words:
        item = f"{_q(word)}, "
        if len(line) + len(item) > width and line.strip():
            lines.append(line.rstrip())
            line = indent
        line += item
    if line.strip():
        lines.append(line.rstrip())
    return lines


def render(releases: dict[str, dict], supported: tuple[str, ...]) -> str:
    """The table module's text: deterministic, so the committed file can be compared."""
    out = [
        '"""NxDI\'s configuration keys per release. GENERATED by scripts/nxdi_keys.py from',
        "NxDI's public git history (and NxD core's, for MoE routing keys): do not edit, rerun",
        "the script. Each release records the commits and the git blobs of the files it was",
        "read from (nxdi: under src/neuronx_distributed_inference, nxd: under",
        'src/neuronx_distributed)."""',
        "",
        "# fmt: off",
        f"SUPPORTED = ({', '.join(map(_q, supported))}{',' if len(supported) == 1 else ''})",
        "",
        "RELEASES = {",
    ]
    for label, entry in releases.items():
        out.append(f"    {_q(label)}: {{")
        for field in ("version", "sdk", "nxdi_commit", "nxd_commit"):
            out.append(f"        {_q(field)}: {_q(entry[field])},")
        out.append('        "files": {')
        for path, blob in entry["files"].items():
            out.append(f"            {_q(path)}: {_q(blob)},")
        out.append("        },")
        out.append('        "keys": {')
        for cls, names in entry["keys"].items():
            if cls == "renamed":
                out.append('            "renamed": {')
                for attr, key in names.items():
                    out.append(f"                {_q(attr)}: {_q(key)},")
                out.append("            },")
                continue
            out.append(f"            {_q(cls)}: (")
            out.extend(_wrap(tuple(names), " " * 16))
            out.append("            ),")
        out.append("        },")
        out.append("    },")
    out.append("}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nxdi", required=True, help="git dir of neuronx-distributed-inference")
    parser.add_argument("--nxd", required=True, help="git dir of neuronx-distributed")
    parser.add_argument("--check", action="store_true",
                        help="regenerate at the recorded commits and compare with the table")
    args = parser.parse_args(argv)
    if args.check:
        from vllm_neuronx import nxdi_keys_table as table

        text = render(generate(args.nxdi, args.nxd, table.RELEASES), table.SUPPORTED)
        with open(TABLE, encoding="utf-8") as f:
            same = f.read() == text
        print("nxdi_keys_table.py matches its sources" if same else
              "nxdi_keys_table.py differs from what its sources give: rerun without --check")
        return 0 if same else 1
    releases = generate(args.nxdi, args.nxd)
    missing = set(SUPPORTED) - set(releases)
    if missing:
        raise SystemExit(f"SUPPORTED names releases that were not read: {sorted(missing)}")
    with open(TABLE, "w", encoding="utf-8") as f:
        f.write(render(releases, SUPPORTED))
    print(f"wrote {TABLE}: {', '.join(releases)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
