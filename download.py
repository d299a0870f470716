"""
The benchmark files: where each comes from (a public URL at a fixed commit) and the checksum of the
copy we tested with; fetched where missing, with a progress bar, checked, and saved atomically. When
a file cannot be had, the error names every missing file with its URL, so that a user without a
network can put them in place by hand.

    python data.py --data counterfact     # fetches data/counterfact/*.json if missing, then shows a record
"""
import hashlib
import os
import urllib.error
import urllib.request

from tqdm import tqdm


class DataError(ValueError):
    """A missing, undownloadable or malformed data file; the message names the file and the fix."""


# path under --data-dir -> (public URL, checksum of the file we tested with or named: 64 hex digits a
# sha256, 40 the git blob id its repository gives it at that commit; None: the size is checked)
RECIPE = "https://raw.githubusercontent.com/qizhou000/RECIPE/b8ff1fc2c649d44dc88d2d4fccfa14343066a835/data"
FILES = {
    "counterfact/counterfact-train.json": (
        f"{RECIPE}/meta-train/cf/counterfact-train.json",
        "bb40e12c7b740d6859e521674cf438f063c7c3e444bc1b449e74cdd0900772d0"),
    "counterfact/counterfact-edit.json": (
        f"{RECIPE}/evaluation/cf/counterfact-edit.json",
        "c31a07f7eb3d37e4acdaa284f0926a40d5a9340ca115141e0d026c79425bea56"),
    # MEND's zsRE splits (the paper's training data), as qizhou000/RECIPE keeps them
    "zsre/zsre_mend_train.json": (f"{RECIPE}/meta-train/zsre/zsre_mend_train.json",
                                  "b5113a1f2018f641e6350d097cf7c081f478fbb6"),
    "zsre/zsre_mend_eval.json": (f"{RECIPE}/evaluation/zsre/zsre_mend_eval.json",
                                 "db17283afbb832185b7f0e2a9b6e95424576c914"),
    "zsre/zsre_mend_train-1k.json": (
        "https://raw.githubusercontent.com/Jometeorie/KnowledgeSpread/51d7402617c2e52bde0dc11b76e400c3725a181a"
        "/data/zsre/zsre_mend_train-1k.json",
        "e62596101d8ed551889c26c0d2a5277f92eaef3b14416d8eaee39b04a244ab60"),
    "mquake/MQuAKE-hard.json": (
        "https://raw.githubusercontent.com/Alanzxd/memit_for_mquake/main/data/MQuAKE-hard.json",
        "fc78dc7bec4625d3ce6e2923acae7f1920691b0b23e663182bf799f2856f2a11"),
    "mquake/MQuAKE-CF-3k.json": (
        "https://raw.githubusercontent.com/princeton-nlp/MQuAKE/main/datasets/MQuAKE-CF-3k.json", None),
    "mquake/MQuAKE-T.json": ("https://raw.githubusercontent.com/princeton-nlp/MQuAKE/main/datasets/MQuAKE-T.json",
                             None),
}


def git_blob_id(path: str) -> str:
    """The id git gives the file's bytes: sha1 of "blob <size>\\0" and the bytes."""
    digest = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: str, checksum: str | None = None) -> None:
    """Fetch url to dest with a progress bar; check the checksum (FILES: a sha256 or a git blob id) or
    the size; atomic."""
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    part, digest, got = dest + ".part", hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            size = int(response.headers.get("Content-Length") or 0)
            with tqdm(total=size or None, unit="B", unit_scale=True, desc=f"download {os.path.basename(dest)}") as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as err:
        if os.path.exists(part):
            os.remove(part)
        raise DataError(f"could not download {os.path.basename(dest)} from {url} ({err}).\n"
                        f"Download it by hand and save it as {dest}, or point --data-dir at a folder that has "
                        f"it.") from None
    found = None if not checksum else git_blob_id(part) if len(checksum) == 40 else digest.hexdigest()
    problem = (f"{got} bytes arrived, {size} were announced" if size and got != size else
               f"checksum {found} is not the expected {checksum}" if found != checksum else None)
    if problem:
        os.remove(part)
        raise DataError(f"download of {url} failed its check: {problem}. Nothing was saved at {dest}.")
    os.replace(part, dest)


def ensure(data_dir: str, *relpaths: str) -> list[str]:
    """Full paths of the files, downloading each missing one from FILES; if any cannot be had, the
    error names every missing file with its URL."""
    paths = [os.path.join(data_dir, rel) for rel in relpaths]
    missing = [(rel, path) for rel, path in zip(relpaths, paths) if not os.path.exists(path)]
    for _, path in missing:                                    # a dangling link on the way (data/, data/zsre/)
        folder = os.path.dirname(path)
        while folder and folder != os.path.dirname(folder):
            if os.path.islink(folder) and not os.path.exists(folder):
                raise DataError(f"{folder} is a link to {os.readlink(folder)}, which does not exist; "
                                f"fix or remove the link (the files go in {os.path.dirname(path)}/)")
            folder = os.path.dirname(folder)
    failed = []
    for rel, path in missing:
        url, checksum = FILES[rel]
        print(f"{path} is missing; downloading it from {url}")
        try:
            download(url, path, checksum)
        except DataError as err:
            failed.append((rel, path, url, str(err).splitlines()[0]))
    if failed:
        files = "\n".join(f"  {path}  <-  {url}" for _, path, url, _ in failed)
        raise DataError(f"{len(failed)} data file(s) missing and not downloadable ({failed[0][3]}).\n"
                        f"Download them by hand to these paths, or point --data-dir at a folder that has "
                        f"them:\n{files}")
    return paths


