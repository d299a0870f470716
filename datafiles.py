"""
The benchmark files: where each comes from (a public URL at a fixed commit) and the checksum of the
copy we tested with; fetched where missing, with a progress bar, checked, and saved atomically (when a
file cannot be had, the error names every missing file with its URL, so that a user without a network
can put them in place by hand); read as JSON records, every field checked as it is read (data.py's
readers): a file or a field that is not what it should be is one DataError naming the file, the
record and the field.

    python data.py --data counterfact     # fetches data/counterfact/*.json if missing, then shows a record
"""
import hashlib
import json
import os
import urllib.error
import urllib.request

from tqdm import tqdm


class DataError(ValueError):
    """A missing, undownloadable or malformed data file; the message names the file and the fix."""


# path under --data-dir -> (public URL, checksum of the file we tested with or named: 64 hex digits a
# sha256, 40 the git blob id its repository gives it at that commit; None: the size is checked)
UNIEDIT_REPO = "qizhou/UniEdit"  # a Hugging Face dataset: uniedit/{train,test}/<discipline>.json
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


def ensure_uniedit(data_dir: str) -> str:
    """UniEdit's folder (train/ and test/ of {discipline}.json), downloaded from the hub if missing."""
    root = os.path.join(data_dir, "uniedit")
    if not os.path.isdir(os.path.join(root, "test")):
        print(f"{root} is missing; downloading {UNIEDIT_REPO} from the Hugging Face hub")
        try:
            from huggingface_hub import snapshot_download
            snapshot_download(repo_id=UNIEDIT_REPO, repo_type="dataset", local_dir=root, allow_patterns=["*.json"])
        except Exception as err:  # the hub client raises many kinds; all mean the same to a user
            raise DataError(f"could not download UniEdit ({type(err).__name__}: {str(err).splitlines()[0]}).\n"
                            f"Get https://huggingface.co/datasets/{UNIEDIT_REPO} and put its train/ and test/ "
                            f"folders in {root}/.") from None
    return root


# -----------------------------------------------------------------------------
# reading and checking

def read_json(path: str) -> list | dict:
    """A benchmark file's records (a JSON list, or an object of records), or one DataError naming the file."""
    rel = os.path.relpath(path, os.path.dirname(os.path.dirname(path))).replace(os.sep, "/")
    fix = f"replace it with {FILES[rel][0]}" if rel in FILES else "replace it with the original file"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); {fix}.") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); {fix}.") from None
    except OSError as err:
        raise DataError(f"cannot read {path} ({err.strerror or err}); check the file and its permissions") from None
    if not isinstance(data, (list, dict)):
        raise DataError(f"{path} holds a JSON {type(data).__name__}, not a list of records; {fix}")
    if not data:
        raise DataError(f"{path} holds no records; {fix}")
    return data


KINDS = {str: "a string", list: "a list", dict: "an object"}


def need(record: dict, key: str, where: str, kind: type | None = None):
    """record[key], or a DataError naming the file, the record index and the field: missing, or not of
    `kind` (str, list or dict)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, not {json.dumps(record)[:60]}")
    if key not in record:
        raise DataError(f"{where}: malformed record, missing field '{key}'")
    if kind is not None and not isinstance(record[key], kind):
        raise DataError(f"{where}: field '{key}' is {json.dumps(record[key])[:60]}, not {KINDS[kind]}")
    return record[key]


class EmptyText(DataError):
    """A prompt or answer that is empty or null: the record is left out, with a note."""


def text(record: dict, key: str, where: str, optional: bool = False) -> str | None:
    """record[key] as a non-empty string, else EmptyText naming file, index and field (scored, an empty
    prompt or answer would count as a failure and move the averages without a word); a value of
    another type is a DataError. optional: a missing or null field is None."""
    if optional and (not isinstance(record, dict) or record.get(key) is None):
        return None
    value = need(record, key, where)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' is {json.dumps(value)[:60]}, not a string")
    if not value or not value.strip():
        raise EmptyText(f"{where}: field '{key}' is {'empty' if isinstance(value, str) else 'null'}")
    return value


def strings(record: dict, key: str, where: str) -> list[str]:
    """record[key] as a list of strings (a null or missing field: none), else a DataError."""
    values = record.get(key) if isinstance(record, dict) else need(record, key, where)
    values = [] if values is None else need(record, key, where, list)
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise DataError(f"{where}: field '{key}' holds {json.dumps(bad[0])[:60]}, not a string")
    return values


def records_of(path: str, build) -> list:
    """[build(record, where)] over a file's records; one with an empty or null prompt or answer is
    None (left out by `load`, after any split, so the splits stay the same) and named in a note."""
    out, left_out = [], []
    data = read_json(path)
    for i, r in enumerate(data.items() if isinstance(data, dict) else data):
        try:
            out.append(build(r, f"{path} record {i}", i))
        except EmptyText as err:
            out.append(None)
            left_out.append(str(err).replace(path + " ", ""))
    if left_out:
        print(f"note: left out {len(left_out)} record(s) of {path} with an empty prompt or answer: "
              f"{'; '.join(left_out[:5])}" + (" ..." if len(left_out) > 5 else ""))
    return out
